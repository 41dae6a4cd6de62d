"""Checkpoints inside a task: where a phase stands, so a restarted worker group goes on from there.

Every ``train.checkpoint_every`` steps (or ``train.checkpoint_every_s`` seconds, decided by rank
0 and agreed in the step's all-reduce) every rank reports, rank 0 with a checkpoint holding the
stream's ``progress.json`` and the phase's state: the method's task state (trainable parameters
and buffers, partial sums reduced over ranks), the optimizer's and the schedule's state, every
rank's RNG state, the step and sample counts, and which sample ids of each task have entered a
gradient step (a bitmap per task, all-reduced, so it is exact across ranks).

A worker group that starts from such a checkpoint rebuilds the phase's dataset from the rows the
bitmap does not hold (``PhaseDataset``, which rank 0 calls whenever a phase starts),
loads the state, and trains on: every training sample enters the final adapters exactly once.
Tensors go to safetensors, everything else to JSON; nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import ray.data
import ray.train
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file, save_file

from pipeline import jsonout
from pipeline.data.ray_data import block_rows, split_dataset
from pipeline.data.stream import SplitPlan
from pipeline.train.progress import Progress

STATE_TENSORS = "phase_state.safetensors"
STATE_META = "phase_state.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass
class PhaseState:
    """A phase after ``steps`` optimizer steps; ``consumed`` maps a stream task to the bool bitmap
    (by sample id) of its rows that have entered a step, over all ranks."""

    phase_index: int
    steps: int
    samples: list[int]
    loss_sum: float
    consumed: dict[int, torch.Tensor]
    method: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None  # torch's optimizer state_dict
    scheduler: dict[str, Any] | None = None  # torch's LRScheduler state_dict (its lambdas excluded)
    rng: torch.Tensor | None = None  # (world, n) every rank's CPU RNG state

    def write(self, directory: Path) -> None:
        tensors = {f"method.{k}": v.detach().cpu().contiguous() for k, v in self.method.items()}
        tensors |= {f"consumed.{task}": torch.from_numpy(np.packbits(bits.cpu().numpy())) for task, bits in self.consumed.items()}
        meta: dict[str, Any] = {
            "phase_index": self.phase_index,
            "steps": self.steps,
            "samples": self.samples,
            "loss_sum": self.loss_sum,
            "consumed_rows": {str(task): len(bits) for task, bits in self.consumed.items()},
            "scheduler": self.scheduler,
        }
        if self.optimizer is not None:
            opt_tensors, meta["optimizer"] = _split_optimizer_state(self.optimizer)
            tensors |= opt_tensors
        if self.rng is not None:
            tensors["rng"] = self.rng.cpu().contiguous()
        save_file(tensors, str(directory / STATE_TENSORS))
        (directory / STATE_META).write_text(jsonout.dumps(meta, indent=1))

    @classmethod
    def read(cls, directory: Path) -> PhaseState | None:
        if not (directory / STATE_META).is_file():
            return None
        meta = json.loads((directory / STATE_META).read_text())
        tensors = load_file(str(directory / STATE_TENSORS))
        consumed = {task: torch.from_numpy(bits) for task, bits in _consumed(tensors, meta).items()}
        optimizer = _join_optimizer_state(tensors, meta["optimizer"]) if "optimizer" in meta else None
        return cls(
            phase_index=meta["phase_index"],
            steps=meta["steps"],
            samples=meta["samples"],
            loss_sum=meta["loss_sum"],
            consumed=consumed,
            method={k.removeprefix("method."): v for k, v in tensors.items() if k.startswith("method.")},
            optimizer=optimizer,
            scheduler=meta["scheduler"],
            rng=tensors.get("rng"),
        )


def _consumed(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[int, np.ndarray]:
    """The packed consumed-row bitmaps of a phase state, by task, as bool arrays."""
    return {
        int(task): np.unpackbits(tensors[f"consumed.{task}"].numpy())[:rows].astype(bool)
        for task, rows in meta["consumed_rows"].items()
    }


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch's optimizer state_dict as tensors (``opt.<param>.<key>``) plus JSON for the rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"opt.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            index, key = name.removeprefix("opt.").split(".", 1)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


@dataclass(frozen=True)
class CheckpointLocator:
    """Where Train keeps a run's checkpoints (``storage_path/name``, a path or URI)."""

    storage_path: str
    run_name: str

    def latest(self) -> str | None:
        """The checkpoint Train restores a worker group from: the latest one in its own snapshot
        (the file Train V2 reloads on a restart and on a re-run with the same name)."""
        root = f"{self.storage_path.rstrip('/')}/{self.run_name}"
        fs, path = fsspec.core.url_to_fs(f"{root}/{RAY_SNAPSHOT}")
        if not fs.exists(path):
            return None
        with fs.open(path, "rb") as fh:
            latest = (json.loads(fh.read()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        return f"{root}/{latest}" if latest else None

    def consumed(self, phase_index: int) -> dict[int, np.ndarray]:
        """The rows of phase ``phase_index`` that the latest checkpoint holds, by task; {} if the
        latest checkpoint is not inside that phase."""
        latest = self.latest()
        if latest is None:
            return {}
        fs, root = fsspec.core.url_to_fs(latest)
        if not fs.exists(f"{root}/{STATE_META}"):
            return {}
        meta = json.loads(fs.cat_file(f"{root}/{STATE_META}"))
        if meta["phase_index"] != phase_index:
            return {}
        return _consumed(load_tensors(fs.cat_file(f"{root}/{STATE_TENSORS}")), meta)


@dataclass(frozen=True)
class PhaseDataset:
    """A phase's training data as a callable: rank 0 calls it when the phase starts, so a worker
    group restarted inside the phase reads only the rows its checkpoint does not hold."""

    phase_index: int
    parts: tuple[tuple[SplitPlan, tuple[int, ...], int, int | None], ...]  # (split, label_map, task, shuffle seed)
    size: int
    decode_cpus: float
    decode_tasks: int | None
    checkpoints: CheckpointLocator
    world: int  # the workers that share it: blocks are cut to split it evenly (``block_rows``)

    def __call__(self) -> ray.data.Dataset:
        consumed = self.checkpoints.consumed(self.phase_index)
        datasets = [
            split_dataset(
                split,
                label_map=label_map,
                task_index=task,
                size=self.size,
                decode_cpus=self.decode_cpus,
                decode_tasks=self.decode_tasks,
                shuffle_seed=seed,
                consumed=consumed.get(task),
                rows_per_block=block_rows(split.num_samples, self.world),
            )  # fmt: skip
            for split, label_map, task, seed in self.parts
        ]
        return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def read_checkpoint(checkpoint: ray.train.Checkpoint | None, start: Progress) -> tuple[Progress, PhaseState | None]:
    """The progress a worker group starts from (``start`` without a checkpoint) and, if the
    checkpoint was taken inside a phase, that phase's state. Starting from a checkpoint counts
    as a resume (a restart after a failure, or a continued run)."""
    if checkpoint is None:
        return start, None
    with checkpoint.as_directory() as path:
        progress = Progress.from_directory(Path(path))
        state = PhaseState.read(Path(path))
    progress.resumes += 1
    return progress, state
