"""Ray Data pipelines for a task: chunks in, decoded uint8 image batches out, never collected.

Two stages of ``map_batches`` tasks on CPU. The read stage takes one read unit per input row
(a Parquet row group's chunks, read in one pass) and yields its selected rows still encoded, a
chunk at a time; the decode stage, sized to the cluster's CPUs, turns them into images. So the
decode work spreads over the cluster however few and large the row groups are, and no task
holds more than a chunk of decoded rows. Normalisation happens later on the training device
(4x less data through the object store).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data

from pipeline.data.sources import Chunk, read_chunks, read_units
from pipeline.data.stream import ALL_ROWS, RowSelection, SplitPlan
from pipeline.errors import DataError

OUTPUT_ROWS = 128  # the most decoded rows in one block
BLOCKS_PER_WORKER = 16  # the fewest blocks a worker's share of a split is cut into
MIN_BLOCK_ROWS = 16  # below this, Ray Data's per-block cost outweighs the balance

# The decode stage's task cap is an upper bound sized to the cluster: a task whose rows come in
# fewer blocks uses fewer tasks, as intended. Ray Data warns about that in whichever process
# runs the stage (a worker, a split coordinator), and each of them imports this module to
# unpickle the stage's function.
warnings.filterwarnings(
    "ignore", message=r"The maximum number of concurrent tasks for 'MapBatches\(decode_rows\)'", category=UserWarning
)


def decode_image(data: bytes, size: int, location: str) -> np.ndarray:
    """Encoded bytes -> RGB uint8 array (3, size, size); a bad image names its location."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except Exception as exc:
        raise DataError(f"{location}: cannot decode image ({exc.__class__.__name__}: {exc})") from None
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def read_rows(
    batch: dict[str, np.ndarray],
    *,
    label_map: Sequence[int],
    task_index: int,
    rows: RowSelection = ALL_ROWS,
    consumed: np.ndarray | None = None,
) -> Iterator[pa.Table]:
    """``map_batches`` UDF, the read stage: one input row is one read unit (a JSON list of chunks);
    keep the rows of the task's classes that the split selects and that an in-task checkpoint has
    not already trained on, relabelled, their images still encoded (Arrow, never copied into
    Python objects here)."""
    lookup = np.asarray(label_map, dtype=np.int64)
    for text in batch["unit"]:
        for read in read_chunks([Chunk(**c) for c in json.loads(str(text))]):
            assert read.labels is not None  # training and evaluation chunks always read the label column
            labels = lookup[read.labels]
            selected = (labels >= 0) & rows.mask(read.sample_ids)
            if consumed is not None:
                selected &= ~consumed[read.sample_ids]
            if selected.all():  # the common case: zero-copy
                images, where = read.images, read.where
            elif selected.any():
                keep = pa.array(np.flatnonzero(selected))
                images, where = read.images.take(keep), read.where.take(keep)
            else:
                continue
            yield pa.table({
                "encoded": images, "label": labels[selected], "task": np.full(len(images), task_index, dtype=np.int64),
                "sample_id": read.sample_ids[selected], "where": where, "row": read.rows[selected],
            })  # fmt: skip


def decode_rows(batch: pa.Table, *, size: int) -> Iterator[dict[str, np.ndarray]]:
    """``map_batches`` UDF, the decode stage: encoded rows -> uint8 images (N, 3, size, size).
    A generator, as the read stage is: Ray Data hands a generator's exception (a DataError naming
    the bad image) on as the error's cause, where a plain function's reaches the driver as a bare
    "UDF failed to process a data block"."""
    encoded, where, row = batch.column("encoded").to_pylist(), batch.column("where").to_pylist(), batch.column("row").to_numpy()
    images = [decode_image(data, size, w if r < 0 else f"{w} row {r}") for data, w, r in zip(encoded, where, row, strict=True)]
    yield {
        "image": np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8),
        "label": batch.column("label").to_numpy(),
        "task": batch.column("task").to_numpy(),
        "sample_id": batch.column("sample_id").to_numpy(),
    }


def load_rows(
    chunks: Sequence[Chunk], *, label_map: Sequence[int], task_index: int, size: int, rows: RowSelection = ALL_ROWS
) -> Iterator[dict[str, np.ndarray]]:
    """Both stages in this process, a read unit at a time: the rows ``split_dataset`` streams, in plan order."""
    for unit in read_units(chunks):
        batch = {"unit": np.array([json.dumps([dataclasses.asdict(c) for c in unit])], dtype=object)}
        for table in read_rows(batch, label_map=label_map, task_index=task_index, rows=rows):
            yield from decode_rows(table, size=size)


def cluster_cpus(nodes: Sequence[Mapping[str, Any]], local_cores: int) -> int:
    """The CPUs decoding may use: the alive nodes' CPUs together; on a cluster of one node, no
    more than its cores (a local Ray declares more logical CPUs than cores, and tasks beyond the
    cores only start Python workers that wait for them)."""
    alive = [n for n in nodes if n.get("Alive")]
    cpus = int(sum(n.get("Resources", {}).get("CPU", 0) for n in alive))
    return max(1, min(cpus, local_cores) if len(alive) == 1 else cpus)


def decode_concurrency(cap: int | None) -> int:
    """Decode tasks one dataset runs at once: ``cap`` if set, else ``cluster_cpus`` (this node's
    cores when no Ray is running)."""
    if cap is not None:
        return cap
    cores = os.cpu_count() or 1
    return cluster_cpus(ray.nodes(), cores) if ray.is_initialized() else cores


def block_rows(samples: int, world: int) -> int:
    """Decoded rows per block for a split of ``samples`` rows shared by ``world`` workers.

    The streaming split hands out whole blocks, so two workers' shares differ by about a block,
    and the lockstep loop runs as many steps as the larger share needs (the other worker's
    batches come short). Blocks of ``OUTPUT_ROWS`` gave 834 rows as 512 + 322 (128 steps of
    batch 8 instead of 105); at most a ``BLOCKS_PER_WORKER``-th of a share keeps the difference
    to a few steps, and a large split keeps ``OUTPUT_ROWS``. A tiny split still gets blocks of
    ``MIN_BLOCK_ROWS``: every block costs Ray Data an object and a hand-over, and blocks of one
    or two rows slowed the test suite's sweep (104 s, against 97 s at 16 and 88 s in one block
    per worker; one run each)."""
    return max(MIN_BLOCK_ROWS, min(OUTPUT_ROWS, -(-samples // (max(world, 1) * BLOCKS_PER_WORKER))))


def split_dataset(
    split: SplitPlan,
    *,
    label_map: Sequence[int],
    task_index: int,
    size: int,
    decode_cpus: float,
    decode_tasks: int | None = None,
    shuffle_seed: int | None = None,
    consumed: np.ndarray | None = None,
    rows_per_block: int = OUTPUT_ROWS,
) -> ray.data.Dataset:
    """The split as a lazy dataset of decoded batches, in two stages: read tasks stream their read
    units (one per Parquet row group, ``sources.read_units``) and hand on encoded rows; at most
    ``decode_concurrency(decode_tasks)`` decode tasks turn them into images. ``shuffle_seed``
    shuffles the order of the read units. ``consumed`` (bool by sample id) leaves out rows an
    in-task checkpoint holds already; units with no row left are not read at all. Blocks hold
    at most ``rows_per_block`` decoded images (``block_rows``)."""
    units = read_units(split.chunks)
    if consumed is not None:
        units = [u for u in units if not all(consumed[c.first_id : c.first_id + c.num_rows].all() for c in u)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(units)
    items: list[dict[str, Any]] = [{"unit": json.dumps([dataclasses.asdict(c) for c in u])} for u in units]
    tasks = decode_concurrency(decode_tasks)
    ds = ray.data.from_items(items, override_num_blocks=max(len(items), 1))
    # Blocks of at most ``rows_per_block`` decoded images: blocks are what the streaming split
    # hands to the workers, and a decode task's outputs would otherwise coalesce into blocks of
    # Ray Data's default 128 MiB, too few to share a small task evenly among workers.
    ds.context.target_max_block_size = rows_per_block * 3 * size * size
    ds = ds.map_batches(
        read_rows,
        batch_size=1,
        num_cpus=decode_cpus,
        compute=ray.data.TaskPoolStrategy(size=max(1, min(tasks, len(items)))),
        fn_kwargs={"label_map": list(label_map), "task_index": task_index, "rows": split.rows, "consumed": consumed},
    )
    return ds.map_batches(
        decode_rows,
        batch_size=rows_per_block,
        batch_format="pyarrow",
        num_cpus=decode_cpus,
        compute=ray.data.TaskPoolStrategy(size=tasks),
        fn_kwargs={"size": size},
    )


def source_rows(split: SplitPlan) -> int:
    """One past the largest sample id of the split's source: the size of a bitmap over its rows."""
    return max((c.first_id + c.num_rows for c in split.chunks), default=0)
