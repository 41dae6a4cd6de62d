"""RanPAC (McDonnell et al., NeurIPS 2023): a random projection of frozen features, then ridge
regression from the accumulated Gram matrix -- no gradient step, no forgetting beyond a joint fit.

    h = ReLU(f(x) W)           W: L x M Gaussian, regenerated from ``seed`` (never stored)
    G = sum h h^T,  C = sum h y^T  over every row of every task seen (y one-hot)
    W_out = (G + lambda I)^-1 C,   logits = h W_out

The inverse Gram matrix is the paper's decorrelation of the projected features. lambda is
chosen, after every task, from the official grid 10^-8 .. 10^8 (RanPAC's
``optimise_ridge_parameter``): fit on the tasks' rows minus a held-back share, pick the lambda
with the least mean squared error on the held-back rows, then solve on every row. Held-back
rows are picked by a hash of (sample id, task) -- the same on every worker -- and their G, C
are kept beside the totals, so the choice needs no second pass: for W(lambda) fitted on
(G_fit, C_fit), the held-back error is n_val - 2 tr(W^T C_val) + tr(W^T G_val W).

Each worker sums its rows' statistics in float64; ``end_task`` all-reduces them into the
running totals, so the classifier after task t is the joint ridge fit on tasks 1..t whatever
the number of workers or how rows fall into tasks. A task's record holds the running totals
(G and G_val as upper triangles, C and C_val, the held-back count) and the chosen lambda, so any
record rebuilds the classifier after its task. They are M x M: records grow with M^2 (8.4 MB
a task at the CPU default M = 1024 in float64), which is why M is 1024 here and 10,000 only in
the paper's config.

``first_task_adaptation`` is the paper's optional Phase 1 (off by default): before any
statistics, SSF (a per-channel scale and shift of every linear and conv output of the image
tower, identity at the start) is trained on task 1 with a linear head and cross-entropy for
``train.passes`` passes, then frozen; one more pass over task 1 reads its statistics from the
adapted model, and every later task is read once through it. That is the one place RanPAC reads
data twice. Every record carries the adapter (2 floats per output channel), so any record alone
rebuilds the model after its task.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline.data.stream import sample_hash
from pipeline.memory import TaskRecord
from pipeline.methods.base import Batch, Method, MethodParams, ParamGroup, TaskInfo, register_method
from pipeline.methods.gaussian import pack_upper, unpack_upper

RIDGES = tuple(10.0**k for k in range(-8, 9))  # the official grid


class RanPACConfig(MethodParams):
    projection_dim: int = Field(default=1024, ge=1, description="M (paper: 10,000); records grow with M^2")
    validation_share: float = Field(
        default=0.2, gt=0, lt=1, description="held-back share of each task's rows for choosing lambda"
    )
    ridge: float | None = Field(default=None, gt=0, description="a fixed lambda instead of the grid search")
    seed: int = 0
    head_lr: float | None = 1e-2  # task 1's head while the adapter trains (the adapter: lr)
    first_task_adaptation: bool = Field(
        default=False, description="the paper's Phase 1: train SSF on task 1 (train.passes passes), then one statistics pass"
    )


def ridge_solve(gram: torch.Tensor, targets: torch.Tensor, ridges: Sequence[float]) -> list[torch.Tensor]:
    """(gram + ridge I)^-1 targets for every ridge, from one eigendecomposition."""
    values, vectors = torch.linalg.eigh(gram)
    rotated = vectors.T @ targets
    return [vectors @ (rotated / (values + ridge).unsqueeze(1)) for ridge in ridges]


@register_method("ranpac")
class RanPAC(Method):
    """Random projection + ReLU of frozen features, ridge regression from the running Gram matrix."""

    scenarios = frozenset({"cil", "dil", "til"})
    record_holds_state = True  # each record holds the running totals of every task so far
    Config = RanPACConfig
    cfg: RanPACConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        m = self.cfg.projection_dim
        generator = torch.Generator().manual_seed(self.cfg.seed)
        self.projection = torch.randn(self.backbone.feature_dim, m, generator=generator, dtype=torch.float64).to(self.device)
        zeros = torch.zeros(m, m, dtype=torch.float64, device=self.device)
        self.gram, self.gram_val = zeros, zeros.clone()  # running totals over every task learned
        self.targets = self.targets_val = torch.zeros(m, 0, dtype=torch.float64, device=self.device)
        self.count_val = 0.0
        self.weight = torch.zeros(m, 0, dtype=torch.float64, device=self.device)
        self.ridge: float | None = None
        self._task: dict[str, torch.Tensor] = {}
        self.hooks = self.backbone.weight_hooks() if self.cfg.first_task_adaptation else {}
        self.adapter: dict[str, nn.Parameter] = {}  # "scale.<layer>" / "shift.<layer>", slot 0 of the hooks
        self.head: nn.Linear | None = None  # task 1's classifier while the adapter trains; dropped after
        self._plan: tuple[bool, ...] = (False,)
        self._collect = True  # this pass accumulates statistics

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        m, k = self.cfg.projection_dim, task.num_seen_classes
        zeros = torch.zeros(m, m, dtype=torch.float64, device=self.device)
        self._task = {
            "sum.gram": zeros, "sum.gram_val": zeros.clone(),
            "sum.targets": torch.zeros(m, k, dtype=torch.float64, device=self.device),
            "sum.targets_val": torch.zeros(m, k, dtype=torch.float64, device=self.device),
            "sum.count_val": torch.zeros(1, dtype=torch.float64, device=self.device),
        }  # fmt: skip
        if self._adapting():
            self._install(
                {
                    f"{part}.{name}": init(hook.inner.weight.shape[0], device=self.device)
                    for name, hook in self.hooks.items()
                    for part, init in (("scale", torch.ones), ("shift", torch.zeros))
                }
            )
            self.head = nn.Linear(self.backbone.feature_dim, task.num_seen_classes, device=self.device)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = None

    def _adapting(self) -> bool:
        return self.cfg.first_task_adaptation and self.task is not None and self.task.index == 0

    def _install(self, tensors: dict[str, torch.Tensor]) -> None:
        self.adapter = {name: nn.Parameter(t.to(self.device).float().clone()) for name, t in tensors.items()}
        for name, hook in self.hooks.items():
            hook.scale, hook.shift = (self.adapter[f"scale.{name}"],), (self.adapter[f"shift.{name}"],)

    def param_groups(self) -> list[ParamGroup]:
        if self.head is None:
            return []
        head = [self.head.weight, self.head.bias]
        return [
            ParamGroup("adapter", list(self.adapter.values()), self.cfg.lr),
            ParamGroup("head", head, self.cfg.head_lr or self.cfg.lr),
        ]

    def pass_plan(self, passes: int) -> tuple[bool, ...]:
        """Every task is read once for its statistics; task 1 with the adaptation is first
        trained for ``passes`` passes."""
        self._plan = (True,) * passes + (False,) if self._adapting() else (False,)
        return self._plan

    def begin_pass(self, index: int) -> None:
        self._collect = not self._plan[index]

    def task_buffers(self) -> dict[str, torch.Tensor]:
        return self._task

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's features, through the adapter where there is one."""
        if not self.adapter:
            return self.backbone.features(images)
        with self.backbone.routing(0):
            return self.backbone.features(images)

    @torch.no_grad()
    def project(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.features(images).double() @ self.projection)

    def training_step(self, batch: Batch) -> torch.Tensor | None:
        assert self.task is not None
        if not self._collect:
            assert self.head is not None
            return F.cross_entropy(self.head(self.features(batch["image"])), batch["label"])
        h = self.project(batch["image"])
        y = torch.nn.functional.one_hot(batch["label"], self.task.num_seen_classes).double()
        ids = batch["sample_id"].cpu().numpy()
        held = torch.from_numpy(sample_hash(ids, self.cfg.seed * 1000 + self.task.index) < self.cfg.validation_share).to(h.device)
        t = self._task
        t["sum.gram"] += h.T @ h
        t["sum.targets"] += h.T @ y
        hv, yv = h[held], y[held]
        t["sum.gram_val"] += hv.T @ hv
        t["sum.targets_val"] += hv.T @ yv
        t["sum.count_val"] += held.sum()
        return None

    def end_task(self) -> TaskRecord:
        t = {name: self.collective.all_reduce_(tensor.clone()) for name, tensor in self._task.items()}
        gram, gram_val = self.gram + t["sum.gram"], self.gram_val + t["sum.gram_val"]
        targets, targets_val = _widen(self.targets, t["sum.targets"]), _widen(self.targets_val, t["sum.targets_val"])
        count_val = self.count_val + float(t["sum.count_val"][0])
        ridge = self.cfg.ridge or choose_ridge(gram - gram_val, targets - targets_val, gram_val, targets_val, count_val)
        record = TaskRecord(
            {"gram": pack_upper(gram), "gram_val": pack_upper(gram_val), "targets": targets, "targets_val": targets_val,
             "count_val": torch.tensor([count_val], dtype=torch.float64),
             **{f"adapter.{name}": p.detach().clone() for name, p in self.adapter.items()}},
            meta={"ridge": ridge},
        )  # fmt: skip
        self.apply_record(record)
        return record

    def task_stats(self) -> dict[str, float | None]:
        return {"ridge": self.ridge}

    def apply_record(self, record: TaskRecord) -> None:
        t = {k: v.to(self.device) for k, v in record.tensors.items()}
        m = self.cfg.projection_dim
        self.gram, self.gram_val = unpack_upper(t["gram"], m), unpack_upper(t["gram_val"], m)
        self.targets, self.targets_val, self.count_val = t["targets"], t["targets_val"], float(t["count_val"][0])
        self.ridge = float(record.meta["ridge"])
        self.weight = ridge_solve(self.gram, self.targets, [self.ridge])[0]
        adapter = {k.removeprefix("adapter."): v for k, v in t.items() if k.startswith("adapter.")}
        if adapter:
            self._install(adapter)
            for p in self.adapter.values():
                p.requires_grad_(False)
        self.head = None

    @torch.no_grad()
    def predict(self, images: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        return (self.project(images) @ self.weight).float()


def _widen(total: torch.Tensor, increment: torch.Tensor) -> torch.Tensor:
    """The running total (M x K_old) plus a task's increment (M x K_new, K_new >= K_old)."""
    out = increment.clone()
    out[:, : total.shape[1]] += total
    return out


def choose_ridge(
    gram_fit: torch.Tensor, targets_fit: torch.Tensor, gram_val: torch.Tensor, targets_val: torch.Tensor, count_val: float
) -> float:
    """The grid's lambda with the least squared error on the held-back rows (first on ties)."""
    if count_val == 0:
        raise ValueError("ranpac: no held-back rows to choose the ridge from; raise method.validation_share or set method.ridge")
    errors = [
        float(count_val - 2 * (w * targets_val).sum() + (w * (gram_val @ w)).sum())
        for w in ridge_solve(gram_fit, targets_fit, RIDGES)
    ]  # fmt: skip
    return RIDGES[min(range(len(errors)), key=errors.__getitem__)]
