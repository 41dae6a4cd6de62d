"""A diagnostic method for tests: records how often each sample id was trained on.

Its config class lives here, so a Ray worker that unpickles the job imports this module and
the method registers itself there too.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import ray
import torch

from pipeline.memory import TaskRecord
from pipeline.methods import Batch, Method, MethodParams, ParamGroup, TaskInfo, register_method
from pipeline.methods.ncm import NCM


class SampleCounterConfig(MethodParams):
    max_id: int = 1024


def ray_actor_processes() -> list[str]:
    """The Ray actors of this process's raylet (its parent: every worker of a node is the
    raylet's child, so another Ray on the machine does not count), one entry per process, by
    class (``ray::Class`` or ``ray::Class.method``); pooled idle workers and tasks
    (``ray::fn(...)``) are left out."""
    raylet = os.getppid()
    names = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv0 = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
            parent = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, UnicodeDecodeError, ValueError, IndexError):
            continue
        if parent == raylet and argv0.startswith("ray::") and argv0 != "ray::IDLE" and "(" not in argv0:
            names.append(argv0.split(".")[0])
    return sorted(names)


@register_method("sample_counter")
class SampleCounter(Method):
    """Counts training visits per (task, sample id), all-reduced across workers, and the Ray actor
    processes alive when each task begins."""

    scenarios = frozenset({"cil", "dil", "til"})
    Config = SampleCounterConfig

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self.visits = torch.zeros(self.cfg.max_id, dtype=torch.int64)
        self.ranks_seen = torch.zeros(8, dtype=torch.int64)
        self.actors = len(ray_actor_processes())

    def task_stats(self) -> dict[str, float]:
        return {"ray_actor_processes": float(self.actors)}

    def training_step(self, batch: Batch) -> None:
        self.visits.index_add_(0, batch["sample_id"].cpu(), torch.ones_like(batch["sample_id"].cpu()))
        self.ranks_seen[self.collective.rank] += len(batch["sample_id"])

    def end_task(self) -> TaskRecord:
        return TaskRecord(
            {"visits": self.collective.all_reduce_(self.visits), "per_rank": self.collective.all_reduce_(self.ranks_seen)}
        )

    def restore(self, records: Sequence[TaskRecord]) -> None:
        pass

    def predict(self, images: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(len(images), self.task.num_seen_classes if self.task else 1)


class NanAtConfig(MethodParams):
    lr: float = 0.1
    task: int = 1  # the task whose training diverges
    step: int = 2  # from this step of that task on, the loss is NaN


@register_method("nan_at")
class NanAt(Method):
    """A bias-only classifier whose loss turns NaN at a chosen step: the divergence tests."""

    scenarios = frozenset({"cil"})
    Config = NanAtConfig

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self.bias = torch.nn.Parameter(torch.zeros(task.num_seen_classes, device=self.device))
        self.steps = 0

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("bias", [self.bias], self.cfg.lr)]

    def training_step(self, batch: Batch) -> torch.Tensor:
        self.steps += 1
        loss = torch.nn.functional.cross_entropy(self.bias.expand(len(batch["label"]), -1), batch["label"])
        assert self.task is not None
        if self.task.index == self.cfg.task and self.steps >= self.cfg.step:
            loss = loss * torch.tensor(float("nan"))
        return loss

    def end_task(self) -> TaskRecord:
        return TaskRecord({"bias": self.bias.detach()})

    def restore(self, records: Sequence[TaskRecord]) -> None:
        pass

    def predict(self, images: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.bias.detach().expand(len(images), -1)


class PausingCounterConfig(SampleCounterConfig):
    pause_file: str = ""  # while this file exists, training of task `pause_task` waits (and says so in PAUSE_FILE.waiting)
    pause_task: int = 1


@register_method("pausing_counter")
class PausingCounter(SampleCounter):
    """``sample_counter`` that holds still inside a chosen task while a file exists: a run the
    fault tests can interrupt mid-task, at a moment they choose rather than one they race."""

    Config = PausingCounterConfig

    def training_step(self, batch: Batch) -> None:
        assert self.task is not None
        pause = Path(self.cfg.pause_file)
        while self.task.index == self.cfg.pause_task and self.cfg.pause_file and pause.exists():
            Path(f"{pause}.waiting").touch()
            time.sleep(0.1)
        super().training_step(batch)


class KillAtConfig(MethodParams):
    lr: float = 0.01
    max_id: int = 1024
    kill_task: int = 1  # on rank 1, at this task's step `kill_step`, the worker process SIGKILLs itself
    kill_step: int = 0  # 0: never
    marker: str = ""  # written before the kill: the restarted group does not kill again; reads are logged next to it
    node_loss: bool = (
        False  # instead: the rank on the node named in `marker`.arm writes that id to `marker`, then waits for the node to go
    )


@register_method("kill_at")
class KillAt(NCM):
    """The worker-restart test's method: NCM's class means (order-invariant sums, so a resumed
    run's predictions can be compared exactly) plus a linear probe trained by Adam (so the
    optimizer's state crosses the restart), counting each sample's steps (a partial sum,
    checkpointed inside the task); its rank-1 worker kills its own process once, mid-task."""

    scenarios = frozenset({"cil"})
    Config = KillAtConfig

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self.probe = torch.nn.Linear(self.backbone.feature_dim, task.num_seen_classes, device=self.device)
        self.visits = torch.zeros(self.cfg.max_id, dtype=torch.int64, device=self.device)
        self.steps = 0
        if self.cfg.marker:  # where each rank of each worker group ran
            with open(f"{self.cfg.marker}.nodes", "a") as fh:
                fh.write(f"{os.getpid()} {self.collective.rank} {ray.get_runtime_context().get_node_id()}\n")

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("probe", list(self.probe.parameters()), self.cfg.lr)]

    def task_buffers(self) -> dict[str, torch.Tensor]:
        return super().task_buffers() | {"sum.visits": self.visits}

    def training_step(self, batch: Batch) -> torch.Tensor:
        assert self.task is not None
        self.steps += 1
        marker = Path(self.cfg.marker)
        due = self.task.index == self.cfg.kill_task and self.steps == self.cfg.kill_step and not marker.exists()
        if self.cfg.node_loss and self.task.index == self.cfg.kill_task:
            time.sleep(0.3)  # slow enough for the test to choose a node while the task runs
            arm = Path(f"{marker}.arm")  # the test writes the node to remove, once a checkpoint is in
            node = ray.get_runtime_context().get_node_id()
            if arm.exists() and arm.read_text() == node and not marker.exists():
                marker.write_text(node)
                time.sleep(300.0)  # the test removes this node mid-step: the process dies with it
                raise AssertionError(f"node {node} was not removed")
            return self._step(batch, marker)
        if due and self.collective.rank == 1:
            marker.write_text(str(os.getpid()))
            time.sleep(3.0)  # long enough for Train's controller to register the last checkpoint (it polls workers)
            os.kill(os.getpid(), signal.SIGKILL)
        return self._step(batch, marker)

    def _step(self, batch: Batch, marker: Path) -> torch.Tensor:
        assert self.task is not None
        with open(f"{marker}.reads.{os.getpid()}", "a") as fh:  # every row a worker trains on, restarts included
            fh.write("".join(f"{self.task.index} {int(i)}\n" for i in batch["sample_id"]))
        self.visits.index_add_(0, batch["sample_id"], torch.ones_like(batch["sample_id"]))
        super().training_step(batch)
        return torch.nn.functional.cross_entropy(self.probe(self.frozen_features(batch["image"])), batch["label"])

    def end_task(self) -> TaskRecord:
        record = super().end_task()
        record.tensors["visits"] = self.collective.all_reduce_(self.visits.clone())
        record.tensors["probe.weight"] = self.probe.weight.detach().clone()
        return record
