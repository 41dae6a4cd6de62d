"""Base for task-incremental methods with per-task adapters and heads (Piggyback, RKR, Mask-RKR, MEAT).

Task t owns slot t of the backbone's hook banks and its own linear head over its classes, so
nothing learned for an earlier task is ever overwritten. Subclasses say what a task's adapters
are (``new_task``), how they look during a training step (``before_step``), an optional extra
loss, what the record keeps (``task_tensors``) and how a record is installed (``install``).

Task inference (beyond the papers; ``task_inference: true``): a Gaussian of the frozen,
L2-normalised features per task (``gaussian.py``, shared with DIKI), accumulated in the same
pass. Without a task id, each sample goes to its most likely task's adapters and head; the
evaluation then reports class-incremental accuracy and task-inference accuracy as well. The
covariance is shrunk toward its diagonal, (1 - rho) S + rho diag(S) + eps I, with rho =
``gaussian_shrinkage`` ("auto": OAS, see ``gaussian.py``): a task's few hundred samples in a
384-768-d feature space make S singular, and an unshrunk S overfits the training samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.memory import TaskRecord
from pipeline.methods.base import Batch, Method, MethodParams, ParamGroup, TaskInfo
from pipeline.methods.gaussian import GaussianAccumulator, ShrinkageParam, TaskGaussians, gaussian_record


class TaskwiseParams(MethodParams):
    task_inference: bool = False
    gaussian_eps: float = 1e-4
    gaussian_shrinkage: ShrinkageParam = "auto"  # toward diag(S); "auto": OAS (gaussian.py)


def set_slot(bank: Sequence[Any], slot: int, value: Any) -> list[Any]:
    """``bank`` with entry ``slot`` set (appended when it is the next one)."""
    items = list(bank)
    if slot == len(items):
        items.append(value)
    else:
        items[slot] = value
    return items


class TaskwiseMethod(Method):
    scenarios = frozenset({"til"})
    cfg: TaskwiseParams

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.heads: list[nn.Linear] = []
        self.head_classes: list[tuple[int, ...]] = []
        self.gaussians = TaskGaussians()
        self._accumulator: GaussianAccumulator | None = None
        self._groups: list[ParamGroup] = []

    @classmethod
    def infers_tasks_with(cls, cfg: MethodParams) -> bool:
        return isinstance(cfg, TaskwiseParams) and cfg.task_inference

    @property
    def slot(self) -> int:
        return len(self.heads) - 1

    # --- subclass hooks ---
    def new_task(self, slot: int) -> list[ParamGroup]:
        """Create slot ``slot``'s trainable adapters, put them in the banks, return them by lr group."""
        raise NotImplementedError

    def before_step(self, slot: int) -> None:
        """Refresh the banks from the trainable parameters (straight-through masks, ...). A
        binary mask the step uses is what the record keeps: ``task_tensors`` reads the masks of
        the last training forward, not a re-thresholding after the last update, so evaluation
        runs exactly the adapters that the head was trained with."""

    def extra_loss(self) -> torch.Tensor | float:
        return 0.0

    def task_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        """What the record keeps of slot ``slot`` (binarised and bit-packed where masks)."""
        raise NotImplementedError

    def install(self, tensors: dict[str, torch.Tensor], slot: int) -> None:
        """Put a record's fixed tensors into the banks at ``slot``."""
        raise NotImplementedError

    # --- the method ---
    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self.heads.append(nn.Linear(self.backbone.feature_dim, len(task.classes), device=self.device))
        self.head_classes.append(task.classes)
        self._groups = [
            *self.new_task(self.slot),
            ParamGroup("head", list(self.heads[-1].parameters()), self.cfg.head_lr or self.cfg.lr),
        ]
        self._local = torch.full((task.num_seen_classes,), -1, dtype=torch.long, device=self.device)
        self._local[list(task.classes)] = torch.arange(len(task.classes), device=self.device)
        self._accumulator = GaussianAccumulator(self.backbone.feature_dim, self.device) if self.infers_tasks else None

    def param_groups(self) -> list[ParamGroup]:
        return self._groups

    def task_buffers(self) -> dict[str, torch.Tensor]:
        return self._accumulator.buffers("gaussian") if self._accumulator is not None else {}

    def training_step(self, batch: Batch) -> torch.Tensor:
        images = batch["image"]
        if self._accumulator is not None:
            self._accumulator.update(F.normalize(self.frozen_features(images).float(), dim=-1))
        self.before_step(self.slot)
        with self.backbone.routing(self.slot):
            logits = self.heads[self.slot](self.backbone.features(images))
        return F.cross_entropy(logits, self._local[batch["label"]]) + self.extra_loss()

    def end_task(self) -> TaskRecord:
        slot = self.slot
        tensors = self.task_tensors(slot)
        tensors |= {"head.weight": self.heads[slot].weight.detach().clone(), "head.bias": self.heads[slot].bias.detach().clone()}
        if self._accumulator is not None:
            self._accumulator.reduce(self.collective)
            mean, cov = self._accumulator.finalize(self.cfg.gaussian_eps, self.cfg.gaussian_shrinkage)
            tensors |= gaussian_record(mean, cov)
        record = TaskRecord(tensors, meta={"classes": list(self.head_classes[slot])})
        self.heads.pop(), self.head_classes.pop()
        self.apply_record(record)
        return record

    def apply_record(self, record: TaskRecord) -> None:
        t = record.tensors
        slot = len(self.heads)
        head = nn.Linear(t["head.weight"].shape[1], t["head.weight"].shape[0], device=self.device).requires_grad_(False)
        head.weight.copy_(t["head.weight"]), head.bias.copy_(t["head.bias"])
        self.heads.append(head)
        self.head_classes.append(tuple(record.meta["classes"]))
        self.install({k: v.to(self.device) for k, v in t.items()}, slot)
        if "gaussian.mean" in t:
            self.gaussians.add_record(t, self.device)

    @torch.no_grad()
    def infer_tasks(self, images: torch.Tensor) -> torch.Tensor:
        if not len(self.gaussians):
            raise RuntimeError(f"{self.name}: task inference needs method.task_inference: true")
        return self.gaussians.log_likelihood(F.normalize(self.frozen_features(images).float(), dim=-1)).argmax(dim=1)

    @torch.no_grad()
    def score(self, images, candidates, candidate_names, task_ids=None) -> torch.Tensor:
        """Each sample through its task's adapters and head (task id given, or inferred);
        that head's logits go to its classes' columns, -inf elsewhere."""
        tasks = task_ids if task_ids is not None else self.infer_tasks(images)
        column = {c: i for i, c in enumerate(candidates)}
        logits = torch.full((len(images), len(column)), float("-inf"), device=images.device)
        with self.backbone.routing(tasks):
            features = self.backbone.features(images)
        for t in torch.unique(tasks).tolist():
            rows = torch.nonzero(tasks == t).flatten()
            pairs = [(i, column[c]) for i, c in enumerate(self.head_classes[t]) if c in column]
            if pairs:
                head_logits = self.heads[t](features[rows])
                src, dst = zip(*pairs, strict=True)
                logits[rows.unsqueeze(1), torch.tensor(dst, device=images.device)] = head_logits[:, list(src)]
        return logits

    def predict(self, images: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        assert self.task is not None
        return self.score(images, range(self.task.num_seen_classes), self.task.class_names, task_ids)
