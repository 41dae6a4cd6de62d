"""Entrypoint for ``ray job submit --working-dir . -- python jobs/sweep.py --sweep configs/sweeps/l2p.yaml``.

Exit codes as ``strata sweep``'s (2: bad input). Joins the cluster at RAY_ADDRESS (set by the
Job Submission API) or starts a local Ray.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.cli import one_line_errors
from pipeline.run import init_ray
from pipeline.tune import load_sweep, sweep


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep", required=True, help="sweep YAML (configs/sweeps/...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    cfg = load_sweep(args.sweep, args.overrides)
    init_ray()
    report = sweep(cfg)
    print(json.dumps({"best": report["best"], "final": report.get("final"), "mlflow_run_id": report["mlflow_run_id"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
