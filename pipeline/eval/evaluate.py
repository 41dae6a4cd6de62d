"""Accuracy of a method on one task's test shard, reduced across workers.

Each worker scores its own shard (every test sample reaches exactly one worker), then one
all-reduce of (correct, total) gives the exact accuracy over the whole test set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from pipeline.methods import Batch, Method


def evaluate_task(
    method: Method,
    batches: Iterable[Batch],
    *,
    task_classes: tuple[int, ...],
    task_index: int,
    task_aware: bool,
    prepare: Callable[[Batch], Batch] = lambda b: b,
) -> float:
    """Fraction correct. ``task_aware`` (til): the method gets task ids and the argmax is over the
    task's classes; otherwise over every class seen so far, with no task id."""
    correct = torch.zeros(2, dtype=torch.float64, device=method.device)
    for raw in batches:
        batch = prepare(raw)
        images, labels = batch["image"], batch["label"]
        task_ids = torch.full_like(labels, task_index) if task_aware else None
        logits = method.predict(images, task_ids).float()
        if task_aware:
            allowed = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
            allowed[list(task_classes)] = True
            logits = logits.masked_fill(~allowed, float("-inf"))
        correct[0] += (logits.argmax(dim=1) == labels).sum()
        correct[1] += len(labels)
    method.collective.all_reduce_(correct)
    return float(correct[0] / correct[1]) if correct[1] > 0 else float("nan")
