"""Finetune: a linear head over all classes seen so far, trained task after task (lower bound).

Plain cross-entropy over every seen class on the current task's data, with nothing to protect
earlier classes, so in class-incremental streams it forgets: the reference floor. ``joint``
is the same model trained once on every task's data at once: the gradient reference without
forgetting (in one pass not a ceiling on the features: a closed-form fit such as RanPAC's can
pass it).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from pipeline.memory import TaskRecord
from pipeline.methods.base import Batch, Method, MethodParams, ParamGroup, TaskInfo, register_method
from pipeline.methods.heads import GrowingLinear


class FinetuneConfig(MethodParams):
    lr: float = 1e-2


@register_method("finetune")
class Finetune(Method):
    """Linear head over all seen classes, trained task after task (the lower bound)."""

    scenarios = frozenset({"cil", "dil", "til"})
    record_holds_state = True  # the head over every class seen so far
    Config = FinetuneConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.head = GrowingLinear(self.backbone.feature_dim).to(self.device)

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self.head.grow(task.num_seen_classes)

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("head", list(self.head.parameters()), self.cfg.head_lr or self.cfg.lr)]

    def training_step(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.head(self.frozen_features(batch["image"])), batch["label"])

    def end_task(self) -> TaskRecord:
        return TaskRecord({"head.weight": self.head.weight.detach().clone(), "head.bias": self.head.bias.detach().clone()})

    def apply_record(self, record: TaskRecord) -> None:
        self.head.load(record.tensors["head.weight"], record.tensors["head.bias"])

    @torch.no_grad()
    def predict(self, images: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.frozen_features(images))


@register_method("joint")
class Joint(Finetune):
    """All tasks' data at once in one training phase: the upper bound, not a continual method."""

    trains_jointly = True
