"""Entrypoint for ``ray job submit --working-dir . -- python jobs/continual_train.py --config C``:
``strata run`` as a job, with the CLI's exit codes (2: bad input; 128 + the signal when ``ray job
stop`` sends SIGTERM), ending with the run's metrics as one JSON line.

Joins the cluster at RAY_ADDRESS (set by the Job Submission API) or starts a local Ray.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.cli import one_line_errors
from pipeline.config import load_config
from pipeline.run import init_ray, run


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, action="append", help="run config YAML (repeat to merge)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--fresh", action="store_true", help="start over instead of continuing an unfinished run")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    init_ray()
    summary = run(cfg, fresh=args.fresh)
    print(json.dumps(summary.headline()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
