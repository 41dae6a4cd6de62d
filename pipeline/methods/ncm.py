"""NCM: one-pass class means of frozen features; predict the nearest mean by cosine similarity.

Sums and counts are accumulated in float64 per worker, all-reduced at the end of the task, and
merged into running totals, so a class that returns in a later task (domain-incremental
streams) keeps one mean over all its samples. The record holds, for the task's classes, the
mean (float32) and the count after the task; the live state is rebuilt from it, so every rank
and every later restore hold exactly the same means.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from pipeline.memory import TaskRecord
from pipeline.methods.base import Batch, Method, TaskInfo, register_method


@register_method("ncm")
class NCM(Method):
    """One-pass class means of frozen features; cosine nearest mean."""

    scenarios = frozenset({"cil", "dil", "til"})

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        dim = self.backbone.feature_dim
        self.means = torch.zeros(0, dim, device=self.device)
        self.counts = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._sums = torch.zeros(0, dim, dtype=torch.float64, device=self.device)
        self._task_counts = torch.zeros(0, dtype=torch.int64, device=self.device)

    def _grow(self, num_classes: int) -> None:
        extra = num_classes - len(self.counts)
        if extra > 0:
            self.means = torch.cat([self.means, self.means.new_zeros(extra, self.means.shape[1])])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(extra)])

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self._grow(task.num_seen_classes)
        self._sums = torch.zeros(task.num_seen_classes, self.backbone.feature_dim, dtype=torch.float64, device=self.device)
        self._task_counts = torch.zeros(task.num_seen_classes, dtype=torch.int64, device=self.device)

    def task_buffers(self) -> dict[str, torch.Tensor]:
        return {"sum.features": self._sums, "sum.counts": self._task_counts}

    def training_step(self, batch: Batch) -> None:
        features = self.frozen_features(batch["image"]).double()
        self._sums.index_add_(0, batch["label"], features)
        self._task_counts.index_add_(0, batch["label"], torch.ones_like(batch["label"]))

    def end_task(self) -> TaskRecord:
        sums = self.collective.all_reduce_(self._sums)
        counts = self.collective.all_reduce_(self._task_counts)
        classes = torch.nonzero(counts).flatten()
        old = self.counts[classes]
        total = old + counts[classes]
        merged = (self.means[classes].double() * old.unsqueeze(1) + sums[classes]) / total.unsqueeze(1)
        record = TaskRecord({"classes": classes.cpu(), "means": merged.float().cpu(), "counts": total.cpu()})
        self.apply_record(record)
        return record

    def apply_record(self, record: TaskRecord) -> None:
        classes = record.tensors["classes"].to(self.device)
        self._grow(int(classes.max()) + 1)
        self.means[classes] = record.tensors["means"].to(self.device)
        self.counts[classes] = record.tensors["counts"].to(self.device)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        features = F.normalize(self.frozen_features(images).float(), dim=1)
        logits = features @ F.normalize(self.means, dim=1).T
        return logits.masked_fill(self.counts == 0, float("-inf"))
