"""Resolve a stream config into a validated plan: tasks, chunks, and one global label space.

The stream's label space is the ordered union of class names, by first appearance. Tasks that
name the same class share it (PACS photo and sketch; every DIL domain), and the classes seen
after task t are always the prefix ``[0, num_seen(t))`` of that space, so a head over "all
classes seen so far" only ever grows at the end.

Everything here runs in the driver before the first task trains. It reads only metadata and
the label column, never the images.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from pipeline.config import Source, StreamConfig, TaskConfig
from pipeline.data.sources import Chunk, reader_for
from pipeline.errors import DataError


@dataclass(frozen=True)
class SplitPlan:
    source: Source
    chunks: tuple[Chunk, ...]
    num_samples: int  # after the class subset


@dataclass(frozen=True)
class TaskPlan:
    index: int
    id: str
    domain: str | None
    class_names: tuple[str, ...]  # this task's classes, in task order
    classes: tuple[int, ...]  # their ids in the stream's label space
    label_map: tuple[int, ...]  # source label -> stream label, -1 where dropped
    train: SplitPlan
    test: SplitPlan


@dataclass(frozen=True)
class StreamPlan:
    scenario: str
    tasks: tuple[TaskPlan, ...]
    class_names: tuple[str, ...]

    def num_seen(self, task_index: int) -> int:
        """Size of the label space after training task ``task_index``."""
        return 1 + max(c for t in self.tasks[: task_index + 1] for c in t.classes)


def _source_classes(task: TaskConfig) -> list[str]:
    if task.classes is not None:
        return list(task.classes)
    names = reader_for(task.train.type).class_names(task.train)
    if names is None:
        raise DataError(f"task '{task.id}': no class names given and the train source has no 'classes' metadata")
    test_names = reader_for(task.test.type).class_names(task.test)
    if test_names is not None and test_names != names:
        raise DataError(f"task '{task.id}': test classes {test_names} differ from train classes {names}")
    return names


def _kept_labels(task: TaskConfig, names: list[str]) -> list[int]:
    if task.class_subset is None:
        return list(range(len(names)))
    kept = []
    for item in task.class_subset:
        if isinstance(item, str):
            if item not in names:
                raise DataError(f"task '{task.id}': class_subset names {item!r}, which is not among {names}")
            kept.append(names.index(item))
        elif not 0 <= item < len(names):
            raise DataError(f"task '{task.id}': class_subset label {item} is outside 0..{len(names) - 1}")
        else:
            kept.append(item)
    if len(set(kept)) != len(kept):
        raise DataError(f"task '{task.id}': class_subset lists a class twice")
    return kept


def _count(task: TaskConfig, split: str, label_map: np.ndarray) -> int:
    source = getattr(task, split)
    n = 0
    for block in reader_for(source.type).labels(source):
        kept_rows = (block.first_row + np.arange(len(block.labels))) % source.every == 0
        bad = np.flatnonzero((block.labels < 0) | (block.labels >= len(label_map)))
        if len(bad):
            row = block.first_row + int(bad[0])
            raise DataError(
                f"task '{task.id}' {split}: {block.location}: label {int(block.labels[bad[0]])} at row {row} "
                f"is outside the {len(label_map)} classes"
            )
        n += int(((label_map[block.labels] >= 0) & kept_rows).sum())
    if n == 0:
        subset = " in its class_subset" if task.class_subset is not None else ""
        raise DataError(f"task '{task.id}': the {split} split has no samples{subset}")
    return n


def resolve_stream(cfg: StreamConfig, rows_per_chunk: int) -> StreamPlan:
    if not cfg.tasks:
        raise DataError("stream: no tasks")
    dupes = [tid for tid, n in Counter(t.id for t in cfg.tasks).items() if n > 1]
    if dupes:
        raise DataError(f"stream: duplicate task id '{dupes[0]}'")
    space: list[str] = []
    tasks = []
    for index, task in enumerate(cfg.tasks):
        names = _source_classes(task)
        kept = _kept_labels(task, names)
        task_names = tuple(task.rename.get(names[lab], names[lab]) for lab in kept)
        unknown = set(task.rename) - set(names)
        if unknown:
            raise DataError(f"task '{task.id}': rename names class {sorted(unknown)[0]!r}, which is not among {names}")
        for name in task_names:
            if name not in space:
                space.append(name)
        label_map = np.full(len(names), -1, dtype=np.int64)
        for lab, name in zip(kept, task_names, strict=True):
            label_map[lab] = space.index(name)
        splits = {}
        for split in ("train", "test"):
            source = getattr(task, split)
            chunks = tuple(reader_for(source.type).chunks(source, rows_per_chunk))
            splits[split] = SplitPlan(source, chunks, _count(task, split, label_map))
        tasks.append(
            TaskPlan(
                index=index,
                id=task.id,
                domain=task.domain,
                class_names=task_names,
                classes=tuple(int(label_map[lab]) for lab in kept),
                label_map=tuple(int(v) for v in label_map),
                train=splits["train"],
                test=splits["test"],
            )
        )
    return StreamPlan(scenario=cfg.scenario, tasks=tuple(tasks), class_names=tuple(space))
