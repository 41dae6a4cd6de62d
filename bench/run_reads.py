"""Read amplification and read throughput of strata's Parquet read stage against pyarrow.

    python bench/run_reads.py                      # a 10 GiB task in 1M-row row groups
    python bench/run_reads.py --gib 0.5 --rounds 1 # a quick look

Writes a synthetic task (random, incompressible ~1 KB "images" and int64 labels, snappy, row
groups of ``--row-group-rows`` rows, as Spark and pyarrow's defaults produce them) under
``--dir``, then reads it whole, in this process, ``--rounds`` times each way, alternating
(the best round of each counts):

- pyarrow: ``ParquetFile.iter_batches(columns=["image", "label"])`` over the files, with
  pyarrow's default reads (each column chunk read whole) and with strata's 1 MiB read buffer;
- strata: the pipeline's read stage (``ray_data.read_rows``) over every read unit of the task as
  ``resolve_stream`` plans it (chunks of ``data.rows_per_chunk`` rows), which is what each Ray
  Data read task runs.

Bytes read are this process's ``rchar`` (/proc/self/io: every byte passed through read or
pread, page cache included), against the bytes of the task's image and label column chunks.
Writes bench/results/reads.json and prints its bench/RESULTS.md section; the data is deleted afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from run_quality import reads_section  # noqa: E402

from pipeline.config import DataConfig, StreamConfig  # noqa: E402
from pipeline.data.ray_data import read_rows  # noqa: E402
from pipeline.data.sources import READ_BUFFER_BYTES, read_units  # noqa: E402
from pipeline.data.stream import resolve_stream  # noqa: E402


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar")


def write_task(root: Path, gib: float, row_group_rows: int, image_bytes: int, files: int) -> list[Path]:
    """``files`` Parquet files holding ``gib`` GiB of rows between them, whole row groups each."""
    rng = np.random.default_rng(0)
    total_rows = int(gib * 2**30 / image_bytes)
    groups = max(1, round(total_rows / row_group_rows))
    paths = [root / f"part-{i:03d}.parquet" for i in range(files)]
    schema = pa.schema(
        [("image", pa.binary()), ("label", pa.int64())], metadata={"classes": json.dumps([f"c{i}" for i in range(10)])}
    )
    writers = [pq.ParquetWriter(p, schema, compression="snappy") for p in paths]
    for g in range(groups):
        data = rng.bytes(row_group_rows * image_bytes)
        offsets = np.arange(0, (row_group_rows + 1) * image_bytes, image_bytes, dtype=np.int32)
        images = pa.Array.from_buffers(pa.binary(), row_group_rows, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
        labels = pa.array(rng.integers(0, 10, row_group_rows, dtype=np.int64))
        writers[g % files].write_table(pa.table([images, labels], schema=schema), row_group_size=row_group_rows)
    for w in writers:
        w.close()
    return paths


def column_bytes(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        meta = pq.ParquetFile(p).metadata
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            total += sum(group.column(c).total_compressed_size for c in range(group.num_columns))
    return total


def read_pyarrow(paths: list[Path], buffer_size: int = 0) -> int:
    rows = 0
    for p in paths:
        for batch in pq.ParquetFile(p, buffer_size=buffer_size).iter_batches(columns=["image", "label"]):
            rows += batch.num_rows
    return rows


def read_strata(units: list[str], label_map: list[int]) -> int:
    rows = 0
    for unit in units:
        for table in read_rows({"unit": np.array([unit], dtype=object)}, label_map=label_map, task_index=0):
            rows += table.num_rows
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=10.0)
    parser.add_argument("--row-group-rows", type=int, default=1_000_000)
    parser.add_argument("--image-bytes", type=int, default=1000)
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=REPO / "bench/cache/reads")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/reads.json")
    args = parser.parse_args()

    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    try:
        started = time.perf_counter()
        paths = write_task(args.dir, args.gib, args.row_group_rows, args.image_bytes, args.files)
        write_s = time.perf_counter() - started
        in_task = column_bytes(paths)
        on_disk = sum(p.stat().st_size for p in paths)
        source = {"type": "parquet", "path": str(args.dir)}
        plan = resolve_stream(
            StreamConfig.model_validate({"scenario": "cil", "tasks": [{"id": "t", "train": source, "test": source}]}),
            DataConfig().rows_per_chunk,
            with_test=False,
        ).tasks[0]
        units = [json.dumps([dataclasses.asdict(c) for c in u]) for u in read_units(plan.train.chunks)]
        runs: dict[str, list[dict[str, float]]] = {"pyarrow": [], "pyarrow_buffered": [], "strata": []}
        readers = {
            "pyarrow": lambda: read_pyarrow(paths),
            "pyarrow_buffered": lambda: read_pyarrow(paths, READ_BUFFER_BYTES),
            "strata": lambda: read_strata(units, list(plan.label_map)),
        }
        for _ in range(args.rounds):
            for name, read in readers.items():
                before, t0 = rchar(), time.perf_counter()
                rows = read()
                seconds = time.perf_counter() - t0
                runs[name].append({"rows": rows, "seconds": seconds, "bytes_read": rchar() - before})
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)

    def best(name: str) -> dict[str, float]:
        return min(runs[name], key=lambda r: r["seconds"])

    rows = int(best("strata")["rows"])
    assert rows == best("pyarrow")["rows"] == plan.train.num_samples
    result = {
        "gib": args.gib, "rows": rows, "row_group_rows": args.row_group_rows, "files": args.files, "image_bytes": args.image_bytes,
        "rows_per_chunk": DataConfig().rows_per_chunk, "chunks": len(plan.train.chunks), "read_units": len(units),
        "column_bytes": in_task, "file_bytes": on_disk, "write_s": round(write_s, 1), "runs": runs,
        **{f"{name}_rows_per_s": rows / best(name)["seconds"] for name in runs},
        **{f"{name}_read_amplification": best(name)["bytes_read"] / in_task for name in runs},
        "throughput_ratio": best("pyarrow")["seconds"] / best("strata")["seconds"],
        "throughput_ratio_buffered": best("pyarrow_buffered")["seconds"] / best("strata")["seconds"],
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "pyarrow": pa.__version__},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(reads_section(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
