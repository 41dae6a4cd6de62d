"""A run's position in its stream and its results so far: what every checkpoint carries.

``Progress`` is written by rank 0 into each task's Ray Train checkpoint (``progress.json``) and
read back by a restarted worker group, by a continued run and by the driver's summary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray.train

from pipeline import jsonout

PROGRESS_FILE = "progress.json"


@dataclass(frozen=True)
class Phase:
    tasks: tuple[int, ...]  # whose training data this phase consumes
    row: int  # the accuracy-matrix row it fills


def make_phases(num_tasks: int, joint: bool) -> tuple[Phase, ...]:
    if joint:
        return (Phase(tuple(range(num_tasks)), num_tasks - 1),)
    return tuple(Phase((i,), i) for i in range(num_tasks))


@dataclass
class Progress:
    """The stream's position and results so far; the checkpoint of a run."""

    num_tasks: int
    phases_done: int = 0
    records: int = 0
    accuracy_matrix: list[list[float | None]] = field(default_factory=list)
    samples_seen: list[int] = field(default_factory=list)  # by this run (0 for tasks learned by an earlier run)
    train_loss: list[float | None] = field(default_factory=list)
    phase_wall_s: list[float] = field(default_factory=list)  # of each phase this run trained
    train_wall_s: list[float] = field(default_factory=list)  # of each phase: the pass and end_task, no evaluation
    model_versions: list[str | None] = field(default_factory=list)  # registered after each task (tracking.model_name)
    steps: list[int | None] = field(default_factory=list)  # optimizer steps of each phase this run trained
    task_stats: list[dict[str, Any] | None] = field(default_factory=list)  # Method.task_stats() after each phase
    eval_stats: dict[str, list[list[float | None]]] = field(default_factory=dict)  # Method.take_eval_stats(), by name
    # Methods that infer tasks (til methods with task_inference): the same rows without task ids.
    cil_accuracy_matrix: list[list[float | None]] | None = None
    task_inference_matrix: list[list[float | None]] | None = None
    started_at: int = 0  # phases before this one were learned by earlier runs (memory.resume): not this run's to register
    resumes: int = 0  # worker-group starts from a checkpoint: restarts after a failure, continued runs

    def __post_init__(self) -> None:
        t = self.num_tasks
        self.accuracy_matrix = self.accuracy_matrix or [[None] * t for _ in range(t)]
        self.samples_seen = self.samples_seen or [0] * t
        self.train_loss = self.train_loss or [None] * t
        self.model_versions = self.model_versions or [None] * t
        self.steps = self.steps or [None] * t
        self.task_stats = self.task_stats or [None] * t

    def record_eval_stats(self, row: int, column: int, stats: dict[str, float]) -> None:
        for name, value in stats.items():
            matrix = self.eval_stats.setdefault(name, [[None] * self.num_tasks for _ in range(self.num_tasks)])
            matrix[row][column] = value

    @classmethod
    def resumed(cls, num_tasks: int, learned: int, prior_accuracy: Sequence[Sequence[float | None]] = ()) -> Progress:
        """The start of a stream whose first ``learned`` tasks an earlier run put in the memory store."""
        progress = cls(num_tasks, phases_done=learned, records=learned, started_at=learned)
        for i, row in enumerate(prior_accuracy[:learned]):
            progress.accuracy_matrix[i][: len(row)] = list(row)[:num_tasks]
        return progress

    @classmethod
    def from_checkpoint(cls, checkpoint: ray.train.Checkpoint | None, start: Progress) -> Progress:
        if checkpoint is None:
            return start
        with checkpoint.as_directory() as path:
            return cls.from_directory(Path(path))

    @classmethod
    def from_directory(cls, directory: Path) -> Progress:
        return cls(**json.loads((directory / PROGRESS_FILE).read_text()))

    def write(self, directory: Path) -> None:
        (directory / PROGRESS_FILE).write_text(jsonout.dumps(asdict(self)))


def flat_stats(stats: dict[str, Any]) -> dict[str, float]:
    """A method's task stats as MLflow metrics: scalars as they are, lists as ``name/i``; None
    (nothing to report, e.g. a task that saw no rows) is left out."""
    flat: dict[str, float] = {}
    for name, value in stats.items():
        if isinstance(value, list | tuple):
            flat |= {f"{name}/{i}": float(v) for i, v in enumerate(value) if v is not None}
        elif value is not None:
            flat[name] = float(value)
    return flat


def phase_metrics(progress: Progress, phase: Phase) -> dict[str, float]:
    """The metrics of a finished phase, from progress alone (so that a restarted worker tags a
    registry version exactly as the original would have)."""
    row = phase.row
    acc = progress.accuracy_matrix[row]
    filled = [(i, r) for i, r in enumerate(progress.accuracy_matrix[: row + 1]) if r[i] is not None]  # rows scored
    metrics: dict[str, float | None] = {
        "train_loss": progress.train_loss[row],
        "samples": float(sum(progress.samples_seen[i] for i in phase.tasks)),
    }
    if acc[row] is not None:  # this row was scored (eval.every)
        metrics["avg_seen_acc"] = sum(v for v in acc[: row + 1] if v is not None) / (row + 1)  # last_acc if the stream ends here
        metrics["running_avg_acc"] = sum(sum(r[: i + 1]) / (i + 1) for i, r in filled) / len(filled)  # avg_acc if it ends here
    metrics |= {f"acc/task_{j}": v for j, v in enumerate(acc) if v is not None}
    metrics |= flat_stats(progress.task_stats[row] or {})
    return {k: v for k, v in metrics.items() if v is not None}
