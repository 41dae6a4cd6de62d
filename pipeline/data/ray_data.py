"""Ray Data pipelines for a task: chunks in, decoded uint8 image batches out, never collected.

Reading and decoding happen in ``map_batches`` tasks on CPU; one input row is one chunk, and
the output is yielded in small blocks so no worker holds more than a chunk at a time.
Normalisation happens later on the training device (4x less data through the object store).
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import ray.data

from pipeline.data.sources import Chunk, reader_for
from pipeline.data.stream import ALL_ROWS, RowSelection, SplitPlan
from pipeline.errors import DataError

OUTPUT_ROWS = 128


def decode_image(data: bytes, size: int, location: str) -> np.ndarray:
    """Encoded bytes -> RGB uint8 array (3, size, size); a bad image names its location."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except Exception as exc:
        raise DataError(f"{location}: cannot decode image ({exc.__class__.__name__}: {exc})") from None
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def load_chunks(
    batch: dict[str, np.ndarray],
    *,
    label_map: Sequence[int],
    task_index: int,
    size: int,
    rows: RowSelection = ALL_ROWS,
    consumed: np.ndarray | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """``map_batches`` UDF: read each chunk, keep the rows of the task's classes that the split
    selects and that an in-task checkpoint has not already trained on, decode, relabel."""
    lookup = np.asarray(label_map, dtype=np.int64)
    for text in batch["chunk"]:
        chunk = Chunk.from_json(str(text))
        read = reader_for(chunk.type).read(chunk)
        labels = lookup[read.labels]
        selected = (labels >= 0) & rows.mask(read.sample_ids)
        if consumed is not None:
            selected &= ~consumed[read.sample_ids]
        keep = np.flatnonzero(selected)
        for start in range(0, len(keep), OUTPUT_ROWS):
            idx = keep[start : start + OUTPUT_ROWS]
            yield {
                "image": np.stack([decode_image(read.images[i], size, read.locations[i]) for i in idx]),
                "label": labels[idx],
                "task": np.full(len(idx), task_index, dtype=np.int64),
                "sample_id": read.sample_ids[idx],
            }


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
) -> ray.data.Dataset:
    """The split as a lazy dataset of decoded batches, decoded by at most ``decode_tasks`` tasks at
    once (default: this node's CPU cores). ``consumed`` (bool by sample id) leaves out rows an
    in-task checkpoint holds already; chunks with no row left are not read at all."""
    chunks = list(split.chunks)
    if consumed is not None:
        chunks = [c for c in chunks if not consumed[c.first_id : c.first_id + c.num_rows].all()]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(chunks)
    items: list[dict[str, Any]] = [{"chunk": c.to_json()} for c in chunks]
    ds = ray.data.from_items(items, override_num_blocks=max(len(items), 1))
    return ds.map_batches(
        load_chunks,
        batch_size=1,
        num_cpus=decode_cpus,
        compute=ray.data.TaskPoolStrategy(size=max(1, min(decode_tasks or os.cpu_count() or 1, len(items)))),
        fn_kwargs={"label_map": list(label_map), "task_index": task_index, "size": size, "rows": split.rows, "consumed": consumed},
    )


def source_rows(split: SplitPlan) -> int:
    """One past the largest sample id of the split's source: the size of a bitmap over its rows."""
    return max((c.first_id + c.num_rows for c in split.chunks), default=0)
