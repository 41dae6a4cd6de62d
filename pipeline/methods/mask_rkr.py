"""Mask-RKR: RKR's rectifications shared across tasks, with per-task Piggyback masks over them.

The composition implemented (the paper's exact one is not available; this is the reading of its text):
    W_t = W + (M_LM,t * LM) (M_RM,t * RM),   output scaled by F_t,
with M_*,t = 1[score > 5e-3] learned per task by the Piggyback rule (straight-through, scores
init 1e-2). ``mask_mode`` says what a mask bit switches for the scale:
- ``rectification`` (default): F_t = 1 + M_F,t * (F - 1), so a bit that is off leaves the
  channel as the frozen model has it -- "off" means the frozen weight, for LM RM and F alike;
- ``scale``: F_t = M_F,t * F, the text's literal reading, where an off bit zeroes the whole
  output channel (measured worse: see docs/architecture.md).
The shared LM, RM, F (RKR's init) train at ``lr`` together with task 0's masks and are frozen
from then on, so later tasks learn only masks (``mask_lr``) and heads (``head_lr``) and nothing
an earlier task uses ever changes. The record keeps the masks of the last training forward
(``TaskwiseMethod.before_step``). Storage: task 0's record holds the shared LM, RM, F (float32)
once; every task's record holds its masks as bits (one per LM, RM and F entry) plus its head.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from pipeline.backbones.masks import pack_bits, threshold_ste, unpack_bits
from pipeline.methods.base import ParamGroup, register_method
from pipeline.methods.rkr import low_rank_init
from pipeline.methods.taskwise import TaskwiseMethod, TaskwiseParams, set_slot

PARTS = ("lm", "rm", "scale")


class MaskRKRConfig(TaskwiseParams):
    rank: int = 2
    score_init: float = 1e-2
    threshold: float = 5e-3
    mask_mode: Literal["rectification", "scale"] = "rectification"
    mask_lr: float = Field(default=1e-4, gt=0, allow_inf_nan=False)
    head_lr: float | None = 3e-3


def masked_part(part: str, mask: torch.Tensor, shared: torch.Tensor, mode: str) -> torch.Tensor:
    """What slot t's bank holds for ``part`` given its 0/1 mask over the shared tensor."""
    if part == "scale" and mode == "rectification":
        return 1.0 + mask * (shared - 1.0)
    return mask * shared


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
        self.last_masks: dict[str, dict[str, torch.Tensor]] = {}  # of the last training forward

    def new_task(self, slot: int) -> list[ParamGroup]:
        groups: list[ParamGroup] = []
        if not self.shared:
            self.shared = {
                name: dict(zip(PARTS, low_rank_init(hook, self.cfg.rank, self.device), strict=True))
                for name, hook in self.hooks.items()
            }
            groups.append(ParamGroup("rectification", [p for parts in self.shared.values() for p in parts.values()], self.cfg.lr))
        self.scores = {
            name: {part: nn.Parameter(torch.full_like(tensor, self.cfg.score_init)) for part, tensor in parts.items()}
            for name, parts in self.shared.items()
        }
        self.last_masks = {
            name: {part: s.detach() > self.cfg.threshold for part, s in parts.items()} for name, parts in self.scores.items()
        }
        return [*groups, ParamGroup("scores", [p for parts in self.scores.values() for p in parts.values()], self.cfg.mask_lr)]

    def before_step(self, slot: int) -> None:
        for name, hook in self.hooks.items():
            for part in PARTS:
                mask = threshold_ste(self.scores[name][part], self.cfg.threshold)
                self.last_masks[name][part] = mask.detach() > 0.5
                setattr(
                    hook,
                    part,
                    set_slot(getattr(hook, part), slot, masked_part(part, mask, self.shared[name][part], self.cfg.mask_mode)),
                )

    def task_buffers(self) -> dict[str, torch.Tensor]:
        masks = {f"last_mask.{part}.{name}": m for name, parts in self.last_masks.items() for part, m in parts.items()}
        return super().task_buffers() | masks

    def task_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        tensors = {f"mask.{part}.{name}": pack_bits(self.last_masks[name][part]) for name in self.hooks for part in PARTS}
        if slot == 0:
            tensors |= {
                f"shared.{part}.{name}": self.shared[name][part].detach().clone() for name in self.hooks for part in PARTS
            }
        return tensors

    def task_stats(self) -> dict[str, float]:
        """Fraction of the shared rectification entries the task's masks switch off."""
        masks = [m for parts in self.last_masks.values() for m in parts.values()]
        total = sum(m.numel() for m in masks)
        return {"masked_off": 1.0 - sum(int(m.sum()) for m in masks) / max(total, 1)}

    def install(self, tensors: dict[str, torch.Tensor], slot: int) -> None:
        if slot == 0:
            self.shared = {name: {part: tensors[f"shared.{part}.{name}"] for part in PARTS} for name in self.hooks}
        for name, hook in self.hooks.items():
            for part in PARTS:
                shared = self.shared[name][part]
                mask = unpack_bits(tensors[f"mask.{part}.{name}"], shared.shape).to(shared.device)
                setattr(hook, part, set_slot(getattr(hook, part), slot, masked_part(part, mask, shared, self.cfg.mask_mode)))
