"""Resolve a stream config into a validated plan: tasks, chunks, and one global label space.

The stream's label space is the ordered union of class names, by first appearance. Tasks that
name the same class share it (PACS photo and sketch; every DIL domain), and the classes seen
after task t are always the prefix ``[0, num_seen(t))`` of that space, so a head over "all
classes seen so far" only ever grows at the end.

Everything here runs in the driver before the first task trains. It reads only metadata and
the label column, never the images. A task is planned from its data once: the memory store
keeps the plan with the task's record (``task_plan_record``), and a later run that restores the
task from the store (``memory.resume``, a retrain, a continued run) plans it from that record
(``learned``) without opening its training data, which may have been deleted since.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from pipeline.config import Source, StreamConfig, TaskConfig
from pipeline.data.sources import Chunk, read_chunks, reader_for
from pipeline.errors import DataError


@dataclass(frozen=True)
class RowSelection:
    """Which rows of a source a split reads, decided by sample id alone (so any worker agrees).

    ``every``: keep ids divisible by k. ``holdout``: the fraction of rows carved out of a task's
    training data as its validation split, by a hash of (id, seed); ``part`` says whether this
    split is the rows left to fit on, or the validation rows.
    """

    every: int = 1
    holdout: float = 0.0
    part: Literal["all", "fit", "validation"] = "all"
    seed: int = 0

    def mask(self, sample_ids: np.ndarray) -> np.ndarray:
        keep = sample_ids % self.every == 0
        if self.part == "all":
            return keep
        mixed = (sample_ids.astype(np.uint64) + np.uint64(self.seed)) * np.uint64(0x9E3779B97F4A7C15)
        in_validation = (mixed >> np.uint64(11)).astype(np.float64) / 2.0**53 < self.holdout
        return keep & (in_validation if self.part == "validation" else ~in_validation)


def sample_hash(sample_ids: np.ndarray, salt: int) -> np.ndarray:
    """A number in [0, 1) per sample id, fixed by (id, salt) alone: splitmix64's finaliser, so
    subsets drawn with it are independent of ``RowSelection``'s validation rows."""
    z = sample_ids.astype(np.uint64) + np.uint64(
        salt * 0x9E3779B97F4A7C15 % 2**64
    )  # wraps like uint64, without numpy's overflow warning
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


ALL_ROWS = RowSelection()


@dataclass(frozen=True)
class SplitPlan:
    source: Source
    chunks: tuple[Chunk, ...]  # empty for a learned task's training data: it is never read again
    num_samples: int  # after the class subset and the row selection
    rows: RowSelection = ALL_ROWS
    label_counts: tuple[tuple[int, int], ...] | None = None  # (stream label, samples), from the planning scan


def read_encoded(split: SplitPlan, sample_ids: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    """The original encoded bytes and source labels of the split's rows ``sample_ids``, in that
    order, reading only the chunks that hold them; an id the split does not select is an error."""
    wanted = np.asarray(sample_ids, dtype=np.int64)
    where = getattr(split.source, "path", None) or f"generator {getattr(split.source, 'name', '?')}"
    if not split.rows.mask(wanted).all():
        raise DataError(f"{where}: sample ids {wanted[~split.rows.mask(wanted)][:3].tolist()} are not rows of this split")
    found: dict[int, tuple[bytes, int]] = {}
    needed = [c for c in split.chunks if ((wanted >= c.first_id) & (wanted < c.first_id + c.num_rows)).any()]
    for rows in read_chunks(needed):
        inside = wanted[(wanted >= rows.sample_ids[0]) & (wanted <= rows.sample_ids[-1])]
        for i in (inside - rows.sample_ids[0]).tolist():
            assert rows.labels is not None
            found[int(rows.sample_ids[i])] = (rows.images[i].as_py(), int(rows.labels[i]))
    missing = [int(i) for i in wanted if int(i) not in found]
    if missing:
        raise DataError(f"{where}: no rows with sample ids {missing[:3]}")
    return [found[int(i)][0] for i in wanted], np.array([found[int(i)][1] for i in wanted], dtype=np.int64)


@dataclass(frozen=True)
class TaskPlan:
    index: int
    id: str
    domain: str | None
    class_names: tuple[str, ...]  # this task's classes, in task order
    classes: tuple[int, ...]  # their ids in the stream's label space
    label_map: tuple[int, ...]  # source label -> stream label, -1 where dropped
    train: SplitPlan  # the rows trained on: all of them, or all but the validation rows
    test: SplitPlan | None  # None when the stream is planned for validation only (sweeps)
    validation: SplitPlan | None = None  # rows carved out of the training source


def task_rows(task: TaskPlan) -> tuple[np.ndarray, np.ndarray]:
    """Sample ids (ascending) and stream labels of every row the task trains on, from the label
    column alone (no image is read)."""
    source, rows = task.train.source, task.train.rows
    lookup = np.asarray(task.label_map, dtype=np.int64)
    ids, labels = [], []
    for block in reader_for(source.type).labels(source):
        block_ids = block.first_row + np.arange(len(block.labels), dtype=np.int64)
        mapped = lookup[block.labels]
        keep = (mapped >= 0) & rows.mask(block_ids)
        ids.append(block_ids[keep])
        labels.append(mapped[keep])
    ids_all, labels_all = np.concatenate(ids or [np.zeros(0, np.int64)]), np.concatenate(labels or [np.zeros(0, np.int64)])
    order = np.argsort(ids_all, kind="stable")
    return ids_all[order], labels_all[order]


@dataclass(frozen=True)
class StreamPlan:
    scenario: str
    tasks: tuple[TaskPlan, ...]
    class_names: tuple[str, ...]

    def num_seen(self, task_index: int) -> int:
        """Size of the label space after training task ``task_index``."""
        return 1 + max(c for t in self.tasks[: task_index + 1] for c in t.classes)


def _source_classes(task: TaskConfig, with_test: bool) -> list[str]:
    if task.classes is not None:
        return list(task.classes)
    names = reader_for(task.train.type).class_names(task.train)
    if names is None:
        raise DataError(f"task '{task.id}': no class names given and the train source has no 'classes' metadata")
    if not with_test:
        return names
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


def _count(task: TaskConfig, split: str, label_map: np.ndarray, rows: RowSelection) -> tuple[tuple[int, int], ...]:
    """Samples per stream label in the split, from one scan of its label column."""
    source = task.test if split == "test" else task.train
    counts = np.zeros(max(int(label_map.max()) + 1, 1), dtype=np.int64)
    for block in reader_for(source.type).labels(source):
        kept_rows = rows.mask(block.first_row + np.arange(len(block.labels), dtype=np.int64))
        bad = np.flatnonzero((block.labels < 0) | (block.labels >= len(label_map)))
        if len(bad):
            row = block.first_row + int(bad[0])
            raise DataError(
                f"task '{task.id}' {split}: {block.location}: label {int(block.labels[bad[0]])} at row {row} "
                f"is outside the {len(label_map)} classes"
            )
        mapped = label_map[block.labels]
        counts += np.bincount(mapped[(mapped >= 0) & kept_rows], minlength=len(counts))
    if counts.sum() == 0:
        subset = " in its class_subset" if task.class_subset is not None else ""
        raise DataError(f"task '{task.id}': the {split} split has no samples{subset}")
    return tuple((c, int(n)) for c, n in enumerate(counts) if n)


PLAN_FORMAT = "strata-task-plan/1"


def task_plan_record(task: TaskPlan, config: TaskConfig) -> dict[str, Any]:
    """What planning ``task`` found, as JSON for its memory-store record: the task's config (a
    later stream must name the same), its classes and label map, its training rows' count and
    label histogram, and its test split's chunks and count."""
    record: dict[str, Any] = {
        "format": PLAN_FORMAT,
        "config": config.model_dump(mode="json"),
        "domain": task.domain,
        "class_names": list(task.class_names),
        "classes": list(task.classes),
        "label_map": list(task.label_map),
        "train": {
            "num_samples": task.train.num_samples, "rows": asdict(task.train.rows),
            "label_counts": None if task.train.label_counts is None else [list(p) for p in task.train.label_counts],
        },
    }  # fmt: skip
    if task.test is not None:
        record["test"] = {
            "num_samples": task.test.num_samples, "rows": asdict(task.test.rows), "chunks": [asdict(c) for c in task.test.chunks],
            "label_counts": None if task.test.label_counts is None else [list(p) for p in task.test.label_counts],
        }  # fmt: skip
    return record


def _from_record(index: int, task: TaskConfig, record: Mapping[str, Any], with_test: bool) -> TaskPlan | None:
    """The plan of a learned task from its record, or None when the record does not describe this
    task as the stream now configures it (then it is planned from its data)."""
    if record.get("format") != PLAN_FORMAT or record["config"] != task.model_dump(mode="json"):
        return None
    if with_test and "test" not in record:
        return None
    stored_counts = record["train"]["label_counts"]
    counts = None if stored_counts is None else tuple((int(c), int(n)) for c, n in stored_counts)
    train = SplitPlan(
        task.train, (), record["train"]["num_samples"], RowSelection(**record["train"]["rows"]), counts
    )  # never read again
    test = None
    if with_test:
        stored = record["test"]
        test_counts = None if stored["label_counts"] is None else tuple((int(c), int(n)) for c, n in stored["label_counts"])
        chunks = tuple(Chunk(**c) for c in stored["chunks"])
        test = SplitPlan(task.test, chunks, stored["num_samples"], RowSelection(**stored["rows"]), test_counts)
    return TaskPlan(
        index=index, id=task.id, domain=record["domain"], class_names=tuple(record["class_names"]), classes=tuple(record["classes"]),
        label_map=tuple(record["label_map"]), train=train, test=test,
    )  # fmt: skip


def resolve_stream(
    cfg: StreamConfig,
    rows_per_chunk: int,
    *,
    holdout: float = 0.0,
    seed: int = 0,
    with_test: bool = True,
    learned: Sequence[Mapping[str, Any] | None] = (),
) -> StreamPlan:
    """Validate and plan the stream. ``holdout`` > 0 carves that fraction of each task's training
    rows out as its validation split; ``with_test=False`` never opens a test source. ``learned``
    holds the plan records of the stream's first tasks, restored from the memory store: such a
    task is not trained again, so it is planned from its record (no training chunks) whenever
    the record matches its config (and there is no validation split to carve)."""
    if not cfg.tasks:
        raise DataError("stream: no tasks")
    dupes = [tid for tid, n in Counter(t.id for t in cfg.tasks).items() if n > 1]
    if dupes:
        raise DataError(f"stream: duplicate task id '{dupes[0]}'")
    space: list[str] = []
    tasks: list[TaskPlan] = []
    for index, task in enumerate(cfg.tasks):
        record = learned[index] if index < len(learned) and not holdout else None
        restored = _restored(index, task, record, with_test, space) if record is not None else None
        selections = {} if restored is not None else _selections(task, holdout, seed, with_test)
        tasks.append(restored or _plan_task(index, task, rows_per_chunk, selections, with_test, space))
    return StreamPlan(scenario=cfg.scenario, tasks=tuple(tasks), class_names=tuple(space))


def _restored(index: int, task: TaskConfig, record: Mapping[str, Any], with_test: bool, space: list[str]) -> TaskPlan | None:
    """The task planned from its record, or None when the record no longer fits: its config
    changed, or its classes would land elsewhere in the label space as planned so far. ``space``
    grows by the task's new classes when the record is used."""
    restored = _from_record(index, task, record, with_test)
    if restored is None:
        return None
    grown = space + [name for name in restored.class_names if name not in space]
    if tuple(grown.index(name) for name in restored.class_names) != restored.classes:
        return None
    space[:] = grown
    return restored


def _selections(task: TaskConfig, holdout: float, seed: int, with_test: bool) -> dict[str, RowSelection]:
    """The rows of each split planned for a task: training (less the validation rows), validation, test."""
    selections = {"train": RowSelection(task.train.every, holdout, "fit" if holdout else "all", seed)}
    if holdout:
        selections["validation"] = RowSelection(task.train.every, holdout, "validation", seed)
    if with_test:
        selections["test"] = RowSelection(task.test.every)
    return selections


def _plan_task(
    index: int,
    task: TaskConfig,
    rows_per_chunk: int,
    selections: Mapping[str, RowSelection],
    with_test: bool,
    space: list[str],
) -> TaskPlan:
    """A task planned from its sources; ``space`` (the stream's label space) grows by its new classes."""
    names = _source_classes(task, with_test)
    kept = _kept_labels(task, names)
    task_names = tuple(task.rename.get(names[lab], names[lab]) for lab in kept)
    unknown = set(task.rename) - set(names)
    if unknown:
        raise DataError(f"task '{task.id}': rename names class {sorted(unknown)[0]!r}, which is not among {names}")
    space.extend(dict.fromkeys(name for name in task_names if name not in space))
    label_map = np.full(len(names), -1, dtype=np.int64)
    for lab, name in zip(kept, task_names, strict=True):
        label_map[lab] = space.index(name)
    splits: dict[str, SplitPlan] = {}
    for split, rows in selections.items():
        source = task.test if split == "test" else task.train
        chunks = tuple(reader_for(source.type).chunks(source, rows_per_chunk))
        counts = _count(task, split, label_map, rows)
        splits[split] = SplitPlan(source, chunks, sum(n for _, n in counts), rows, counts)
    return TaskPlan(
        index=index,
        id=task.id,
        domain=task.domain,
        class_names=task_names,
        classes=tuple(int(label_map[lab]) for lab in kept),
        label_map=tuple(int(v) for v in label_map),
        train=splits["train"],
        test=splits.get("test"),
        validation=splits.get("validation"),
    )
