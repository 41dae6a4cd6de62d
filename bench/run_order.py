"""Does data order still matter? finetune on PACS photo from its label-sorted file and from a
shuffled copy of the same rows, through ``strata run`` (one task, one pass).

    python bench/run_order.py                  # writes bench/results/order.json and prints it

PACS's Parquet files, like most exported datasets, are sorted by label. Three runs, one local
Ray: the sorted file with the default shuffle buffer, the shuffled copy with the default shuffle
buffer, and the sorted file with ``data.shuffle_buffer=0`` (chunk order only, what strata did
before the buffer). The first two should agree within noise; the third shows what the buffer buys.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from run_quality import BACKBONES  # noqa: E402

PACS = REPO.parent / "shared/datasets/pacs/photo"


def shuffled_copy(source: Path, target: Path, seed: int) -> Path:
    table = pq.read_table(source)
    order = np.random.default_rng(seed).permutation(table.num_rows)
    pq.write_table(table.take(order), target, row_group_size=1024)
    return target


def run(name: str, train: Path, overrides: list[str], out: Path, batch_size: int) -> dict:
    from pipeline.cli import main as strata

    stream = {
        "stream": {"scenario": "dil", "tasks": [{"id": "photo", "domain": "photo", "train": {"type": "parquet", "path": str(train)},
                                                  "test": {"type": "parquet", "path": str(PACS / "test.parquet")}}]},
        "method": {"name": "finetune"},
        "train": {"batch_size": batch_size, "num_workers": 2, "cpus_per_worker": 0.5},
        "tracking": {"enabled": False},
        "output_dir": str(out / name),
    }  # fmt: skip
    config = out / f"{name}.yaml"
    config.write_text(yaml.safe_dump(stream))
    command = ["run", str(config)]
    for item in [*BACKBONES["hybrid-vit"], *overrides]:
        command += ["--set", item]
    strata(command, standalone_mode=False)
    summary = json.loads((out / name / "summary.json").read_text())
    return {
        "accuracy": summary["last_acc"],
        "steps": summary["steps"][0],
        "samples": summary["samples_seen"][0],
        "overrides": overrides,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.chdir(REPO)
    out = REPO / "bench/cache/order"
    out.mkdir(parents=True, exist_ok=True)
    sorted_file = PACS / "train.parquet"
    labels = pq.read_table(sorted_file, columns=["label"]).column("label").to_numpy()
    shuffled = shuffled_copy(sorted_file, out / "photo-train-shuffled.parquet", args.seed)
    results = {
        "label_sorted": run("sorted", sorted_file, [], out, args.batch_size),
        "shuffled_copy": run("shuffled", shuffled, [], out, args.batch_size),
        "label_sorted_no_buffer": run("sorted-no-buffer", sorted_file, ["data.shuffle_buffer=0"], out, args.batch_size),
    }
    report = {
        "source": str(sorted_file.relative_to(REPO.parent)),
        "source_sorted_by_label": bool((np.diff(labels) >= 0).all()),
        "backbone": "hybrid-vit",
        "method": "finetune",
        "batch_size": args.batch_size,
        "runs": results,
        "sorted_minus_shuffled": results["label_sorted"]["accuracy"] - results["shuffled_copy"]["accuracy"],
    }
    (REPO / "bench/results").mkdir(exist_ok=True)
    (REPO / "bench/results/order.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
