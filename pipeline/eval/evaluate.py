"""Accuracy of a method on one task's test shard, reduced across workers.

Each worker scores its own shard (every test sample reaches exactly one worker), then one
all-reduce of (correct, total) gives the exact accuracy over the whole test set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from pipeline.methods import Batch, Method


def evaluate_task(
    method: Method,
    batches: Iterable[Batch],
    *,
    candidates: Sequence[int],
    candidate_names: Sequence[str],
    task_index: int,
    task_aware: bool,
    prepare: Callable[[Batch], Batch] = lambda b: b,
) -> float:
    """Fraction of samples whose argmax over ``candidates`` (stream label ids) is their label.
    ``task_aware`` (til): the method also gets the task id."""
    correct = torch.zeros(2, dtype=torch.float64, device=method.device)
    ids = torch.tensor(list(candidates), device=method.device)
    for raw in batches:
        batch = prepare(raw)
        images, labels = batch["image"], batch["label"]
        task_ids = torch.full_like(labels, task_index) if task_aware else None
        logits = method.score(images, candidates, candidate_names, task_ids).float()
        correct[0] += (ids[logits.argmax(dim=1)] == labels).sum()
        correct[1] += len(labels)
    method.collective.all_reduce_(correct)
    return float(correct[0] / correct[1]) if correct[1] > 0 else float("nan")


def reduce_eval_stats(method: Method) -> dict[str, float | None]:
    """Means over the whole test set of what the method's ``score`` accumulated since the last
    call. Every rank reduces every name the method declares (``eval_stat_names``), whether or not
    its share of the test set held a row: a rank with none has nothing to report, and skipping its
    reduction would pair the ranks' collectives wrongly (and hang them)."""
    stats = method.take_eval_stats()
    undeclared = sorted(set(stats) - set(method.eval_stat_names))
    if undeclared:
        raise RuntimeError(f"{method.name}: take_eval_stats reported {undeclared}, which eval_stat_names does not declare")
    means: dict[str, float | None] = {}
    for name in method.eval_stat_names:
        sums = stats.get(name, torch.zeros(2, dtype=torch.float64))
        total = method.collective.all_reduce_(sums.to(method.device, torch.float64).clone())
        means[name] = float(total[0] / total[1]) if total[1] > 0 else None
    return means


def evaluate_inferred(
    method: Method,
    batches: Iterable[Batch],
    *,
    candidates: Sequence[int],
    candidate_names: Sequence[str],
    task_index: int,
    prepare: Callable[[Batch], Batch] = lambda b: b,
) -> tuple[float, float]:
    """(class-incremental accuracy, task-inference accuracy) of a method that infers each
    sample's task: one inference per sample serves both."""
    counts = torch.zeros(3, dtype=torch.float64, device=method.device)
    ids = torch.tensor(list(candidates), device=method.device)
    for raw in batches:
        batch = prepare(raw)
        tasks = method.infer_tasks(batch["image"])
        logits = method.score(batch["image"], candidates, candidate_names, tasks).float()
        counts[0] += (ids[logits.argmax(dim=1)] == batch["label"]).sum()
        counts[1] += (tasks == task_index).sum()
        counts[2] += len(tasks)
    method.collective.all_reduce_(counts)
    return float(counts[0] / counts[2]), float(counts[1] / counts[2])


def candidate_classes(label_space: str, task_classes: Sequence[int], num_seen: int) -> list[int]:
    """The classes an evaluation chooses among: the task's own ("task"), or every class seen
    so far plus the task's own ("seen"; a future task's classes are not seen yet)."""
    if label_space == "task":
        return list(task_classes)
    return sorted(set(range(num_seen)) | set(task_classes))
