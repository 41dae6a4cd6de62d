"""SLDA, streaming linear discriminant analysis (Hayes & Kanan, CVPRW 2020), on frozen features.

Running class means and one covariance shared by every class; prediction by the LDA rule

    Lambda = ((1 - eps) Sigma + eps I)^-1,   logit_c(x) = mu_c^T Lambda x - mu_c^T Lambda mu_c / 2

with the paper's shrinkage eps = 1e-4. The paper updates Sigma one sample at a time; the sum of
those updates is the within-class scatter over every sample seen divided by their number, which
is what this computes, exactly and in any order: each worker sums its rows' class sums, counts
and outer products in float64, ``end_task`` all-reduces them into running totals, so the model
after task t is the one a single pass over tasks 1..t in one process gives. A record holds the
running totals (class sums and counts, the outer-product sum's upper triangle).
"""

from __future__ import annotations


import torch
from pydantic import Field

from pipeline.memory import TaskRecord
from pipeline.methods.base import Batch, Method, MethodParams, TaskInfo, register_method
from pipeline.methods.gaussian import pack_upper, unpack_upper


class SLDAConfig(MethodParams):
    shrinkage: float = Field(default=1e-4, ge=0, le=1, description="eps: Sigma shrunk toward I (paper: 1e-4)")


@register_method("slda")
class SLDA(Method):
    """Streaming LDA: running class means, one shared covariance, the LDA linear rule."""

    scenarios = frozenset({"cil", "dil", "til"})
    record_holds_state = True  # each record holds the running totals of every task so far
    Config = SLDAConfig
    cfg: SLDAConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        d = self.backbone.feature_dim
        self.sums = torch.zeros(0, d, dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(0, dtype=torch.float64, device=self.device)
        self.outer = torch.zeros(d, d, dtype=torch.float64, device=self.device)
        self.weight = torch.zeros(0, d, dtype=torch.float64, device=self.device)
        self.bias = torch.zeros(0, dtype=torch.float64, device=self.device)
        self._task: dict[str, torch.Tensor] = {}

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        d, k = self.backbone.feature_dim, task.num_seen_classes
        self._task = {
            "sum.sums": torch.zeros(k, d, dtype=torch.float64, device=self.device),
            "sum.counts": torch.zeros(k, dtype=torch.float64, device=self.device),
            "sum.outer": torch.zeros(d, d, dtype=torch.float64, device=self.device),
        }

    def task_buffers(self) -> dict[str, torch.Tensor]:
        return self._task

    def training_step(self, batch: Batch) -> None:
        x = self.frozen_features(batch["image"]).double()
        labels = batch["label"]
        self._task["sum.sums"].index_add_(0, labels, x)
        self._task["sum.counts"].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        self._task["sum.outer"] += x.T @ x

    def end_task(self) -> TaskRecord:
        t = {name: self.collective.all_reduce_(tensor.clone()) for name, tensor in self._task.items()}
        sums, counts = t["sum.sums"], t["sum.counts"]
        sums[: len(self.counts)] += self.sums
        counts[: len(self.counts)] += self.counts
        record = TaskRecord({"sums": sums, "counts": counts, "outer": pack_upper(self.outer + t["sum.outer"])})
        self.apply_record(record)
        return record

    def apply_record(self, record: TaskRecord) -> None:
        t = {k: v.to(self.device) for k, v in record.tensors.items()}
        self.sums, self.counts = t["sums"], t["counts"]
        self.outer = unpack_upper(t["outer"], self.backbone.feature_dim)
        seen = self.counts > 0
        means = self.sums / self.counts.clamp(min=1).unsqueeze(1)
        total = float(self.counts.sum())
        scatter = self.outer - (means * self.counts.unsqueeze(1)).T @ means  # within-class: sum x x^T - sum_c n_c mu_c mu_c^T
        eps = self.cfg.shrinkage
        shrunk = (1 - eps) * scatter / total + eps * torch.eye(len(scatter), dtype=scatter.dtype, device=scatter.device)
        self.weight = torch.linalg.solve(shrunk, means.T).T  # mu_c^T Lambda (Sigma is symmetric)
        self.bias = torch.where(seen, -0.5 * (self.weight * means).sum(1), torch.full_like(self.counts, float("-inf")))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        return (self.frozen_features(images).double() @ self.weight.T + self.bias).float()
