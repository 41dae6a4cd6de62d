"""``strata predict``'s driver memory as the input grows: it should not grow with the rows.

    python bench/run_predict.py --rows 1000 10000

Lands one digits task and learns it (``strata retrain`` with configs/retrain.yaml: the
quickstart's backbone, NCM, a local Ray) under ``--dir``, then, for each ``--rows``, writes a
Parquet file of that many rows (the digits images over and over) and runs ``strata predict`` on
it, sampling the driver process's resident memory (VmRSS, /proc) every 0.05 s. The Ray
processes the driver starts are not counted: the rows are scored and written by Ray Data's
tasks, and what is measured is that none of them comes back through the driver. Writes
bench/results/predict.json and prints its bench/RESULTS.md section.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from run_quality import predict_section  # noqa: E402


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def strata(*args: str, env: dict[str, str]) -> tuple[float, float, str]:
    """Run ``strata ARGS``; its peak driver RSS (MiB), wall seconds and output."""
    started = time.perf_counter()
    driver = "import sys; from pipeline.cli import main; sys.exit(main())"
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: nobody reads a pipe while it runs
        proc = subprocess.Popen([sys.executable, "-c", driver, *args], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, rss_mib(proc.pid))
            time.sleep(0.05)
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"strata {' '.join(args)} exited {proc.returncode}:\n{output[-3000:]}")
    return peak, time.perf_counter() - started, output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--dir", type=Path, default=REPO / "bench/cache/predict")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/predict.json")
    args = parser.parse_args()

    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    env = os.environ | {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "PYTHONPATH": str(REPO)}
    tracking = f"sqlite:///{args.dir / 'mlflow.db'}"
    landing = args.dir / "landing"
    subprocess.run(
        [sys.executable, str(REPO / "deploy/land_digits.py"), str(landing), "t0", "--digits", "0", "1", "2", "3"],
        check=True,
        env=env,
    )
    strata(
        "retrain", "--landing", str(landing), "--model", "digits", "--config", str(REPO / "configs/retrain.yaml"),
        "--set", f"output_dir={args.dir / 'model'}", "--set", f"memory.uri={args.dir / 'model' / 'memory'}",
        "--set", f"tracking.uri={tracking}", "--set", "train.num_workers=1", env=env,
    )  # fmt: skip
    source = pq.read_table(landing / "t0" / "test.parquet")
    runs = []
    for rows in args.rows:
        repeated = pa.concat_tables([source] * (rows // source.num_rows + 1)).slice(0, rows)
        data = args.dir / f"input-{rows}.parquet"
        pq.write_table(repeated.replace_schema_metadata(source.schema.metadata), data, row_group_size=1024)
        out = args.dir / f"preds-{rows}"
        peak, wall, _ = strata(
            "predict", "--model", "digits/1", str(data), "--out", str(out), "--tracking-uri", tracking, env=env
        )
        written = pq.read_table(out)
        assert written.num_rows == rows and sorted(written.column("row").to_pylist()) == list(range(rows))
        runs.append(
            {
                "rows": rows,
                "driver_peak_rss_mib": round(peak, 1),
                "wall_s": round(wall, 1),
                "parts": len(list(out.glob("*.parquet"))),
            }
        )
    result = {
        "runs": runs,
        "rss_ratio_last_to_first": runs[-1]["driver_peak_rss_mib"] / runs[0]["driver_peak_rss_mib"],
        "host_cpus": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(predict_section(args.out)))
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
