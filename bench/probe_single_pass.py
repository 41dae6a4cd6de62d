"""A method's single-pass learning on a benchmark stream's first tasks, in one process (no Ray).

    python bench/probe_single_pass.py rkr til-mix --tasks 3 --set head_lr=0.003
    python bench/probe_single_pass.py l2p cil-cifar10 --set head_lr=0.3 --set lr_reference_batch=256

The quick loop used to choose the ``configs/methods/*-single-pass.yaml`` values before the full
``run_quality.py`` rows: the same method code, ``train.loop.train_phase`` and ``eval.evaluate`` as
a ``strata run``, on ``--rows`` randomly drawn training rows (``--batch`` each step: 800 / 8 =
100 steps) and ``--test-rows`` test rows per task, one worker, hybrid-vit (or clip-offline for
CLIP methods). Prints the accuracy row after each task (on dil and dcil streams every task's
test rows, so the final JSON line carries the summary's ``transfer_per_task`` too) and that JSON
line, which it also appends to bench/cache/probe.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from run_quality import BACKBONES, CLIP_METHODS  # noqa: E402

from pipeline.backbones import create_backbone  # noqa: E402
from pipeline.config import BackboneConfig, MethodConfig, load_config  # noqa: E402
from pipeline.data.ray_data import decode_image  # noqa: E402
from pipeline.eval.evaluate import candidate_classes, evaluate_task, reduce_eval_stats  # noqa: E402
from pipeline.eval.metrics import transfer_per_task  # noqa: E402
from pipeline.methods import TaskInfo, create_method, method_class, resolve_method_params  # noqa: E402
from pipeline.train.loop import StepSettings, train_phase  # noqa: E402


def backbone_config(name: str) -> BackboneConfig:
    fields = dict(item.split("=", 1) for item in BACKBONES[name] if item.startswith("backbone."))
    return BackboneConfig(**{k.removeprefix("backbone."): (None if v == "null" else v) for k, v in fields.items()})


def sample(path: str, subset: list[int] | None, rows: int, seed: int, size: int) -> tuple[torch.Tensor, np.ndarray]:
    table = pq.read_table(REPO / path)
    labels = table.column("label").to_numpy().astype(np.int64)
    ids = np.arange(len(labels)) if subset is None else np.flatnonzero(np.isin(labels, subset))
    ids = np.random.default_rng(seed).permutation(ids)[:rows]
    images = np.stack(
        [decode_image(b, size, f"{path} row {i}") for b, i in zip(table.column("image").take(ids).to_pylist(), ids, strict=True)]
    )
    return torch.from_numpy(images), labels[ids]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method")
    parser.add_argument("stream", choices=["til-mix", "cil-cifar10", "dcil-5", "dil-pacs"])
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--test-rows", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--set", dest="params", action="append", default=[], metavar="KEY=VALUE", help="method hyperparameter (YAML value)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(REPO / f"configs/benchmarks/{args.stream}.yaml")
    from pipeline.data.stream import resolve_stream

    plan = resolve_stream(cfg.stream, cfg.data.rows_per_chunk, with_test=False)
    if plan.scenario not in method_class(args.method).scenarios:
        parser.error(f"{args.method} does not support {args.stream}'s scenario {plan.scenario}")
    params = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.params)}
    backbone = create_backbone(backbone_config("clip-offline" if args.method in CLIP_METHODS else "hybrid-vit"))
    size = backbone.input_spec.size
    method = create_method(resolve_method_params(MethodConfig(name=args.method, **params)), backbone)
    label_space = "task" if plan.scenario in ("til", "dcil") else "seen"
    tests: list[tuple[torch.Tensor, torch.Tensor]] = []
    matrix: list[list[float]] = []
    started = time.time()
    tasks = list(zip(plan.tasks[: args.tasks], cfg.stream.tasks, strict=False))
    for t, (task, task_cfg) in enumerate(tasks):
        lookup = np.asarray(task.label_map)
        subset = [i for i, s in enumerate(lookup) if s >= 0] if task_cfg.class_subset else None
        xt, yt = sample(task_cfg.test.path, subset, args.test_rows, 100 + t, size)
        tests.append((xt, torch.from_numpy(lookup[yt])))
    for t, (task, task_cfg) in enumerate(tasks):
        lookup = np.asarray(task.label_map)
        subset = [i for i, s in enumerate(lookup) if s >= 0] if task_cfg.class_subset else None
        x, y = sample(task_cfg.train.path, subset, args.rows, t, size)
        y = torch.from_numpy(lookup[y])
        info = TaskInfo(t, task.id, task.classes, plan.num_seen(t), plan.class_names[: plan.num_seen(t)], task.domain)
        method.begin_task(info)
        order = torch.randperm(len(x))

        def batches(x=x, y=y, order=order, t=t):
            for s in range(0, len(x), args.batch):
                ix = order[s : s + args.batch]
                yield {"image": backbone.normalize(x[ix]), "label": y[ix], "task": torch.full((len(ix),), t), "sample_id": ix}

        settings = StepSettings(
            num_tasks=args.tasks, num_samples=len(x), global_batch_size=args.batch, log_every=10**9, label=task.id
        )
        stats = train_phase(method, batches, settings)
        method.end_task()
        row = []
        for j, (xj, yj) in enumerate(tests if plan.scenario in ("dil", "dcil") else tests[: t + 1]):
            seen = info.num_seen_classes if j <= t else plan.num_seen(j)
            candidates = candidate_classes(label_space, plan.tasks[j].classes, seen)
            accuracy = evaluate_task(
                method, [{"image": backbone.normalize(xj[s : s + 100]), "label": yj[s : s + 100]} for s in range(0, len(xj), 100)],
                candidates=candidates, candidate_names=[plan.class_names[c] for c in candidates], task_index=j,
                task_aware=plan.scenario == "til",
            )  # fmt: skip
            row.append(accuracy)
            stats_j = reduce_eval_stats(method)
            if stats_j:
                print(f"  test set {j}: {stats_j}")
        matrix.append(row)
        print(
            f"task {t} '{task.id}': {stats.steps} steps, loss {stats.mean_loss}, accuracy {[round(a, 3) for a in row]}, {method.task_stats()}"
        )
    result = {
        "method": args.method, "stream": args.stream, "tasks": args.tasks, "params": params, "rows": args.rows, "batch": args.batch,
        "avg_acc": float(np.mean([np.mean(r[: t + 1]) for t, r in enumerate(matrix)])), "last_acc": float(np.mean(matrix[-1][: len(matrix)])),
        "transfer_per_task": transfer_per_task([r + [None] * (len(matrix) - len(r)) for r in matrix]), "wall_s": round(time.time() - started),
    }  # fmt: skip
    print(json.dumps(result))
    out = REPO / "bench/cache/probe.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        fh.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
