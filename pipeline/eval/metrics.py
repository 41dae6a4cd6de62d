"""Continual-learning metrics over an accuracy matrix (defined in docs/architecture.md, "Evaluation").

``A[i][j]`` is the accuracy on task j's test set after training task i; ``None`` where not
evaluated. A metric whose inputs are missing is ``None`` rather than a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean

Matrix = Sequence[Sequence[float | None]]


def _all(values: list[float | None]) -> list[float] | None:
    return None if not values or any(v is None for v in values) else [float(v) for v in values if v is not None]


def avg_acc(a: Matrix) -> float | None:
    """Average incremental accuracy: mean over i of the mean of A[i][j] for j <= i."""
    rows = [_all(list(a[i][: i + 1])) for i in range(len(a))]
    return None if any(r is None for r in rows) else fmean(fmean(r) for r in rows if r is not None)


def last_acc(a: Matrix) -> float | None:
    last = _all(list(a[-1]))
    return None if last is None else fmean(last)


def forgetting(a: Matrix) -> float | None:
    """Mean over j < T-1 of max_{i in [j, T-2]} A[i][j] - A[T-1][j]."""
    t = len(a)
    if t < 2:
        return None
    drops = []
    for j in range(t - 1):
        history = _all([a[i][j] for i in range(j, t - 1)])
        final = a[t - 1][j]
        if history is None or final is None:
            return None
        drops.append(max(history) - final)
    return fmean(drops)


def bwt(a: Matrix) -> float | None:
    """Backward transfer: mean over j < T-1 of A[T-1][j] - A[j][j]."""
    t = len(a)
    if t < 2:
        return None
    pairs = [(a[t - 1][j], a[j][j]) for j in range(t - 1)]
    if any(x is None or y is None for x, y in pairs):
        return None
    return fmean(float(x) - float(y) for x, y in pairs)  # type: ignore[arg-type]


def transfer(a: Matrix) -> float | None:
    """MTIL Transfer: mean over j >= 1 of the mean of A[i][j] for i < j (zero-shot on future tasks)."""
    t = len(a)
    cols = [_all([a[i][j] for i in range(j)]) for j in range(1, t)]
    if not cols or any(c is None for c in cols):
        return None
    return fmean(fmean(c) for c in cols if c is not None)


def transfer_per_task(a: Matrix) -> list[float | None] | None:
    """Transfer's terms, per task: entry j is the mean of A[i][j] for i < j (None for the first
    task, which nothing precedes); None where the upper triangle is not evaluated."""
    if transfer(a) is None:
        return None
    return [None, *(fmean(float(a[i][j]) for i in range(j)) for j in range(1, len(a)))]  # type: ignore[arg-type]


def mtil_average(a: Matrix) -> float | None:
    """MTIL "Average": mean over j of the mean over every row i of A[i][j] (needs the full matrix)."""
    cols = [_all([row[j] for row in a]) for j in range(len(a))]
    if not cols or any(c is None for c in cols):
        return None
    return fmean(fmean(c) for c in cols if c is not None)


def summarize(a: Matrix) -> dict[str, float | None]:
    return {
        "avg_acc": avg_acc(a),
        "last_acc": last_acc(a),
        "forgetting": forgetting(a),
        "bwt": bwt(a),
        "transfer": transfer(a),
        "mtil_average": mtil_average(a),
    }
