"""What the pipeline costs: ``strata run`` against the loops a practitioner would write, and peak RSS.

    python bench/run_overhead.py                      # measures finetune into bench/results/overhead.json
    python bench/run_overhead.py --method rkr --rows 1024 --repeats 5 --workers 1 2

The data: ``--rows`` synthetic images (the ``blobs`` generator) written once as PNG in a Parquet
file, so every contender reads and decodes the same bytes. For each ``--workers`` count N:
(a) ``strata run`` on a one-task stream over that file with N Ray Train workers (the CPUs split
    between them): training throughput = samples / the phase's training time (``train_wall_s``:
    the streamed pass and ``end_task``; evaluation and start-up excluded); end to end = samples /
    the run's whole wall time, start-up included.
(b) the DataLoader loop: ``torch.utils.data.DataLoader`` over the same Parquet file, the same
    decode and resize (strata's ``decode_image``), ``--loader-workers`` worker processes per
    training process, the same backbone, method, optimizer, batch size and torch threads; with N
    > 1, N processes in a gloo group, a ``DistributedSampler`` each and the gradients all-reduced
    (what DDP does), timed from the first batch (training) and from process start (end to end).
(c) the pre-decoded loop (N = 1 only): the same rows decoded up front, ``training_step`` ->
    ``backward`` -> ``step``, nothing else: the ceiling no streaming pipeline reaches.
The contenders alternate ``--repeats`` times; the ratios (a)/(b) and (a)/(c) are printed with
min/median/max. Then peak RSS of the Ray train worker and of every Ray process together, for
one task at 1x and 10x ``--rows``: with streaming, the worker's peak should not grow with the task.
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
BACKBONE = {
    "name": "timm:vit_tiny_patch16_224",
    "kwargs": {"img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 192, "num_heads": 3},
}


def write_parquet(rows: int, folder: Path) -> Path:
    """``rows`` blobs images as PNG bytes in one Parquet file (what every contender reads)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.generators import get as generator
    from pipeline.data.sources import _png

    images, labels = generator("blobs").rows("train", {"num_classes": 8, "rows": rows, "size": 32, "seed": 0}, 0, rows)
    path = folder / f"blobs-{rows}.parquet"
    table = pa.table({"image": pa.array([_png(i) for i in images], pa.binary()), "label": pa.array(labels, pa.int64())})
    pq.write_table(
        table.replace_schema_metadata({"classes": json.dumps([f"class{c}" for c in range(8)])}), path, row_group_size=256
    )
    return path


def scenario(method: str) -> str:
    from pipeline.methods import method_class

    return "cil" if "cil" in method_class(method).scenarios else "til"


def stream_config(data: Path, args: argparse.Namespace, output_dir: Path, workers: int = 1) -> dict[str, Any]:
    source = {"type": "parquet", "path": str(data)}
    return {
        "stream": {"scenario": scenario(args.method), "tasks": [{"id": "synthetic", "train": source, "test": source}]},
        "backbone": BACKBONE,
        "method": {"name": args.method},
        "train": {"batch_size": args.batch_size, "num_workers": workers, "cpus_per_worker": args.threads / workers},
        "data": {"rows_per_chunk": 256},
        "tracking": {"enabled": False},
        "output_dir": str(output_dir),
    }


def strata_run(data: Path, args: argparse.Namespace, workers: int = 1) -> dict[str, Any]:
    from pipeline.config import validate_config
    from pipeline.run import run

    with tempfile.TemporaryDirectory() as tmp:
        summary = run(validate_config(stream_config(data, args, Path(tmp) / "out", workers)))
    return {"samples": summary.samples_seen[0], "train_s": summary.train_wall_s[0], "wall_s": summary.wall_s}


class ParquetImages(torch.utils.data.Dataset):
    """The practitioner's dataset: rows of the Parquet file, decoded and resized on access."""

    def __init__(self, path: Path, size: int) -> None:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        self.images = table.column("image").to_pylist()
        self.labels = table.column("label").to_numpy()
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from pipeline.data.ray_data import decode_image

        return torch.tensor(decode_image(self.images[i], self.size, f"row {i}")), int(
            self.labels[i]
        )  # a copy: PIL's array is read-only


class HandLoop:
    """What a hand-written loop does around the method: build it, then ``training_step`` ->
    ``backward`` -> (all-reduce) -> clip -> ``step`` per batch. Shared by the DataLoader and the
    pre-decoded loops, so the two differ only in where their batches come from."""

    def __init__(self, data: Path, args: argparse.Namespace, steps: int, world: int = 1) -> None:
        from pipeline.backbones import create_backbone
        from pipeline.config import validate_config
        from pipeline.methods import LocalCollective, TaskInfo, create_method, resolve_method_params
        from pipeline.train.collective import TorchCollective

        cfg = validate_config(stream_config(data, args, Path(tempfile.gettempdir()), world))
        torch.manual_seed(0)
        self.backbone = create_backbone(cfg.backbone)
        self.method = create_method(
            resolve_method_params(cfg.method), self.backbone, TorchCollective() if world > 1 else LocalCollective()
        )
        names = tuple(f"class{c}" for c in range(8))
        self.method.begin_task(TaskInfo(index=0, id="synthetic", classes=tuple(range(8)), num_seen_classes=8, class_names=names))
        self.trainable = self.method.trainable_parameters()
        self.optimizer, self.scheduler = self.method.build_optimizer(steps, args.batch_size) if self.trainable else (None, None)
        self.world = world

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        import torch.distributed as dist

        batch = {"image": self.backbone.normalize(images), "label": labels, "task": torch.zeros_like(labels)}
        if self.optimizer is None:
            with torch.no_grad():
                self.method.training_step(batch)
            return
        self.method.training_step(batch).backward()
        if self.world > 1:
            for p in self.trainable:  # what DDP's reducer does, one tensor at a time
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
        if self.method.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.method.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()


def _loader_worker(rank: int, world: int, data: str, args: argparse.Namespace, port: int, started: float, out: Any) -> None:
    """One training process of the DataLoader loop (rank of ``world``)."""
    import torch.distributed as dist

    torch.set_num_threads(max(1, int(args.threads / world)))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dataset = ParquetImages(Path(data), 32)
    sampler = torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=True, seed=0) if world > 1 else None
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size // world, shuffle=sampler is None, sampler=sampler,
        num_workers=args.loader_workers, persistent_workers=False, drop_last=False,
    )  # fmt: skip
    loop = HandLoop(Path(data), args, len(loader), world)
    samples = 0
    first = time.perf_counter()
    for images, labels in loader:
        loop.step(images, labels)
        samples += len(labels)
    loop.method.end_task()
    train_s = time.perf_counter() - first
    if world > 1:
        totals = torch.tensor([float(samples), train_s])
        dist.all_reduce(totals[:1])
        dist.all_reduce(totals[1:], op=dist.ReduceOp.MAX)
        samples, train_s = int(totals[0]), float(totals[1])
        dist.destroy_process_group()
    if rank == 0:
        out.put({"samples": samples, "train_s": train_s, "wall_s": time.time() - started})


def dataloader_loop(data: Path, args: argparse.Namespace, workers: int = 1) -> dict[str, Any]:
    """The DataLoader loop with ``workers`` training processes (spawned, as torchrun would)."""
    import socket

    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.time()
    processes = [
        context.Process(target=_loader_worker, args=(r, workers, str(data), args, port, started, queue)) for r in range(workers)
    ]
    for proc in processes:
        proc.start()
    for proc in processes:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"DataLoader loop: a training process exited {proc.exitcode}")
    return queue.get()


def decode_only(data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """What strata's data path costs per sample before training: read and decode every chunk of
    the task in this process (``load_chunks``, the function Ray Data runs), no model."""
    import numpy as np

    from pipeline.config import validate_config
    from pipeline.data.ray_data import load_chunks
    from pipeline.data.stream import resolve_stream

    cfg = validate_config(stream_config(data, args, Path(tempfile.gettempdir())))
    task = resolve_stream(cfg.stream, cfg.data.rows_per_chunk).tasks[0]
    batch = {"chunk": np.array([c.to_json() for c in task.train.chunks], dtype=object)}
    started = time.perf_counter()
    decoded = sum(len(b["label"]) for b in load_chunks(batch, label_map=task.label_map, task_index=0, size=32))
    return {"samples": decoded, "seconds": time.perf_counter() - started}


def bare_loop(data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The same work with nothing around it: decoded tensors, the method's step, the optimizer."""
    dataset = ParquetImages(data, 32)
    rows = len(dataset)
    images = torch.stack([dataset[i][0] for i in range(rows)])
    labels = torch.tensor(dataset.labels)  # a copy: the Arrow-backed array is read-only
    torch.set_num_threads(int(args.threads))
    loop = HandLoop(data, args, -(-rows // args.batch_size))
    started = time.perf_counter()
    for i in range(0, rows, args.batch_size):
        loop.step(images[i : i + args.batch_size], labels[i : i + args.batch_size])
    loop.method.end_task()
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


def profile_run(data: Path, args: argparse.Namespace) -> dict[str, Any]:
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
    run = strata_run(data, args)
    watcher.join(timeout=10)
    if not spy:
        raise RuntimeError("py-spy: the train worker was not found")
    spy[0].wait(timeout=60)  # the worker exits with the fit; py-spy then writes its file
    return {"rows": run["samples"], "train_s": run["train_s"], "breakdown": classify(out.read_text())}


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


def _stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _rate(result: dict[str, Any], key: str = "train_s") -> float:
    return result["samples"] / result[key]


def compare(data: Path, args: argparse.Namespace, workers: int) -> dict[str, Any]:
    """strata against the DataLoader loop (and, at one worker, the pre-decoded loop), alternating."""
    repeats = []
    for repeat in range(args.repeats):
        entry = {"strata": strata_run(data, args, workers), "dataloader": dataloader_loop(data, args, workers)}
        if workers == 1:
            entry["predecoded"] = bare_loop(data, args)
        entry["ratio_vs_dataloader"] = _rate(entry["strata"]) / _rate(entry["dataloader"])
        entry["end_to_end_ratio_vs_dataloader"] = _rate(entry["strata"], "wall_s") / _rate(entry["dataloader"], "wall_s")
        if workers == 1:
            entry["ratio_vs_predecoded"] = _rate(entry["strata"]) / _rate(entry["predecoded"])
        repeats.append(entry)
        line = (f"{workers} worker(s), repeat {repeat + 1}: strata {_rate(entry['strata']):.1f} samples/s "
                f"(end to end {_rate(entry['strata'], 'wall_s'):.1f}), DataLoader {_rate(entry['dataloader']):.1f} "
                f"(end to end {_rate(entry['dataloader'], 'wall_s'):.1f}), ratio {entry['ratio_vs_dataloader']:.3f}")  # fmt: skip
        if workers == 1:
            line += f"; pre-decoded {_rate(entry['predecoded']):.1f}, ratio {entry['ratio_vs_predecoded']:.3f}"
        print(line, flush=True)
    keys = ["ratio_vs_dataloader", "end_to_end_ratio_vs_dataloader"] + (["ratio_vs_predecoded"] if workers == 1 else [])
    return {"workers": workers, "repeats": repeats, **{k: _stats([r[k] for r in repeats]) for k in keys}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="finetune")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="training workers / processes to compare at")
    parser.add_argument(
        "--threads",
        type=float,
        default=float(os.cpu_count() or 1),
        help="CPUs (= torch threads) of all training workers together",
    )
    parser.add_argument("--loader-workers", type=int, default=1, help="DataLoader worker processes per training process")
    parser.add_argument("--rss-scale", type=int, default=10)
    parser.add_argument(
        "--profile", action="store_true", help="also break the training pass down with py-spy (pip install py-spy)"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench/results/overhead.json", help="one entry per method, this one replaced"
    )
    args = parser.parse_args()
    out = args.out
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from pipeline.run import init_ray

    folder = Path(tempfile.mkdtemp(prefix="strata-overhead-"))
    data = write_parquet(args.rows, folder)
    init_ray()
    strata_run(write_parquet(64, folder), args)  # warm Ray's workers and Data once, outside the measurements
    by_workers = [compare(data, args, n) for n in args.workers]
    decode = decode_only(data, args)
    print(
        f"decoding alone (read + PNG decode + resize, in-process): {decode['samples'] / decode['seconds']:.1f} samples/s",
        flush=True,
    )
    rss = {}
    for scale in (1, args.rss_scale):
        with PeakRSS() as peak:
            strata_run(data if scale == 1 else write_parquet(args.rows * scale, folder), args)
        rss[f"{scale}x"] = {
            "rows": args.rows * scale,
            "train_worker_peak_mib": round(peak.worker / 2**20, 1),
            "ray_total_peak_mib": round(peak.total / 2**20, 1),
        }
        print(f"peak RSS at {scale}x ({args.rows * scale} rows): train worker {rss[f'{scale}x']['train_worker_peak_mib']} MiB, "
              f"all Ray processes {rss[f'{scale}x']['ray_total_peak_mib']} MiB", flush=True)  # fmt: skip
    profile = None
    if args.profile:
        profile = profile_run(data, args)
        print("where the training pass's time goes (py-spy, train worker): "
              + ", ".join(f"{k} {v:.1%}" for k, v in profile["breakdown"].items()), flush=True)  # fmt: skip
    result = {
        "method": args.method, "scenario": scenario(args.method), "backbone": BACKBONE, "rows": args.rows,
        "batch_size": args.batch_size, "threads": args.threads, "loader_workers": args.loader_workers,
        "device": "cuda" if torch.cuda.is_available() else "cpu", "cpus": os.cpu_count(), "by_workers": by_workers,
        "peak_rss": rss, "decode_only_samples_per_s": decode["samples"] / decode["seconds"], "profile": profile,
    }  # fmt: skip
    for entry in by_workers:
        print(f"{entry['workers']} worker(s): strata / DataLoader loop, training {entry['ratio_vs_dataloader']['median']:.3f}, "
              f"end to end {entry['end_to_end_ratio_vs_dataloader']['median']:.3f} (medians of {args.repeats})")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    methods = previous.get("by_method", {}) if isinstance(previous, dict) else {}
    out.write_text(json.dumps({"by_method": {**methods, args.method: result}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
