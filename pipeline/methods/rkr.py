"""RKR — rectification-based knowledge retention (Singh et al., CVPR 2021).

Per task and layer, a rectification generator gives a low-rank weight delta,
W_t = W + LM_t RM_t (rank K, default 2), and a scaling-factor generator gives per-channel output
scales F_t (init 1), on every conv and linear layer (CNN and ViT). For a conv, RM_t spans
(input channels x kernel) and LM_t output channels: the delta is (LM_t @ RM_t) reshaped to the
kernel's shape. LM_t starts at 0 (RM_t small random) so a new task starts from the frozen
model. Rectifications train at ``lr``, the head at ``head_lr`` (its own group: a head at the
adapters' 1e-3 learns too slowly in one pass). Stored per task: LM, RM, F of every adapted
layer (float32) plus the head.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.methods.base import ParamGroup, register_method
from pipeline.methods.taskwise import TaskwiseMethod, TaskwiseParams, set_slot


class RKRConfig(TaskwiseParams):
    rank: int = 2
    head_lr: float | None = 3e-3


def low_rank_init(hook, rank: int, device: torch.device) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    """(LM = 0, RM ~ N(0, 1/fan_in), F = 1) for a hooked layer: W + LM @ RM = W at the start."""
    weight = hook.inner.weight
    out, fan_in = weight.shape[0], weight[0].numel()
    lm = nn.Parameter(torch.zeros(out, rank, device=device))
    rm = nn.Parameter(torch.randn(rank, fan_in, device=device) / math.sqrt(fan_in))
    scale = nn.Parameter(torch.ones(out, device=device))
    return lm, rm, scale


@register_method("rkr")
class RKR(TaskwiseMethod):
    """Per-task low-rank weight rectification and channel scaling on every conv/linear layer."""

    Config = RKRConfig
    cfg: RKRConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hooks = self.backbone.weight_hooks()

    def new_task(self, slot: int) -> list[ParamGroup]:
        params = []
        for hook in self.hooks.values():
            lm, rm, scale = low_rank_init(hook, self.cfg.rank, self.device)
            hook.lm, hook.rm, hook.scale = (
                set_slot(hook.lm, slot, lm),
                set_slot(hook.rm, slot, rm),
                set_slot(hook.scale, slot, scale),
            )
            params += [lm, rm, scale]
        return [ParamGroup("rectification", params, self.cfg.lr)]

    def task_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        return {
            f"{part}.{name}": getattr(hook, part)[slot].detach().clone()
            for name, hook in self.hooks.items()
            for part in ("lm", "rm", "scale")
        }

    def install(self, tensors: dict[str, torch.Tensor], slot: int) -> None:
        for name, hook in self.hooks.items():
            for part in ("lm", "rm", "scale"):
                setattr(hook, part, set_slot(getattr(hook, part), slot, tensors[f"{part}.{name}"]))
