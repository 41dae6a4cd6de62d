"""What the pipeline costs: ``strata run`` (1 Ray worker) against a bare PyTorch loop, and peak RSS.

    python bench/run_overhead.py                      # writes bench/results/overhead.json and prints it
    python bench/run_overhead.py --method l2p --rows 1024 --repeats 5

(a) ``strata run`` on a one-task synthetic stream (the ``blobs`` generator) with 1 worker:
    training throughput = samples / the phase's training time (``train_wall_s``: the streamed
    pass and ``end_task``, evaluation and start-up excluded); the end-to-end rate is reported too.
(b) a bare single-process loop in this process over the same rows, decoded once up front: the
    same backbone, method, optimizer, batch size and torch thread count, ``training_step`` ->
    ``backward`` -> ``step``, nothing else.
The two alternate ``--repeats`` times; the ratio (a)/(b) is printed with min/median/max.
Then peak RSS of the Ray train worker and of every Ray process together, for one task at 1x
and 10x ``--rows``: with streaming, the worker's peak should not grow with the task.
``--profile`` also samples the train worker with py-spy during one more run and splits the
training pass's time by where its thread was: waiting for the next batch from Ray Data,
normalising, forward, backward, optimizer step, the per-step all-reduces, the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
BACKBONE = {"name": "timm:vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 192, "num_heads": 3}}


def stream_config(rows: int, args: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    params = {"num_classes": 8, "rows": rows, "size": 32, "seed": 0}
    task = {
        "id": "synthetic",
        "train": {"type": "generator", "name": "blobs", "split": "train", "params": params},
        "test": {"type": "generator", "name": "blobs", "split": "test", "params": {**params, "rows": 64}},
    }
    return {
        "stream": {"scenario": "cil", "tasks": [task]},
        "backbone": BACKBONE,
        "method": {"name": args.method},
        "train": {"batch_size": args.batch_size, "num_workers": 1, "cpus_per_worker": args.threads},
        "data": {"rows_per_chunk": 256},
        "tracking": {"enabled": False},
        "output_dir": str(output_dir),
    }


def strata_run(rows: int, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.config import validate_config
    from pipeline.train import run

    with tempfile.TemporaryDirectory() as tmp:
        summary = run(validate_config(stream_config(rows, args, Path(tmp) / "out")))
    return {"samples": summary["samples_seen"][0], "train_s": summary["train_wall_s"][0], "wall_s": summary["wall_s"]}


def decode_only(rows: int, args: argparse.Namespace) -> dict[str, Any]:
    """What strata's data path costs per sample before training: read and decode every chunk of
    the task in this process (``load_chunks``, the function Ray Data runs), no model."""
    import numpy as np

    from pipeline.config import validate_config
    from pipeline.data.ray_data import load_chunks
    from pipeline.data.stream import resolve_stream

    cfg = validate_config(stream_config(rows, args, Path(tempfile.gettempdir())))
    task = resolve_stream(cfg.stream, cfg.data.rows_per_chunk).tasks[0]
    batch = {"chunk": np.array([c.to_json() for c in task.train.chunks], dtype=object)}
    started = time.perf_counter()
    decoded = sum(len(b["label"]) for b in load_chunks(batch, label_map=task.label_map, task_index=0, size=32))
    return {"samples": decoded, "seconds": time.perf_counter() - started}


def bare_loop(rows: int, args: argparse.Namespace) -> dict[str, Any]:
    """The same work with nothing around it: decoded tensors, the method's step, the optimizer."""
    from pipeline.backbones import create_backbone
    from pipeline.config import validate_config
    from pipeline.data.generators import get as generator
    from pipeline.methods import LocalCollective, TaskInfo, create_method, resolve_method_params

    cfg = validate_config(stream_config(rows, args, Path(tempfile.gettempdir())))
    params = cfg.stream.tasks[0].train.params
    images, labels = generator("blobs").rows("train", params, 0, rows)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(labels)
    torch.set_num_threads(int(args.threads))
    torch.manual_seed(0)
    backbone = create_backbone(cfg.backbone)
    method = create_method(resolve_method_params(cfg.method), backbone, LocalCollective())
    names = tuple(f"class{c}" for c in range(8))
    method.begin_task(TaskInfo(index=0, id="synthetic", classes=tuple(range(8)), num_seen_classes=8, class_names=names))
    trainable = method.trainable_parameters()
    optimizer, scheduler = method.build_optimizer(-(-rows // args.batch_size), args.batch_size) if trainable else (None, None)
    started = time.perf_counter()
    for i in range(0, rows, args.batch_size):
        batch = {"image": backbone.normalize(images[i : i + args.batch_size]), "label": labels[i : i + args.batch_size]}
        batch["task"] = torch.zeros_like(batch["label"])
        if optimizer is None:
            with torch.no_grad():
                method.training_step(batch)
            continue
        method.training_step(batch).backward()
        if method.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trainable, method.cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
    method.end_task()
    return {"samples": rows, "train_s": time.perf_counter() - started}


# Where a sample of the training thread is, by the first of these found in its stack (leaf last).
PROFILE_CATEGORIES = (
    ("normalise", ("normalize (pipeline/backbones",)),
    ("wait for next batch (Ray Data)", ("iter_torch_batches", "ray/data/")),
    ("backward", ("run_backward", "backward (torch/")),
    ("forward (training_step)", ("training_step (",)),
    ("optimizer step", ("torch/optim/",)),
    ("all-reduce", ("all_reduce", "collective.py")),
)


def classify(stacks: str) -> dict[str, float]:
    """py-spy raw stacks -> fraction of the training pass's samples per category."""
    counts: dict[str, int] = {}
    for line in stacks.splitlines():
        stack, _, n = line.rpartition(" ")
        if "train_phase (" not in stack:
            continue
        inner = stack[stack.index("train_phase (") :]
        name = next((c for c, keys in PROFILE_CATEGORIES if any(k in inner for k in keys)), "other")
        counts[name] = counts.get(name, 0) + int(n)
    total = sum(counts.values()) or 1
    return {name: round(n / total, 4) for name, n in sorted(counts.items(), key=lambda kv: -kv[1])}


PY_SPY = str(next((p for p in (Path(sys.executable).parent / "py-spy",) if p.exists()), "py-spy"))


def profile_run(rows: int, args: argparse.Namespace) -> dict[str, Any]:
    """One ``strata run`` with py-spy attached to its train worker (--idle: blocked time counts)."""
    out = Path(tempfile.mkdtemp()) / "stacks.txt"
    spy: list[subprocess.Popen] = []

    def attach() -> None:
        while not spy:
            for proc in psutil.Process().children(recursive=True):
                try:
                    cmd = " ".join(proc.cmdline())
                except psutil.Error:
                    continue
                if cmd.startswith("ray::") and "RayTrainWorker" in cmd:
                    command = [PY_SPY, "record", "--pid", str(proc.pid), "--rate", "50", "--idle", "--nonblocking",
                               "--format", "raw", "--output", str(out)]  # fmt: skip
                    spy.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=attach, daemon=True)
    watcher.start()
    run = strata_run(rows, args)
    watcher.join(timeout=10)
    if not spy:
        raise RuntimeError("py-spy: the train worker was not found")
    spy[0].wait(timeout=60)  # the worker exits with the fit; py-spy then writes its file
    return {"rows": rows, "train_s": run["train_s"], "breakdown": classify(out.read_text())}


class PeakRSS:
    """Polls the RSS of this run's Ray processes (descendants of this process: the local Ray it
    started): the train worker's, and all of them together."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.worker = 0
        self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            total = 0
            for proc in psutil.Process().children(recursive=True):
                try:
                    cmd, rss = " ".join(proc.cmdline()), proc.memory_info().rss
                except psutil.Error:
                    continue
                if cmd.startswith("ray::"):
                    total += rss
                    if "RayTrainWorker" in cmd:
                        self.worker = max(self.worker, rss)
            self.total = max(self.total, total)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="finetune")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=float, default=float(os.cpu_count() or 1), help="CPUs of the Ray worker = torch threads of the bare loop")
    parser.add_argument("--rss-scale", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="also break the training pass down with py-spy (pip install py-spy)")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/overhead.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from pipeline.train import init_ray

    init_ray()
    strata_run(64, args)  # warm Ray's workers and Data once, outside the measurements
    pairs = []
    for repeat in range(args.repeats):
        a = strata_run(args.rows, args)
        b = bare_loop(args.rows, args)
        pairs.append({"strata": a, "bare": b, "ratio": (a["samples"] / a["train_s"]) / (b["samples"] / b["train_s"])})
        print(f"repeat {repeat + 1}: strata {a['samples'] / a['train_s']:.1f} samples/s (end to end {a['samples'] / a['wall_s']:.1f}), "
              f"bare {b['samples'] / b['train_s']:.1f} samples/s, ratio {pairs[-1]['ratio']:.3f}", flush=True)  # fmt: skip
    ratios = [p["ratio"] for p in pairs]
    decode = decode_only(args.rows, args)
    print(f"decoding alone (read + PNG decode + resize, in-process): {decode['samples'] / decode['seconds']:.1f} samples/s", flush=True)
    rss = {}
    for scale in (1, args.rss_scale):
        with PeakRSS() as peak:
            strata_run(args.rows * scale, args)
        rss[f"{scale}x"] = {"rows": args.rows * scale, "train_worker_peak_mib": round(peak.worker / 2**20, 1), "ray_total_peak_mib": round(peak.total / 2**20, 1)}
        print(f"peak RSS at {scale}x ({args.rows * scale} rows): train worker {rss[f'{scale}x']['train_worker_peak_mib']} MiB, "
              f"all Ray processes {rss[f'{scale}x']['ray_total_peak_mib']} MiB", flush=True)  # fmt: skip
    profile = None
    if args.profile:
        profile = profile_run(args.rows, args)
        print("where the training pass's time goes (py-spy, train worker): "
              + ", ".join(f"{k} {v:.1%}" for k, v in profile["breakdown"].items()), flush=True)  # fmt: skip
    result = {
        "method": args.method, "backbone": BACKBONE, "rows": args.rows, "batch_size": args.batch_size, "threads": args.threads,
        "device": "cuda" if torch.cuda.is_available() else "cpu", "cpus": os.cpu_count(),
        "ratio": {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)}, "pairs": pairs, "peak_rss": rss,
        "decode_only_samples_per_s": decode["samples"] / decode["seconds"], "profile": profile,
    }  # fmt: skip
    print(f"throughput ratio strata/bare: min {min(ratios):.3f}  median {statistics.median(ratios):.3f}  max {max(ratios):.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
