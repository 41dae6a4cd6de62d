"""Continual-learning metrics over an accuracy matrix (defined in docs/architecture.md, "Evaluation").

``A[i][j]`` is the accuracy on task j's test set after training task i; ``None`` where not
evaluated. A metric whose inputs are missing is ``None`` rather than a guess. ``rows`` (the rows
an evaluation schedule scored, ``eval.every``; default every row) restricts each metric to them:
avg_acc averages those rows, forgetting's maximum and transfer's mean run over them, bwt and
forgetting count only the tasks they can (``scored_rows`` says which, in the summary).
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean

Matrix = Sequence[Sequence[float | None]]


def _all(values: list[float | None]) -> list[float] | None:
    return None if not values or any(v is None for v in values) else [float(v) for v in values if v is not None]


def scored_rows(num_tasks: int, every: int) -> list[int]:
    """The rows ``eval.every`` scores: after every ``every``-th task, and after the last."""
    return [i for i in range(num_tasks) if (i + 1) % every == 0 or i == num_tasks - 1]


def avg_acc(a: Matrix, rows: Sequence[int] | None = None) -> float | None:
    """Average incremental accuracy: mean over i (in ``rows``) of the mean of A[i][j] for j <= i."""
    means = [_all(list(a[i][: i + 1])) for i in (range(len(a)) if rows is None else rows)]
    return None if not means or any(r is None for r in means) else fmean(fmean(r) for r in means if r is not None)


def last_acc(a: Matrix) -> float | None:
    last = _all(list(a[-1]))
    return None if last is None else fmean(last)


def forgetting(a: Matrix, rows: Sequence[int] | None = None) -> float | None:
    """Mean over j < T-1 of max_{i in [j, T-2]} A[i][j] - A[T-1][j] (i in ``rows``; a task no
    such row scored is left out)."""
    t = len(a)
    if t < 2:
        return None
    scored = set(range(t) if rows is None else rows)
    drops = []
    for j in range(t - 1):
        history = _all([a[i][j] for i in range(j, t - 1) if i in scored])
        final = a[t - 1][j]
        if history is None and rows is not None and not any(i in scored for i in range(j, t - 1)):
            continue
        if history is None or final is None:
            return None
        drops.append(max(history) - final)
    return fmean(drops) if drops else None


def bwt(a: Matrix, rows: Sequence[int] | None = None) -> float | None:
    """Backward transfer: mean over j < T-1 of A[T-1][j] - A[j][j] (j with row j in ``rows``)."""
    t = len(a)
    if t < 2:
        return None
    scored = set(range(t) if rows is None else rows)
    pairs = [(a[t - 1][j], a[j][j]) for j in range(t - 1) if j in scored]
    if not pairs or any(x is None or y is None for x, y in pairs):
        return None
    return fmean(float(x) - float(y) for x, y in pairs)  # type: ignore[arg-type]


def _transfer_columns(a: Matrix, rows: Sequence[int] | None) -> list[list[float] | None]:
    scored = set(range(len(a)) if rows is None else rows)
    return [_all([a[i][j] for i in range(j) if i in scored]) for j in range(1, len(a))]


def transfer(a: Matrix, rows: Sequence[int] | None = None) -> float | None:
    """MTIL Transfer: mean over j >= 1 of the mean of A[i][j] for i < j (i in ``rows``; zero-shot
    on future tasks), over the tasks some such row scored."""
    cols = _transfer_columns(a, rows)
    if rows is not None:
        cols = [c for c, j in zip(cols, range(1, len(a)), strict=True) if any(i < j for i in rows)]
    if not cols or any(c is None for c in cols):
        return None
    return fmean(fmean(c) for c in cols if c is not None)


def transfer_per_task(a: Matrix, rows: Sequence[int] | None = None) -> list[float | None] | None:
    """Transfer's terms, per task: entry j is the mean of A[i][j] for i < j (i in ``rows``; None
    for the first task, which nothing precedes, and for a task no such row scored); None where
    the upper triangle is not evaluated."""
    if transfer(a, rows) is None:
        return None
    return [None, *(None if c is None else fmean(c) for c in _transfer_columns(a, rows))]


def mtil_average(a: Matrix) -> float | None:
    """MTIL "Average": mean over j of the mean over every row i of A[i][j] (needs the full matrix)."""
    cols = [_all([row[j] for row in a]) for j in range(len(a))]
    if not cols or any(c is None for c in cols):
        return None
    return fmean(fmean(c) for c in cols if c is not None)


def summarize(a: Matrix, rows: Sequence[int] | None = None) -> dict[str, float | None]:
    return {
        "avg_acc": avg_acc(a, rows),
        "last_acc": last_acc(a),
        "forgetting": forgetting(a, rows),
        "bwt": bwt(a, rows),
        "transfer": transfer(a, rows),
        "mtil_average": mtil_average(a) if rows is None or len(rows) == len(a) else None,
    }
