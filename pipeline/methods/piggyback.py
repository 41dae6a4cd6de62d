"""Piggyback (Mallya et al., ECCV 2018): a learned binary mask per task over the backbone's weights.

A real-valued score per masked weight (init 1e-2); mask = 1[score > 5e-3] with a straight-through
gradient to the scores. Every conv and linear weight of the backbone is masked (biases are not;
heads are the task's own). Adam at 1e-4 for scores and head. Stored per task: one bit per
masked weight (bit-packed) plus the head. Works on CNNs and ViTs.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.backbones.masks import pack_bits, threshold_ste, unpack_bits
from pipeline.methods.base import register_method
from pipeline.methods.taskwise import TaskwiseMethod, TaskwiseParams, set_slot


class PiggybackConfig(TaskwiseParams):
    score_init: float = 1e-2
    threshold: float = 5e-3
    lr: float = 1e-4


@register_method("piggyback")
class Piggyback(TaskwiseMethod):
    """Learned binary masks over every conv/linear weight, one per task."""

    Config = PiggybackConfig
    cfg: PiggybackConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hooks = self.backbone.weight_hooks()
        self.scores: dict[str, nn.Parameter] = {}

    def new_task(self, slot: int) -> list[nn.Parameter]:
        self.scores = {name: nn.Parameter(torch.full_like(hook.inner.weight, self.cfg.score_init)) for name, hook in self.hooks.items()}
        return list(self.scores.values())

    def before_step(self, slot: int) -> None:
        for name, hook in self.hooks.items():
            hook.mask = set_slot(hook.mask, slot, threshold_ste(self.scores[name], self.cfg.threshold))

    def task_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        return {f"mask.{name}": pack_bits(self.scores[name] > self.cfg.threshold) for name in self.hooks}

    def install(self, tensors: dict[str, torch.Tensor], slot: int) -> None:
        for name, hook in self.hooks.items():
            mask = unpack_bits(tensors[f"mask.{name}"], hook.inner.weight.shape).to(hook.inner.weight.device, torch.bool)
            hook.mask = set_slot(hook.mask, slot, mask)
