"""Learning quality of every registered method on the benchmark streams, through ``strata run``.

    python bench/build_backbones.py all     # once: effl0, hybrid-vit, clip-offline, coca-offline
    python bench/run_quality.py             # every (stream, method, backbone) below; regenerates bench/RESULTS.md
    python bench/run_quality.py --only l2p --only ncm      # some methods (or rows: gmm+exemplars); --stream cil-cifar10 for some streams
    python bench/run_quality.py --report                   # only regenerate bench/RESULTS.md from bench/results/
    python bench/run_quality.py --only l2p --seeds 0 1 2   # one run (and one result file) per seed

Each run is ``strata run configs/benchmarks/STREAM.yaml [configs/methods/METHOD-single-pass.yaml]
--set ...`` in this process (one local Ray for all of them). Its summary, minus nothing a
reader needs, goes to ``bench/results/STREAM__ROW__BACKBONE__seedS.json`` (``seed=S`` sets the
run's seed: model init, chunk order, shuffle buffer); RESULTS.md is generated from those files
only, one row per (stream, row, backbone) with the mean ± sample standard deviation over the
seeds it has. Every method runs on each stream whose scenario it supports, on the
backbones it fits: CLIP methods on clip-offline (zeroshot on coca-offline too), captioning methods (gmm) on coca-offline,
ViT-only methods on hybrid-vit, the rest on hybrid-vit and, on til-mix, also on effl0 (the CNN). The CPU profile subsamples each source
with ``every`` to at least ``--train-rows`` / ``--test-rows`` rows per task (deterministic,
class-balanced; the whole source where it is smaller) and uses one batch size for every method,
so that every gradient method gets at least ``MIN_STEPS`` optimizer steps per task (default
800 rows at batch 8: 100 steps); ``--train-rows 0`` runs the full streams. A run whose method
took fewer steps on any task is marked in RESULTS.md: its learning-quality numbers do not count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench/results"
STREAMS = ("cil-cifar10", "dil-pacs", "dcil-5", "til-mix")
# Streams run only when named (--stream): cil-cifar10's images in two tasks of five classes, to
# tell what the task size does to a method (L2P's two-class tasks, say).
DIAGNOSTIC_STREAMS = ("cil-cifar10-5x2",)
BACKBONES: dict[str, list[str]] = {
    "hybrid-vit": ["backbone.name=timm:strata_hybrid_vit_effl0", "backbone.checkpoint=bench/cache/hybrid-vit.safetensors"],
    "effl0": [
        "backbone.name=timm:tf_efficientnet_lite0",
        "backbone.checkpoint=bench/cache/effl0.safetensors",
        "data.image_size=96",
    ],
    "clip-offline": ["backbone.name=open_clip:local-dir:bench/cache/clip-offline", "backbone.checkpoint=null"],
    "coca-offline": ["backbone.name=open_clip:local-dir:bench/cache/coca-offline", "backbone.checkpoint=null"],
}
CLIP_METHODS = {"zeroshot", "diki"}
CAPTION_METHODS = {"gmm", "gmm_zeroshot"}
VIT_METHODS = {"l2p", "meat"}
TIL_TASK_INFERENCE = {"probe", "piggyback", "rkr", "mask_rkr", "meat"}
MIN_STEPS = 100
EXEMPLARS_PER_CLASS = 20  # replay's budget: iCaRL's 20 per class (K = 2000 on CIFAR-100), sized to each stream


def backbones_for(method: str, stream: str) -> list[str]:
    if method == "zeroshot":
        # the captioner's own towers read contrastively: the reference its gmm rows compare to
        return ["clip-offline", "coca-offline"]
    if method in CLIP_METHODS:
        return ["clip-offline"]
    if method in CAPTION_METHODS:
        return ["coca-offline"]
    if method in VIT_METHODS or stream != "til-mix":
        return ["hybrid-vit"]
    return ["hybrid-vit", "effl0"]


def plan(streams: list[str], only: list[str]) -> list[tuple[str, str, str]]:
    """(stream, row, backbone) for every method of the library, and every variant row, on every
    stream its scenarios fit (methods registered from elsewhere -- tests, plugins -- are not the
    library's benchmark)."""
    from pipeline.config import load_config
    from pipeline.methods import available_methods

    methods = available_methods()
    rows = {m: m for m, cls in methods.items() if cls.__module__.startswith("pipeline.")} | {
        row: m for row, (m, _) in VARIANTS.items()
    }
    runs = []
    for stream in streams:
        scenario = load_config(REPO / f"configs/benchmarks/{stream}.yaml").stream.scenario
        for row, method in rows.items():
            if scenario in methods[method].scenarios and (not only or row in only):
                runs += [(stream, row, b) for b in backbones_for(method, stream)]
    return runs


def subsample(stream: str, train_rows: int, test_rows: int) -> list[str]:
    """``every`` overrides that leave at least ``train_rows`` / ``test_rows`` rows per task."""
    from pipeline.config import load_config

    overrides = []
    for i, task in enumerate(load_config(REPO / f"configs/benchmarks/{stream}.yaml").stream.tasks):
        for split, target in (("train", train_rows), ("test", test_rows)):
            source = getattr(task, split)
            meta = pq.ParquetFile(source.path).metadata
            classes = len(json.loads(meta.metadata[b"classes"]))
            kept = meta.num_rows * (len(task.class_subset) if task.class_subset else classes) / classes
            overrides.append(f"stream.tasks.{i}.{split}.every={max(1, math.floor(kept / target))}")
    return overrides


def replay_memory(stream: str) -> list[str]:
    """``method.memory_size`` for ``EXEMPLARS_PER_CLASS`` images per class of the stream's label space."""
    from pipeline.config import load_config
    from pipeline.data.stream import resolve_stream

    cfg = load_config(REPO / f"configs/benchmarks/{stream}.yaml")
    classes = resolve_stream(cfg.stream, cfg.data.rows_per_chunk, with_test=False).class_names
    return [f"method.memory_size={EXEMPLARS_PER_CLASS * len(classes)}"]


def icarl(stream: str) -> list[str]:
    """Replay with iCaRL's loss and its nearest-mean-of-exemplars classifier (replay's memory size)."""
    return ["method.distill=true", "method.classifier=nme"]


# Rows beside each method's own: row -> (method, the overrides it adds for a stream). GMM with an
# exemplar memory of replay's size is the official code's class-incremental setup (each task's
# fine-tuning data holds 2,000 exemplars: DoubleClass/GMM's 20_20_order3_2000exp/task{i}.json).
VARIANTS: dict[str, tuple[str, Callable[[str], list[str]]]] = {
    "gmm+exemplars": ("gmm", replay_memory),
    "gmm+lora": ("gmm", lambda stream: ["method.lora_rank=8"]),  # LoRA on the decoder's attention (issue 27)
    "gmm+lr1e-5": ("gmm", lambda stream: ["method.lr=1e-5"]),  # near the official 3e-6: keeps old answers, learns new ones less
    "icarl": ("replay", icarl),
    "ranpac+ssf": ("ranpac", lambda stream: ["method.first_task_adaptation=true"]),  # the paper's Phase 1
}


def method_files(method: str) -> list[str]:
    for name in (f"{method}-single-pass.yaml", f"{method}.yaml"):
        if (REPO / "configs/methods" / name).exists():
            return [str(REPO / "configs/methods" / name)]
    return []


def result_name(stream: str, row: str, backbone: str, seed: int) -> str:
    return f"{stream}__{row}__{backbone}__seed{seed}"


def run_one(stream: str, row: str, backbone: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.cli import main as strata
    from pipeline.methods import available_methods

    method, extra = VARIANTS.get(row, (row, None))
    name = result_name(stream, row, backbone, seed)
    out = REPO / "bench/cache/runs" / name
    overrides = [
        f"method.name={method}", f"seed={seed}", *BACKBONES[backbone],
        f"output_dir={out}", f"memory.uri={out / 'memory'}", f"tracking.uri=sqlite:///{REPO / 'bench/cache/mlflow.db'}",
        "tracking.experiment=strata-bench", f"train.batch_size={args.batch_size}", f"train.num_workers={args.workers}",
    ]  # fmt: skip
    if "seed" in available_methods()[method].Config.model_fields:  # the method's own randomness follows the run's seed
        overrides.append(f"method.seed={seed}")
    if stream == "til-mix" and method in TIL_TASK_INFERENCE:
        overrides.append("method.task_inference=true")
    if method == "replay":
        overrides += replay_memory(stream)
    if extra is not None:
        overrides += extra(stream)
    if args.train_rows:
        overrides += subsample(stream, args.train_rows, args.test_rows)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    command = ["run", str(REPO / f"configs/benchmarks/{stream}.yaml"), *method_files(method)]
    for item in overrides:
        command += ["--set", item]
    started = time.time()
    strata(command, standalone_mode=False)
    summary = json.loads((out / "summary.json").read_text())
    keep = ("tasks", "accuracy_matrix", "avg_acc", "last_acc", "forgetting", "bwt", "transfer", "mtil_average",
            "cil_last_acc", "cil_avg_acc", "task_inference_acc", "samples_seen", "memory_bytes", "wall_s",
            "backbone_id", "scenario", "method", "steps", "train_loss", "task_stats", "gate_matrix", "gate_learned_mean",
            "gate_unlearned_mean", "exact_match_matrix", "exact_match_learned_mean", "similarity_match_matrix",
            "similarity_match_learned_mean", "transfer_per_task")  # fmt: skip
    result = {k: summary.get(k) for k in keep} | {
        "stream": stream, "row": row, "backbone": backbone, "seed": seed, "command": "strata " + " ".join(command).replace(str(REPO) + "/", ""),
        "profile": {"train_rows": args.train_rows, "test_rows": args.test_rows, "batch_size": args.batch_size, "workers": args.workers},
        "host": {"cpus": os.cpu_count(), "gpu": summary["config"]["train"]["use_gpu"]}, "driver_s": round(time.time() - started, 1),
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _pct_seeds(values: list[float | None]) -> str:
    """A percentage over seeds: the value for one, mean ± sample standard deviation for several."""
    known = [v for v in values if v is not None]
    if not known:
        return "–"
    if len(known) == 1:
        return _pct(known[0])
    return f"{100 * statistics.mean(known):.1f} ± {100 * statistics.stdev(known):.1f}"


def _steps(steps: list[int | None] | None) -> str:
    """Fewest optimizer steps of any task ('–' for a method without gradient steps; '?' for a
    result from before steps were recorded); below MIN_STEPS is marked: those numbers do not count."""
    if steps is None:
        return "?"
    taken = [s for s in steps if s is not None]
    if not taken:
        return "–"
    low = min(taken)
    return f"{low}" if low >= MIN_STEPS else f"{low} (< {MIN_STEPS}: does not count)"


COLUMNS = ("avg_acc", "last_acc", "forgetting", "bwt", "transfer", "mtil_average", "cil_last_acc", "task_inference_acc")


def _build(result: dict[str, Any]) -> str:
    """The backbone and the first 8 hex digits of its build's id (``backbone_id``'s hash): rows
    are comparable only on the same build."""
    backbone_id = result.get("backbone_id") or ""
    return f"{result['backbone']}@{backbone_id.rpartition('@')[2][:8]}" if "@" in backbone_id else result["backbone"]


def _by_row(results: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Result files grouped by (backbone build, row), sorted, each group's runs by seed."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((_build(r), r.get("row", r["method"])), []).append(r)
    return {key: sorted(groups[key], key=lambda r: r.get("seed", 0)) for key in sorted(groups)}


# task_stats keys shown per task: label, scale, digits.
DIAGNOSTICS = {
    "masked_off": ("weights masked off (%)", 100.0, 2),
    "prompt_selection": ("prompts in use (exp of the selection entropy)", 1.0, 1),
    "key_cosine": ("mean cos(query, selected key)", 1.0, 2),
}


def _effective_bins(histogram: list[int]) -> float | None:
    """exp(entropy) of a histogram: N when N bins share it evenly."""
    total = sum(histogram)
    if not total:
        return None
    return math.exp(-sum(c / total * math.log(c / total) for c in histogram if c))


def _per_task(values: list[list[float | None]], scale: float = 100.0, digits: int = 1) -> str:
    """Per-task values averaged over seeds, as 'a / b / c'."""
    tasks = zip(*values, strict=True)
    return " / ".join("–" if None in t else f"{scale * statistics.mean(t):.{digits}f}" for t in tasks)


def _diagnostics_section(stream: str, results: list[dict[str, Any]]) -> list[str]:
    """What the methods report per task (``task_stats``, DIKI's gate and transfer), mean over seeds:
    the evidence for why a row is what it is."""
    lines = []
    for (backbone, row), runs in _by_row(results).items():
        if runs[0]["scenario"] == "cil":  # calibration across tasks: how a task fares the moment it is learned
            diagonal = [[r["accuracy_matrix"][i][i] for i in range(len(r["accuracy_matrix"]))] for r in runs]
            lines.append(f"| {row} | {backbone} | accuracy right after learning the task | {_per_task(diagonal)} |")
        stats = [r.get("task_stats") or [] for r in runs]
        for key, (label, scale, digits) in DIAGNOSTICS.items():
            values = [[(t or {}).get(key) for t in s] for s in stats]
            if not all(seed and all(v is not None for v in seed) for seed in values):
                continue
            if isinstance(values[0][0], list):  # a histogram: its effective number of bins per task
                values = [[_effective_bins(h) for h in seed] for seed in values]
            lines.append(f"| {row} | {backbone} | {label} | {_per_task(values, scale, digits)} |")
        if all(r.get("transfer_per_task") for r in runs):
            lines.append(f"| {row} | {backbone} | transfer per task | {_per_task([r['transfer_per_task'] for r in runs])} |")
        if all(r.get("gate_matrix") for r in runs):
            learned = _pct_seeds([r.get("gate_learned_mean") for r in runs])
            unlearned = _pct_seeds([r.get("gate_unlearned_mean") for r in runs])
            lines.append(f"| {row} | {backbone} | gate on learned / not-yet-learned tasks | {learned} / {unlearned} |")
    if not lines:
        return []
    header = [
        f"Per-task diagnostics ({stream}; mean over seeds; from each summary's task_stats, gate and transfer):",
        "",
        "| method | backbone | what | per task |",
        "|---|---|---|---|",
    ]
    return [*header, *lines, ""]


def _findings_section(path: Path) -> list[str]:
    """The hand-written reading of the rows (``bench/results/findings.md``: what each comparison
    shows and why, with the runs that measured it), verbatim after the tables."""
    return [*path.read_text().rstrip("\n").splitlines(), ""] if path.exists() else []


def _order_section(path: Path) -> list[str]:
    """``bench/run_order.py``'s result: the same rows label-sorted and shuffled."""
    if not path.exists():
        return []
    order = json.loads(path.read_text())
    runs = order["runs"]
    return [
        f"## Data order ({order['method']} on {order['source']}, {order['backbone']}, batch {order['batch_size']}; `bench/run_order.py`)",
        "",
        "| source order | data.shuffle_buffer | accuracy | steps |",
        "|---|---|---|---|",
        f"| label-sorted | default | {_pct(runs['label_sorted']['accuracy'])} | {runs['label_sorted']['steps']} |",
        f"| shuffled copy | default | {_pct(runs['shuffled_copy']['accuracy'])} | {runs['shuffled_copy']['steps']} |",
        f"| label-sorted | 0 (file order; read units shuffled) | {_pct(runs['label_sorted_no_buffer']['accuracy'])} | {runs['label_sorted_no_buffer']['steps']} |",
        "",
    ]


def _shipped_value(sweep_name: str, key: str) -> object:
    """The value of dotted ``key`` in the method's config that the benchmark runs (configs/methods/
    M-single-pass.yaml, or M.yaml where the method needs no single-pass variant)."""
    node: object = yaml.safe_load(Path(method_files(sweep_name.split("-")[0])[0]).read_text())
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _sweeps_section(folder: Path) -> list[str]:
    """The single-pass choices made with ``strata sweep`` (bench/results/sweeps/NAME.json are the
    sweeps' sweep_summary.json, NAME = configs/sweeps/single-pass/NAME.yaml): every trial, the
    sweep's best, and the value the method's single-pass config ships (its comment says why
    where the two differ)."""
    files = sorted(folder.glob("*.json"))
    if not files:
        return []
    lines = [
        "## Single-pass hyperparameters chosen with `strata sweep`",
        "",
        "Validation rows only (the trials never see a test set); sweep files in `configs/sweeps/single-pass/`.",
        "",
        "| sweep | values tried | validation objective after each task | sweep's best | shipped |",
        "|---|---|---|---|---|",
    ]
    for path in files:
        sweep = json.loads(path.read_text())
        for trial in sweep["trials"]:
            values = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial["config"].items())
            per_task = " / ".join(_pct(v) for v in trial["objective_per_task"])
            best = "✓" if trial["config"] == sweep["best"]["config"] else ""
            shipped = "✓" if all(_shipped_value(path.stem, k) == v for k, v in trial["config"].items()) else ""
            lines.append(f"| {path.stem} | {values} | {sweep['objective']}: {per_task} | {best} | {shipped} |")
    lines += ["", "Where the shipped value is not the sweep's best, the method's single-pass config says why."]
    return [*lines, ""]


def _overhead_section(path: Path) -> list[str]:
    """bench/results/overhead.json (``run_overhead.py``): strata's training pass against the
    DataLoader loop and the pre-decoded loop, measured in the same run, per method and workers."""
    if not path.exists() or "by_method" not in (data := json.loads(path.read_text())):
        return []
    lines = [
        "## Throughput: strata against the loops a practitioner writes",
        "",
        "Generated from `bench/results/overhead.json` (`python bench/run_overhead.py --method M`): the same Parquet bytes,",
        "decode, model, method, batch and threads; medians of the repeats. Training = the streamed pass; end to end includes start-up.",
        "",
        "| method | workers | strata samples/s | DataLoader samples/s | ratio (training) | ratio (end to end) | ratio vs pre-decoded |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, result in sorted(data["by_method"].items()):
        for entry in result["by_workers"]:
            strata, loader = (
                statistics.median(r[who]["samples"] / r[who]["train_s"] for r in entry["repeats"])
                for who in ("strata", "dataloader")
            )
            predecoded = f"{entry['ratio_vs_predecoded']['median']:.2f}" if "ratio_vs_predecoded" in entry else "–"
            lines.append(
                f"| {method} | {entry['workers']} | {strata:.1f} | {loader:.1f} | {entry['ratio_vs_dataloader']['median']:.2f} | "
                f"{entry['end_to_end_ratio_vs_dataloader']['median']:.2f} | {predecoded} |"
            )
    lines += [
        "",
        "Peak RSS of one run (1 worker) at the benchmark's task size and at 10x, polled every 0.2 s: the train worker,",
        "and every Ray process of the run together (workers, coordinators, decode tasks, Train's actors).",
        "",
        "| method | rows | train worker MiB | all Ray processes MiB | all Ray processes, 10x / 1x |",
        "|---|---|---|---|---|",
    ]
    for method, result in sorted(data["by_method"].items()):
        rss = result["peak_rss"]
        small, large = rss["1x"], next(v for k, v in rss.items() if k != "1x")
        lines.append(
            f"| {method} | {small['rows']} → {large['rows']} | {small['train_worker_peak_mib']:.0f} → {large['train_worker_peak_mib']:.0f} | "
            f"{small['ray_total_peak_mib']:.0f} → {large['ray_total_peak_mib']:.0f} | {large['ray_total_peak_mib'] / small['ray_total_peak_mib']:.2f} |"
        )
    return [*lines, ""]


def reads_section(path: Path) -> list[str]:
    """bench/results/reads.json (``run_reads.py``): the read stage against pyarrow on one task."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    lines = [
        f"## Reads: {data['gib']:g} GiB task, {data['rows']:,} rows in row groups of {data['row_group_rows']:,} (`bench/run_reads.py`)",
        "",
        f"Random ~{data['image_bytes']} B images + labels, snappy, {data['files']} files; {data['chunks']:,} chunks of "
        f"{data['rows_per_chunk']} rows in {data['read_units']} read units. In one process, the best of {len(data['runs']['strata'])} "
        "rounds each, alternating; bytes read = the process's rchar over the image and label column bytes.",
        "",
        "| reader | rows/s | bytes read / task bytes |",
        "|---|---|---|",
    ]
    names = {"pyarrow": "pyarrow `iter_batches` (its defaults)", "pyarrow_buffered": "pyarrow `iter_batches`, 1 MiB read buffer",
             "strata": "strata's read stage (`ray_data.read_rows`)"}  # fmt: skip
    for key, name in names.items():
        if f"{key}_rows_per_s" in data:
            lines.append(f"| {name} | {data[f'{key}_rows_per_s']:,.0f} | {data[f'{key}_read_amplification']:.3f} |")
    lines += [
        "",
        f"strata / pyarrow throughput: {data['throughput_ratio']:.2f} (against the buffered reads: {data['throughput_ratio_buffered']:.2f}).",
        "",
    ]
    return lines


def predict_section(path: Path) -> list[str]:
    """bench/results/predict.json (``run_predict.py``): the predict driver's memory by input size."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    lines = [
        "## `strata predict`: the driver's memory against the input's size (`bench/run_predict.py`)",
        "",
        "| rows | driver peak RSS MiB | Parquet parts written | wall s |",
        "|---|---|---|---|",
        *(f"| {r['rows']:,} | {r['driver_peak_rss_mib']:.0f} | {r['parts']} | {r['wall_s']:.0f} |" for r in data["runs"]),
        "",
        f"Peak RSS, largest / smallest input: {data['rss_ratio_last_to_first']:.2f}.",
        "",
    ]
    return lines


def report(results: Path = RESULTS, out: Path = REPO / "bench/RESULTS.md") -> str:
    """bench/RESULTS.md from bench/results/*.json (the quality runs), nothing else."""
    rows = [r for r in (json.loads(p.read_text()) for p in sorted(results.glob("*.json"))) if "stream" in r]
    lines = [
        "# strata benchmark results",
        "",
        "Generated by `python bench/run_quality.py` (or `--report` to rebuild this file from",
        "`bench/results/*.json`); do not edit by hand. Backbones are the offline reference builds of",
        "`bench/build_backbones.py` (numbers in `bench/BACKBONES.md`); `backbone` names the build (`@` the first",
        "8 hex digits of its id), and only rows on the same build compare. Accuracies in %; `memory/task` is the",
        "mean tensor bytes of a task's memory-store record; `samples/s` is training samples over the run's",
        "whole wall time (start-up and evaluation included). `steps/task` is the fewest optimizer steps of",
        f"any task; a learning-quality number counts only with at least {MIN_STEPS}. Profile of each row: see its JSON.",
        "",
    ]
    for stream in STREAMS + DIAGNOSTIC_STREAMS:
        part = [r for r in rows if r["stream"] == stream]
        if not part:
            continue
        profile = part[0]["profile"]
        lines += [
            f"## {stream} ({part[0]['scenario']}, {len(part[0]['tasks'])} tasks; ~{profile['train_rows'] or 'all'} train / "
            f"~{profile['test_rows'] or 'all'} test rows per task, batch {profile['batch_size']}, {profile['workers']} workers)",
            "",
            "| method | backbone | seeds | steps/task | avg_acc | last_acc | forgetting | bwt | transfer | mtil avg | cil last | task-inf. | memory/task | wall s | samples/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (backbone, row), runs in _by_row(part).items():
            r = runs[0]
            sizes = [b for b in r["memory_bytes"] if b is not None]
            memory = f"{sum(sizes) / len(sizes) / 1024:,.1f} KiB" if sizes else "–"
            wall = statistics.mean(x["wall_s"] for x in runs)
            rate = statistics.mean(sum(x["samples_seen"]) / x["wall_s"] if x["wall_s"] else 0.0 for x in runs)
            steps = [
                min((s for s in x["steps"] if s is not None), default=None) if x.get("steps") is not None else None for x in runs
            ]
            fewest = (
                runs[steps.index(min(steps))]
                if None not in steps
                else next(x for x, s in zip(runs, steps, strict=True) if s is None)
            )
            metric = {k: _pct_seeds([x[k] for x in runs]) for k in COLUMNS}
            lines.append(
                f"| {row} | {backbone} | {len(runs)} | {_steps(fewest.get('steps'))} | {metric['avg_acc']} | {metric['last_acc']} | {metric['forgetting']} | "
                f"{metric['bwt']} | {metric['transfer']} | {metric['mtil_average']} | {metric['cil_last_acc']} | "
                f"{metric['task_inference_acc']} | {memory} | {wall:.0f} | {rate:.1f} |"
            )
        lines.append("")
        lines += _diagnostics_section(stream, part)
    lines += _findings_section(results / "findings.md")
    lines += _order_section(results / "order.json")
    lines += _sweeps_section(results / "sweeps")
    lines += _overhead_section(results / "overhead.json")
    lines += reads_section(results / "reads.json")
    lines += predict_section(results / "predict.json")
    text = "\n".join(lines)
    out.write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", action="append", choices=STREAMS + DIAGNOSTIC_STREAMS, help=f"default: {', '.join(STREAMS)}")
    parser.add_argument("--only", action="append", default=[], metavar="METHOD", help="default: every registered method")
    parser.add_argument("--backbone", action="append", choices=list(BACKBONES), help="default: every backbone a method fits")
    parser.add_argument("--train-rows", type=int, default=800, help="at least this many rows per task after subsampling (0: all)")
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (the run's seed)")
    parser.add_argument("--report", action="store_true", help="only regenerate bench/RESULTS.md")
    parser.add_argument("--skip-done", action="store_true", help="skip runs that already have a results file")
    parser.add_argument("--dry-run", action="store_true", help="list the runs")
    args = parser.parse_args()
    os.chdir(REPO)  # the stream configs and backbone paths are relative to the repository
    failed = []
    if not args.report:
        planned = [r for r in plan(list(args.stream or STREAMS), args.only) if not args.backbone or r[2] in args.backbone]
        runs = [(*r, seed) for r in planned for seed in args.seeds]
        for i, (stream, row, backbone, seed) in enumerate(runs):
            print(f"[{i + 1}/{len(runs)}] {stream} · {row} · {backbone} · seed {seed}", flush=True)
            if args.dry_run or (args.skip_done and (RESULTS / f"{result_name(stream, row, backbone, seed)}.json").exists()):
                continue
            try:
                result = run_one(stream, row, backbone, seed, args)
            except (Exception, SystemExit) as exc:  # the CLI exits on a bad input: report it, go on
                failed.append(f"{stream} · {row} · {backbone} · seed {seed}: {exc!r}")
                print(f"    FAILED: {exc!r}", flush=True)
                continue
            print(
                f"    last_acc {_pct(result['last_acc'])}  avg_acc {_pct(result['avg_acc'])}  wall {result['wall_s']:.0f}s",
                flush=True,
            )
    if not args.dry_run:
        print(report())
    for line in failed:
        print(f"failed: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
