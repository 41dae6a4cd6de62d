"""Mask-RKR: RKR's rectifications shared across tasks, with per-task Piggyback masks over them.

The composition implemented (the paper's exact one is not available; METHODS.md's reading):
    W_t = W + (M_LM,t * LM) (M_RM,t * RM),   output scaled by (M_F,t * F),
with M_*,t = 1[score > 5e-3] learned per task by the Piggyback rule (straight-through, scores
init 1e-2). The shared LM, RM, F (RKR's init) are trained together with task 0's masks and are
frozen from then on, so later tasks learn only masks (and heads) and nothing an earlier task
uses ever changes. Storage: task 0's record holds the shared LM, RM, F (float32) once; every
task's record holds its masks as bits (one per LM, RM and F entry) plus its head.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.backbones.masks import pack_bits, threshold_ste, unpack_bits
from pipeline.methods.base import register_method
from pipeline.methods.rkr import low_rank_init
from pipeline.methods.taskwise import TaskwiseMethod, TaskwiseParams, set_slot

PARTS = ("lm", "rm", "scale")


class MaskRKRConfig(TaskwiseParams):
    rank: int = 2
    score_init: float = 1e-2
    threshold: float = 5e-3


@register_method("mask_rkr")
class MaskRKR(TaskwiseMethod):
    """RKR rectifications shared across tasks; per-task binary masks over them."""

    Config = MaskRKRConfig
    cfg: MaskRKRConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hooks = self.backbone.weight_hooks()
        self.shared: dict[str, dict[str, torch.Tensor]] = {}
        self.scores: dict[str, dict[str, nn.Parameter]] = {}

    def new_task(self, slot: int) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        if not self.shared:
            self.shared = {name: dict(zip(PARTS, low_rank_init(hook, self.cfg.rank, self.device), strict=True)) for name, hook in self.hooks.items()}
            params += [p for parts in self.shared.values() for p in parts.values()]
        self.scores = {
            name: {part: nn.Parameter(torch.full_like(tensor, self.cfg.score_init)) for part, tensor in parts.items()}
            for name, parts in self.shared.items()
        }
        return params + [p for parts in self.scores.values() for p in parts.values()]

    def before_step(self, slot: int) -> None:
        for name, hook in self.hooks.items():
            for part in PARTS:
                masked = threshold_ste(self.scores[name][part], self.cfg.threshold) * self.shared[name][part]
                setattr(hook, part, set_slot(getattr(hook, part), slot, masked))

    def task_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        tensors = {
            f"mask.{part}.{name}": pack_bits(self.scores[name][part] > self.cfg.threshold) for name in self.hooks for part in PARTS
        }
        if slot == 0:
            tensors |= {f"shared.{part}.{name}": self.shared[name][part].detach().clone() for name in self.hooks for part in PARTS}
        return tensors

    def install(self, tensors: dict[str, torch.Tensor], slot: int) -> None:
        if slot == 0:
            self.shared = {name: {part: tensors[f"shared.{part}.{name}"] for part in PARTS} for name in self.hooks}
        for name, hook in self.hooks.items():
            for part in PARTS:
                shared = self.shared[name][part]
                mask = unpack_bits(tensors[f"mask.{part}.{name}"], shared.shape).to(shared.device)
                setattr(hook, part, set_slot(getattr(hook, part), slot, mask * shared))
