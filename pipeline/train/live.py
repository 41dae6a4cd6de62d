"""A run's live progress, from rank 0 to the driver.

Worker output reaches the driver's console only through Ray's log forwarding, prefixed by process
and interleaved with Ray's own lines. Instead, rank 0 posts small events to a ``ProgressBoard``
actor (fire and forget; step events at most every ``interval_s``), and the driver's main thread,
which waits for the fit anyway, takes them and hands them to a listener: ``strata run`` draws a
progress bar per task from them.

Events: ``TaskStarted`` when a phase starts, ``Step`` as it trains, ``TaskDone`` when it has
been evaluated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@dataclass(frozen=True)
class TaskStarted:
    row: int
    num_tasks: int
    task_id: str
    samples: int  # the phase's training samples over all ranks (0 for a method that reads no data)


@dataclass(frozen=True)
class Step:
    samples: int  # trained so far in the phase, over all ranks
    loss: float | None  # the running mean loss of rank 0's batches, None for a method without one


@dataclass(frozen=True)
class TaskDone:
    row: int
    num_tasks: int
    task_id: str
    accuracy: tuple[float | None, ...]  # the accuracy matrix's row (None where not scored)
    avg_seen_acc: float | None  # None where eval.every did not score this row
    loss: float | None
    wall_s: float


Event = TaskStarted | Step | TaskDone
Listener = Callable[[Event], None]


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self) -> None:
        self._events: list[Event] = []

    def post(self, event: Event) -> None:
        self._events.append(event)

    def take(self) -> list[Event]:
        events, self._events = self._events, []
        return events


def new_board() -> Any:
    """A ProgressBoard on the caller's (the driver's) node, as Train pins its controller there:
    left to the scheduler, the board can land on a worker's node, and a node that leaves mid-run
    would take the run's live view with it."""
    node = ray.get_runtime_context().get_node_id()
    return ProgressBoard.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()


class ProgressPoster:
    """What rank 0 posts to the board, and how often; without a board, nothing."""

    def __init__(self, board: Any | None, interval_s: float = 0.5) -> None:
        self._board = board
        self._interval_s = interval_s
        self._last = 0.0

    def _post(self, event: Event) -> None:
        if self._board is not None:
            self._board.post.remote(event)

    def task_started(self, *, row: int, num_tasks: int, task_id: str, samples: int) -> None:
        self._post(TaskStarted(row, num_tasks, task_id, samples))
        self._last = time.monotonic()

    def step(self, samples: int, loss: Callable[[], float | None]) -> None:
        now = time.monotonic()
        if self._board is not None and now - self._last >= self._interval_s:
            self._post(Step(samples, loss()))
            self._last = now

    def task_finished(
        self,
        *,
        row: int,
        num_tasks: int,
        task_id: str,
        accuracy: Sequence[float | None],
        avg_seen_acc: float | None,
        loss: float | None,
        wall_s: float,
    ) -> None:
        self._post(TaskDone(row, num_tasks, task_id, tuple(accuracy), avg_seen_acc, loss, wall_s))


def drain(board: Any, listener: Listener, timeout_s: float = 10.0) -> None:
    """Hand every event posted so far to ``listener``, in order."""
    for event in ray.get(board.take.remote(), timeout=timeout_s):
        listener(event)
