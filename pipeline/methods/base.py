"""The method interface, its typed config, and the registry (``@register_method`` / ``create_method``).

A method sees a frozen backbone, a ``Collective`` for cross-worker reductions, and one batch
at a time. The trainer owns the loop, the optimizer step, the gradient all-reduce and the
memory store; a method owns its adapters, its loss, its statistics and its task record.
The rule that keeps every worker identical: a method's state after a task is exactly what its
record restores (``end_task`` applies its own record), and statistics are reduced through the
collective before they enter the record.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from torch import nn

from pipeline.backbones import Backbone
from pipeline.config import MAX_LR, MethodConfig
from pipeline.data.stream import TaskPlan
from pipeline.errors import ConfigError
from pipeline.memory import TaskRecord


@dataclass(frozen=True)
class ParamGroup:
    """Parameters that share a learning rate (before batch scaling and the schedule)."""

    name: str
    params: list[nn.Parameter]
    lr: float


@dataclass(frozen=True)
class TaskInfo:
    index: int
    id: str
    classes: tuple[int, ...]  # stream label ids of this task's classes
    num_seen_classes: int  # label space size after this task; seen classes are [0, num_seen_classes)
    class_names: tuple[str, ...]  # names of the seen classes, by stream label id
    domain: str | None = None
    plans: tuple[TaskPlan, ...] = ()  # the stream's plan of the phase's tasks: where their rows come from


Batch = dict[str, torch.Tensor]  # image (normalised float), label, task, sample_id


class Collective(Protocol):
    """Cross-worker reductions; every rank must make the same calls in the same order."""

    rank: int
    world_size: int

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor: ...  # in-place sum
    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor: ...


class LocalCollective:
    """The single-process collective: reductions are the identity."""

    rank = 0
    world_size = 1

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor


class MethodPart(Protocol):
    """State a method composes (the exemplar memory): the base calls its hooks beside the
    method's own -- at a task's start, for the task's checkpointed buffers and statistics, for its
    share of the task's record (``parts_record``), and on restore."""

    stats: dict[str, Any]

    def begin_task(self, task: TaskInfo) -> None: ...
    def buffers(self) -> dict[str, torch.Tensor]: ...
    def end_task(self, task: TaskInfo, collective: Collective) -> TaskRecord: ...
    def restore(self, records: Sequence[TaskRecord]) -> None: ...


class MethodParams(BaseModel):
    """Hyperparameters every method has; a method's own config subclasses this.

    ``lr`` is the adapters' learning rate and ``head_lr`` the classifier head's (None: ``lr``);
    a method with further groups (mask scores, mask logits) adds its own ``*_lr`` fields. With
    ``lr_reference_batch`` set, every group's rate is given at that global batch size and scaled
    linearly to the run's (L2P's official rule: 0.03 x batch / 256).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    lr: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    head_lr: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    lr_reference_batch: int | None = Field(default=None, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0
    grad_clip: float | None = None

    @field_validator("*")
    @classmethod
    def _sane_learning_rates(cls, value: Any, info: ValidationInfo) -> Any:
        """Every ``lr``/``*_lr`` field, including a subclass's redefinition (which drops the
        base class's Field bounds): finite, positive (``min_lr`` may be 0), at most MAX_LR."""
        name = info.field_name or ""
        if value is None or not (name == "lr" or name.endswith("_lr")):
            return value
        low_ok = value >= 0 if name == "min_lr" else value > 0
        if not (math.isfinite(value) and low_ok and value <= MAX_LR):
            bound = ">= 0" if name == "min_lr" else "> 0"
            raise ValueError(f"{value!r} is not a learning rate (finite, {bound}, at most {MAX_LR:g})")
        return value


class Method(ABC):
    name: ClassVar[str]
    scenarios: ClassVar[frozenset[str]]
    Config: ClassVar[type[MethodParams]] = MethodParams
    trains_jointly: ClassVar[bool] = False  # one training phase over every task's data (the upper bound)
    zero_shot: ClassVar[bool] = False  # can score classes it has not seen: future tasks are evaluated too
    consumes_data: ClassVar[bool] = True  # False: nothing to learn from training data (zero-shot baseline)
    eval_stat_names: ClassVar[tuple[str, ...]] = ()  # what take_eval_stats may report (reduced on every rank)
    record_holds_state: ClassVar[bool] = False  # True: a task's record is the whole state (running totals)

    def __init__(self, cfg: MethodParams, backbone: Backbone, collective: Collective | None = None) -> None:
        self.cfg = cfg
        self.backbone = backbone
        self.collective: Collective = collective or LocalCollective()
        self.task: TaskInfo | None = None
        self.parts: list[MethodPart] = []

    @classmethod
    def infers_tasks_with(cls, cfg: MethodParams) -> bool:
        """Whether a method of this config tells a test sample's task itself (task-incremental
        methods with task inference): evaluation then also scores without task ids, and a
        prediction needs no task id. Asked of the class, so a caller can know before building."""
        return False

    @property
    def infers_tasks(self) -> bool:
        return type(self).infers_tasks_with(self.cfg)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @torch.no_grad()
    def frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(images)

    def begin_task(self, task: TaskInfo) -> None:
        self.task = task
        for part in self.parts:
            part.begin_task(task)

    def param_groups(self) -> list[ParamGroup]:
        """The trainable parameters of the current task, by learning-rate group."""
        return []

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for group in self.param_groups() for p in group.params]

    def pass_plan(self, passes: int) -> tuple[bool, ...]:
        """The current task's passes over its training data, given the run's ``train.passes``:
        True for a pass that takes gradient steps, False for one that only calls ``training_step``
        without gradients (statistics of the adapted model, say). The trainer calls
        ``begin_pass(i)`` before pass i."""
        return (True,) * passes

    def begin_pass(self, index: int) -> None:
        """Called before pass ``index`` of ``pass_plan`` over the current task's data."""
        return None

    def task_stats(self) -> dict[str, Any]:
        """Diagnostics of the task just ended (JSON-able), for the summary and MLflow."""
        return {k: v for part in self.parts for k, v in part.stats.items()}

    def task_buffers(self) -> dict[str, torch.Tensor]:
        """The current task's tensors besides its trainable parameters that a checkpoint inside
        the task must keep, as the live tensors (restored in place). Names starting ``sum.`` are
        per-rank partial sums that ``end_task`` all-reduces (statistics of the rows this rank
        has seen); the others are identical on every rank."""
        return {k: v for part in self.parts for k, v in part.buffers().items()}

    def task_state(self) -> dict[str, torch.Tensor]:
        """Everything the current task has learned so far, identical on every rank: the trainable
        parameters and ``task_buffers``, partial sums summed over ranks. Collective: every rank
        calls it at the same step."""
        state = {f"param.{i}": p.detach().clone() for i, p in enumerate(self.trainable_parameters())}
        for name, tensor in self.task_buffers().items():
            state[name] = self.collective.all_reduce_(tensor.clone()) if name.startswith("sum.") else tensor.clone()
        return state

    def load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        """Continue the current task (``begin_task`` done) from ``task_state``: parameters and
        buffers on every rank; the summed partial sums on rank 0 and zeros on the others, so that
        ``end_task``'s all-reduce sums every row exactly once."""
        params = self.trainable_parameters()
        buffers = self.task_buffers()
        expected = {f"param.{i}" for i in range(len(params))} | set(buffers)
        if set(state) != expected:
            raise ValueError(f"{self.name}: checkpointed task state has {sorted(set(state) ^ expected)[:3]} unlike this task")
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(state[f"param.{i}"].to(p.device))
            for name, tensor in buffers.items():
                if name.startswith("sum.") and self.collective.rank != 0:
                    tensor.zero_()
                else:
                    tensor.copy_(state[name].to(tensor.device))

    def take_eval_stats(self) -> dict[str, torch.Tensor]:
        """Sums accumulated by ``score`` since the last call, as (sum, count) tensors by name;
        the evaluator all-reduces them into a mean per test set."""
        return {}

    @abstractmethod
    def training_step(self, batch: Batch) -> torch.Tensor | None:
        """Mean loss over the batch, or None for a method that only accumulates statistics."""

    @abstractmethod
    def end_task(self) -> TaskRecord:
        """Reduce statistics across workers, apply and return the task's record."""

    def apply_record(self, record: TaskRecord) -> None:
        """Add one task's record to the state (``end_task`` applies its own record this way)."""
        raise NotImplementedError(f"{self.name}: defines neither apply_record nor restore")

    def parts_record(self) -> dict[str, torch.Tensor]:
        """The parts' share of the task's record, each part's state after the task applied.
        Collective: ``end_task`` calls it on every rank."""
        assert self.task is not None
        return {k: v for part in self.parts for k, v in part.end_task(self.task, self.collective).tensors.items()}

    def restore(self, records: Sequence[TaskRecord]) -> None:
        """Rebuild the state after ``len(records)`` tasks from their records: the parts from
        theirs, then each record applied in order, or with ``record_holds_state`` the last alone
        (it holds the running totals, or the whole state)."""
        for part in self.parts:
            part.restore(records)
        for record in records[-1:] if self.record_holds_state else records:
            self.apply_record(record)

    def predict(self, images: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, num_seen_classes); ``task_ids`` only in task-incremental evaluation. A
        classifier defines it; a method that scores classes by name defines ``score`` instead,
        and this scores every seen class by its name."""
        if type(self).score is Method.score:
            raise NotImplementedError(f"{self.name}: defines neither predict nor score")
        assert self.task is not None
        names = self.task.class_names
        return self.score(images, range(len(names)), names, task_ids)

    def score(
        self,
        images: torch.Tensor,
        candidates: Sequence[int],
        candidate_names: Sequence[str],
        task_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, len(candidates)) over the classes an evaluation asks about, by stream id
        and name. Methods with a classifier over seen classes read its columns; zero-shot
        methods score the names."""
        return self.predict(images, task_ids)[:, list(candidates)]

    def build_optimizer(
        self, total_steps: int, global_batch_size: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """One optimizer over ``param_groups()``; the cosine schedule decays every group by the
        same factor, down to ``min_lr / lr`` of its start."""
        cfg = self.cfg
        scale = global_batch_size / cfg.lr_reference_batch if cfg.lr_reference_batch else 1.0
        groups = [{"params": g.params, "lr": g.lr * scale, "name": g.name} for g in self.param_groups() if g.params]
        if cfg.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.schedule == "cosine":
            floor = cfg.min_lr / cfg.lr
            steps = max(total_steps, 1)

            def factor(step: int) -> float:
                return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))

            return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return opt, None


_METHODS: dict[str, type[Method]] = {}
ENTRY_POINT_GROUP = "strata.methods"  # a package's own methods: `name = "package.module:MethodClass"`


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def _load_entry_points(only: str | None = None) -> None:
    """Register the methods other installed packages declare in the ``strata.methods`` entry-point
    group (all of them, or the one named ``only``), importing each module on first use."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _METHODS or (only is not None and ep.name != only):
            continue
        try:
            cls = ep.load()
        except Exception as exc:  # whatever the plugin's import raises
            raise ConfigError(
                f"entry point {ep.name} = {ep.value} ({ENTRY_POINT_GROUP}): cannot be loaded ({exc.__class__.__name__}: {exc})"
            ) from None
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise ConfigError(
                f"entry point {ep.name} = {ep.value} ({ENTRY_POINT_GROUP}): not a subclass of pipeline.methods.Method"
            )
        register_method(ep.name)(cls)


def available_methods() -> dict[str, type[Method]]:
    _load_entry_points()
    return dict(sorted(_METHODS.items()))


def method_class(name: str) -> type[Method]:
    if name not in _METHODS:
        _load_entry_points(only=name)
    if name not in _METHODS:
        raise ConfigError(f"method.name: {name!r} is not a registered method (known: {', '.join(sorted(_METHODS))})")
    return _METHODS[name]


def resolve_method_params(cfg: MethodConfig, lr: float | None = None) -> MethodParams:
    """Validate ``method:`` against the method's typed config; ``lr`` is train.lr's override."""
    cls = method_class(cfg.name)
    data: dict[str, Any] = cfg.model_dump()
    if lr is not None:
        data["lr"] = lr
    try:
        return cls.Config.model_validate(data)
    except ValidationError as err:
        parts = [f"method.{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in err.errors()]
        raise ConfigError("; ".join(parts)) from None


def create_method(cfg: MethodParams, backbone: Backbone, collective: Collective | None = None) -> Method:
    return method_class(cfg.name)(cfg, backbone, collective)
