"""A diagnostic method for tests: records how often each sample id was trained on.

Its config class lives here, so a Ray worker that unpickles the job imports this module and
the method registers itself there too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.memory import TaskRecord
from pipeline.methods import Batch, Method, MethodParams, TaskInfo, register_method


class SampleCounterConfig(MethodParams):
    max_id: int = 1024


@register_method("sample_counter")
class SampleCounter(Method):
    """Counts training visits per (task, sample id), all-reduced across workers."""

    scenarios = frozenset({"cil", "dil", "til"})
    Config = SampleCounterConfig

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self.visits = torch.zeros(self.cfg.max_id, dtype=torch.int64)
        self.ranks_seen = torch.zeros(8, dtype=torch.int64)

    def training_step(self, batch: Batch) -> None:
        self.visits.index_add_(0, batch["sample_id"].cpu(), torch.ones_like(batch["sample_id"].cpu()))
        self.ranks_seen[self.collective.rank] += len(batch["sample_id"])

    def end_task(self) -> TaskRecord:
        return TaskRecord({"visits": self.collective.all_reduce_(self.visits), "per_rank": self.collective.all_reduce_(self.ranks_seen)})

    def restore(self, records: Sequence[TaskRecord]) -> None:
        pass

    def predict(self, images: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(len(images), self.task.num_seen_classes if self.task else 1)
