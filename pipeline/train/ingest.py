"""How a worker group reads its data, with the same number of Ray actors however long the stream.

Training: rank 0 builds a phase's dataset when the phase starts and splits it with
``streaming_split(world, equal=False)``, so every row reaches exactly one worker (Ray Train's
default split, ``equal=True``, drops rows to even the shards out). The split's coordinator actor
lives for that phase only. Handing Train one dataset per phase and per test set up front, as
strata did before, kept 2T coordinators alive for the whole run.

Evaluation needs no coordinator: each rank reads a fixed share of a test set's chunks through
Ray Data (the executor runs inside the worker), so every test sample is scored by exactly one
rank. A share is decoded once per run and its uint8 batches kept on local disk, up to
``eval.cache_mb`` per worker; every later evaluation reads them back instead of decoding the
same images again after every task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import torch
import torch.distributed as dist
from ray.data import DataIterator
from ray.train.collective import barrier, broadcast_from_rank_zero
from safetensors.torch import load_file, save_file

from pipeline.data.ray_data import split_dataset
from pipeline.data.sources import Chunk
from pipeline.data.stream import SplitPlan, StreamPlan
from pipeline.methods import Batch


class PhaseSplit:
    """This rank's shard of a phase's dataset, which rank 0 builds: every row to exactly one rank.
    ``close`` on every rank, once it has read its last batch, ends the split's coordinator."""

    def __init__(self, shard: DataIterator, coordinator: Any, world: int) -> None:
        self.shard = shard
        self._coordinator = coordinator
        self._world = world

    @classmethod
    def open(cls, make: Callable[[], ray.data.Dataset], name: str, rank: int, world: int) -> PhaseSplit:
        if world == 1:  # no split, no coordinator: the executor runs in this worker
            dataset = make()
            dataset.set_name(name)
            return cls(dataset.iterator(), None, world)
        nodes: list[Any] = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())  # locality: rows go to their node's worker
        shards, coordinator = None, None
        if rank == 0:
            dataset = make()
            dataset.set_name(name)
            splits = dataset.streaming_split(world, equal=False, locality_hints=nodes)
            # Ray keeps a split's coordinator alive for as long as any handle to it lives, and a
            # finished iterator's handles linger (reference cycles): the phase ends it explicitly.
            coordinator = getattr(splits[0], "_coord_actor", None)
            shards = [ray.put(splits)]
        shards = broadcast_from_rank_zero(shards)
        assert shards is not None
        shard = ray.get(shards[0])[rank]
        barrier()  # every rank holds its shard before rank 0 lets go of the list
        return cls(shard, coordinator, world)

    def close(self) -> None:
        if self._world > 1:
            barrier()  # nobody is still reading
        if self._coordinator is not None:
            ray.kill(self._coordinator, no_restart=True)
            self._coordinator = None


def contiguous_share(chunks: tuple[Chunk, ...], rank: int, world: int) -> tuple[Chunk, ...]:
    """Rank ``rank``'s share of ``chunks``: a contiguous run holding about 1/world of the rows, so
    a read unit (a Parquet row group) is read by one rank, or at most two where a cut falls in it
    (interleaved chunks would make every rank read every row group)."""
    rows = np.array([c.num_rows for c in chunks], dtype=np.int64)
    total = int(rows.sum())
    if total == 0:
        return chunks if rank == world - 1 else ()
    # A chunk goes to the rank whose 1/world of the rows holds its middle row: the owners rise
    # with the chunk index (contiguous shares), and no rank is left empty while another holds
    # two chunks' worth (cutting at chunk ends gave a 256-row first chunk of 327 rows to nobody).
    owner = np.minimum((np.cumsum(rows) - rows / 2) * world // total, world - 1).astype(np.int64)
    return tuple(c for c, o in zip(chunks, owner, strict=True) if o == rank)


class TestSets:
    """This rank's share of every task's evaluation split, decoded once per run.

    A share is a contiguous run of the task's chunks (``contiguous_share``). Its first reading
    goes through Ray Data and
    writes each decoded batch to ``cache_dir`` while the budget lasts; a share that fits whole
    is read back from there ever after (one that does not is decoded again every time)."""

    def __init__(
        self,
        plan: StreamPlan,
        *,
        use_validation: bool,
        size: int,
        decode_cpus: float,
        decode_tasks: int | None,
        rank: int,
        world: int,
        batch_size: int,
        device: torch.device,
        cache_dir: Path,
        cache_bytes: int,
    ) -> None:
        self._plan = plan
        self._use_validation = use_validation
        self._size = size
        self._decode_cpus = decode_cpus
        self._decode_tasks = decode_tasks
        self._rank, self._world = rank, world
        self._batch_size = batch_size
        self._device = device
        self._cache_dir = cache_dir
        self._budget = cache_bytes
        self._cached: dict[int, list[Path]] = {}

    def share(self, task: int) -> SplitPlan:
        split = self._plan.tasks[task].validation if self._use_validation else self._plan.tasks[task].test
        assert split is not None
        return dataclasses.replace(split, chunks=contiguous_share(split.chunks, self._rank, self._world))

    def batches(self, task: int) -> Iterator[Batch]:
        if task in self._cached:
            for path in self._cached[task]:
                yield {k: v.to(self._device) for k, v in load_file(str(path)).items()}
            return
        share = self.share(task)
        if not share.chunks:
            self._cached[task] = []
            return
        dataset = split_dataset(
            share, label_map=self._plan.tasks[task].label_map, task_index=task, size=self._size,
            decode_cpus=self._decode_cpus, decode_tasks=self._decode_tasks,
        )  # fmt: skip
        files: list[Path] = []
        used = 0
        caching, complete = True, False
        try:
            for arrays in dataset.iter_batches(batch_size=self._batch_size, batch_format="numpy"):
                # Arrays out of the object store are read-only; torch wants to own writable memory.
                batch = {k: torch.from_numpy(np.require(v, requirements="W")) for k, v in arrays.items()}
                if caching:
                    nbytes = sum(t.nbytes for t in batch.values())
                    if nbytes <= self._budget - used:
                        files.append(self._cache_dir / f"task{task}-{len(files)}.safetensors")
                        save_file({k: v.contiguous() for k, v in batch.items()}, str(files[-1]))
                        used += nbytes
                    else:
                        caching = False
                yield {k: v.to(self._device) for k, v in batch.items()}
            complete = True
        finally:
            if caching and complete:
                self._cached[task] = files
                self._budget -= used
            else:
                for path in files:
                    path.unlink(missing_ok=True)

    @property
    def cached_tasks(self) -> list[int]:
        return sorted(self._cached)
