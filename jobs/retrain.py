"""Entrypoint a scheduler submits: ``python jobs/retrain.py --config C --landing URI --model NAME``.

Learns every complete landed task not in the model's ledger yet, in arrival order, and exits;
safe to run on any schedule and in parallel (each task is claimed atomically, learned once).
Exit codes as ``strata retrain``'s: 2 bad input, 3 stalled (a task claimed elsewhere for too long).
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.cli import one_line_errors
from pipeline.config import load_config
from pipeline.ops import retrain
from pipeline.run import init_ray


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, action="append", help="the model's config YAML (repeat to merge)")
    parser.add_argument("--landing", required=True, help="landing zone: directory or fsspec URI")
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--lease", dest="lease_s", type=float, default=600.0, help="seconds a task's claim lasts without renewal")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    init_ray()
    report = retrain(cfg, args.landing, args.model, lease_s=args.lease_s)
    trained = [{k: r[k] for k in ("task_id", "model_version", "mlflow_run_id")} for r in report.trained]
    print(json.dumps({"trained": trained, "incomplete": report.incomplete, "busy": report.busy}))
    if report.stalled:
        print(f"stalled: {report.busy_reason}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
