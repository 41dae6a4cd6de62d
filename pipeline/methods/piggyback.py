"""Piggyback (Mallya et al., ECCV 2018): a learned binary mask per task over the backbone's weights.

A real-valued score per masked weight (init 1e-2); mask = 1[score > 5e-3] with a straight-through
gradient to the scores. Every conv and linear weight of the backbone is masked (biases are not;
heads are the task's own). The official code trains scores and head with Adam at 1e-4 for 30
epochs; here scores (``lr``) and head (``head_lr``) are separate groups, because with one pass
the head at 1e-4 barely moves and no score crosses the threshold. The record keeps the masks of
the last training forward (see ``TaskwiseMethod.before_step``). Stored per task: one bit per
masked weight (bit-packed) plus the head. Works on CNNs and ViTs.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.backbones.masks import pack_bits, threshold_ste, unpack_bits
from pipeline.methods.base import ParamGroup, register_method
from pipeline.methods.taskwise import TaskwiseMethod, TaskwiseParams, set_slot


class PiggybackConfig(TaskwiseParams):
    score_init: float = 1e-2
    threshold: float = 5e-3
    lr: float = 1e-4  # the scores' (official)
    head_lr: float | None = 3e-3


@register_method("piggyback")
class Piggyback(TaskwiseMethod):
    """Learned binary masks over every conv/linear weight, one per task."""

    Config = PiggybackConfig
    cfg: PiggybackConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hooks = self.backbone.weight_hooks()
        self.scores: dict[str, nn.Parameter] = {}
        self.last_masks: dict[str, torch.Tensor] = {}  # of the last training forward

    def new_task(self, slot: int) -> list[ParamGroup]:
        self.scores = {
            name: nn.Parameter(torch.full_like(hook.inner.weight, self.cfg.score_init)) for name, hook in self.hooks.items()
        }
        self.last_masks = {name: scores.detach() > self.cfg.threshold for name, scores in self.scores.items()}
        return [ParamGroup("scores", list(self.scores.values()), self.cfg.lr)]

    def before_step(self, slot: int) -> None:
        for name, hook in self.hooks.items():
            mask = threshold_ste(self.scores[name], self.cfg.threshold)
            self.last_masks[name] = mask.detach() > 0.5
            hook.mask = set_slot(hook.mask, slot, mask)

    def task_buffers(self) -> dict[str, torch.Tensor]:
        return super().task_buffers() | {f"last_mask.{name}": mask for name, mask in self.last_masks.items()}

    def task_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        return {f"mask.{name}": pack_bits(self.last_masks[name]) for name in self.hooks}

    def task_stats(self) -> dict[str, float]:
        """Fraction of weights the task's masks switch off."""
        total = sum(m.numel() for m in self.last_masks.values())
        return {"masked_off": 1.0 - sum(int(m.sum()) for m in self.last_masks.values()) / max(total, 1)}

    def install(self, tensors: dict[str, torch.Tensor], slot: int) -> None:
        for name, hook in self.hooks.items():
            mask = unpack_bits(tensors[f"mask.{name}"], hook.inner.weight.shape).to(hook.inner.weight.device, torch.bool)
            hook.mask = set_slot(hook.mask, slot, mask)
