"""Probe: a per-task linear head on frozen features (task-incremental), nothing else.

The floor every task-incremental method must clear on the same backbone: Piggyback, RKR,
Mask-RKR and MEAT train exactly this head (same ``head_lr``, same per-task slot, same task
inference) plus their adapters, so the difference between their row and this one is what the
adapters add. A task's record is its head (and, with ``task_inference``, its Gaussian).
"""

from __future__ import annotations

import torch

from pipeline.methods.base import ParamGroup, register_method
from pipeline.methods.taskwise import TaskwiseMethod, TaskwiseParams


class ProbeConfig(TaskwiseParams):
    lr: float = 3e-3  # the head's: the rate the mask methods' heads train at (their head_lr)


@register_method("probe")
class Probe(TaskwiseMethod):
    """A linear head per task on the frozen backbone's features."""

    Config = ProbeConfig

    def new_task(self, slot: int) -> list[ParamGroup]:
        return []

    def task_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        return {}

    def install(self, tensors: dict[str, torch.Tensor], slot: int) -> None:
        """Nothing beyond the head, which the base installs."""
