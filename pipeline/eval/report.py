"""Report files for a finished run: the accuracy matrix as CSV and as a heatmap PNG."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from pipeline.eval.metrics import Matrix


def write_matrix_csv(path: Path, tasks: Sequence[str], matrix: Matrix) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["after_task", *tasks])
        for task, row in zip(tasks, matrix, strict=True):
            writer.writerow([task, *("" if v is None else f"{v:.6f}" for v in row)])


def write_heatmap(path: Path, tasks: Sequence[str], matrix: Matrix, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    size = 1.6 + 0.6 * len(tasks)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_title(title)
    for i, j in zip(*np.nonzero(~np.isnan(values)), strict=True):
        ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", color="white" if values[i, j] < 0.6 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
