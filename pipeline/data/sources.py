"""Source readers: list a source's deterministic chunks, read runs of chunks, stream its labels.

A chunk is the unit of planning and of recovery: a slice of a Parquet row group, a run of
image files, a row range of a generator. Chunks are JSON-serialisable, ordered, and carry the
id of their first row, so every sample has a stable ``sample_id`` (its row index in the source).

A *read unit* is what one read task reads in one pass: the chunks of one Parquet row group
(``unit_key``). ``read_many`` opens a unit's file once and streams the row group a buffer at a
time, so each byte of the columns read is read once, however the row group is sliced into
chunks; reading chunks one by one would read a row group's leading pages again for each. It
yields ``ChunkRows`` at the granularity that reads best (for Parquet, runs of wanted rows within
one decoded batch), not necessarily one per chunk; sample ids say which rows they are.
"""

from __future__ import annotations

import io
import json
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import FolderSource, GeneratorSource, ParquetSource
from pipeline.data import generators
from pipeline.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
PARQUET_COLUMNS = ["image", "label"]
READ_BUFFER_BYTES = 1 << 20  # Parquet column chunks are streamed through a buffer this size, never read whole
LABEL_SCAN_THREADS = 16  # files whose label column planning reads at once
READ_BATCH_BYTES = 16 << 20  # rows decoded from Parquet at a time (and handed on as one piece): about this many bytes


@dataclass(frozen=True)
class Chunk:
    """One read unit of a source: which reader, where, and the id of its first row."""

    type: str
    ref: dict[str, Any]
    first_id: int
    num_rows: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Chunk:
        return cls(**json.loads(text))


@dataclass
class ChunkRows:
    """Rows as read (a chunk, or a run of a read unit's rows): encoded images (Arrow binary, not
    copied into Python objects), source labels, sample ids, and where each row lives (``location``)."""

    images: pa.Array
    labels: np.ndarray | None  # None where the chunk leaves the label column out
    sample_ids: np.ndarray
    where: pa.Array  # string per row: a file, or "file row group g" with the row in ``rows``
    rows: np.ndarray  # the row's index within ``where``; -1 where ``where`` names the row itself

    def location(self, i: int) -> str:
        where, row = str(self.where[i]), int(self.rows[i])
        return where if row < 0 else f"{where} row {row}"


@dataclass
class LabelBlock:
    """Labels of a stretch of a source, for validation before training."""

    location: str
    first_row: int
    labels: np.ndarray


class SourceReader(Protocol):
    def class_names(self, spec: Any) -> list[str] | None: ...
    def chunks(self, spec: Any, rows_per_chunk: int) -> list[Chunk]: ...
    def labels(self, spec: Any) -> Iterator[LabelBlock]: ...
    def unit_key(self, chunk: Chunk) -> Hashable: ...
    def read_many(self, chunks: Sequence[Chunk]) -> Iterator[ChunkRows]: ...


_READERS: dict[str, SourceReader] = {}


def register_source(type_name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        _READERS[type_name] = cls()
        return cls

    return deco


def reader_for(type_name: str) -> SourceReader:
    return _READERS[type_name]


def read_units(chunks: Sequence[Chunk]) -> list[list[Chunk]]:
    """``chunks`` (in plan order) grouped into read units: runs of consecutive chunks that share
    their reader's ``unit_key``."""
    units: list[list[Chunk]] = []
    last: Hashable = None
    for chunk in chunks:
        key = (chunk.type, reader_for(chunk.type).unit_key(chunk))
        if units and key == last:
            units[-1].append(chunk)
        else:
            units.append([chunk])
        last = key
    return units


def read_chunks(chunks: Sequence[Chunk]) -> Iterator[ChunkRows]:
    """The rows of each of ``chunks``, in order, reading each read unit once."""
    for unit in read_units(chunks):
        yield from reader_for(unit[0].type).read_many(unit)


def _one_per_row(text: str, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(text), n)


def _split(first_id: int, num_rows: int, rows_per_chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, num_rows, rows_per_chunk):
        yield start, min(rows_per_chunk, num_rows - start)


@register_source("parquet")
class ParquetReader:
    def files(self, spec: ParquetSource) -> list[str]:
        out: list[str] = []
        for path in [spec.path] if isinstance(spec.path, str) else spec.path:
            fs, fs_path = fsspec.core.url_to_fs(path)
            if any(ch in fs_path for ch in "*?["):
                found = sorted(fs.glob(fs_path))
            elif fs.isdir(fs_path):
                found = sorted(fs.glob(fs_path.rstrip("/") + "/*.parquet"))
            elif fs.isfile(fs_path):
                found = [fs_path]
            else:
                raise DataError(f"{path}: no such file or directory")
            if not found:
                raise DataError(f"{path}: no Parquet files found")
            out.extend(path if found == [fs_path] else fs.unstrip_protocol(f) for f in found)
        return out

    def _open(self, path: str, columns: Sequence[str] = PARQUET_COLUMNS) -> pq.ParquetFile:
        try:
            pf = pq.ParquetFile(fsspec.open(path, "rb").open(), buffer_size=READ_BUFFER_BYTES)
        except Exception as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc.__class__.__name__}: {exc})") from None
        missing = set(columns) - set(pf.schema_arrow.names)
        if missing:
            raise DataError(f"{path}: missing column {sorted(missing)[0]!r} (needs {' and '.join(repr(c) for c in columns)})")
        return pf

    def class_names(self, spec: ParquetSource) -> list[str] | None:
        names: list[str] | None = None
        for path in self.files(spec):
            meta = self._open(path).schema_arrow.metadata or {}
            if b"classes" not in meta:
                continue
            found = json.loads(meta[b"classes"])
            if names is not None and found != names:
                raise DataError(f"{path}: its 'classes' metadata differs from the other files of this source")
            names = found
        return names

    def chunks(self, spec: ParquetSource, rows_per_chunk: int, columns: Sequence[str] = PARQUET_COLUMNS) -> list[Chunk]:
        """The files' row groups cut into chunks; ``columns`` other than image and label (e.g.
        image alone, for unlabelled images to predict) are named in each chunk."""
        out: list[Chunk] = []
        first_id = 0
        extra = {} if list(columns) == PARQUET_COLUMNS else {"columns": list(columns)}
        for path in self.files(spec):
            meta = self._open(path, columns).metadata
            for rg in range(meta.num_row_groups):
                rows = meta.row_group(rg).num_rows
                for start, n in _split(first_id, rows, rows_per_chunk):
                    out.append(Chunk("parquet", {"path": path, "row_group": rg, "start": start, **extra}, first_id + start, n))
                first_id += rows
        return out

    def labels(self, spec: ParquetSource) -> Iterator[LabelBlock]:
        """The label column of every file, in order; up to ``LABEL_SCAN_THREADS`` files are read
        at once (a footer and one column chunk per row group each: the scan waits on storage
        round trips, not on this process's CPU, so a source of many files in an object store is
        planned in about the time of its slowest files, not of all of them in turn)."""
        files = self.files(spec)
        first_row = 0
        with ThreadPoolExecutor(max_workers=max(1, min(LABEL_SCAN_THREADS, len(files)))) as pool:
            pending: deque[tuple[str, Future[list[pa.ChunkedArray]]]] = deque()
            queue = iter(files)
            while True:
                while len(pending) < 2 * LABEL_SCAN_THREADS and (path := next(queue, None)) is not None:
                    pending.append((path, pool.submit(self._label_columns, path)))
                if not pending:
                    return
                path, future = pending.popleft()
                for column in future.result():
                    if column.null_count:
                        row = first_row + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
                        raise DataError(f"{path}: column 'label' is null at row {row}")
                    labels = column.to_numpy().astype(np.int64)
                    yield LabelBlock(path, first_row, labels)
                    first_row += len(labels)

    def _label_columns(self, path: str) -> list[pa.ChunkedArray]:
        """One file's label column, a row group at a time."""
        pf = self._open(path)
        kind = pf.schema_arrow.field("label").type
        if not pa.types.is_integer(kind):
            raise DataError(f"{path}: column 'label' holds {kind} values; it must hold integer class indices")
        return [pf.read_row_group(rg, columns=["label"]).column("label") for rg in range(pf.metadata.num_row_groups)]

    def unit_key(self, chunk: Chunk) -> Hashable:
        return chunk.ref["path"], chunk.ref["row_group"]

    def read_many(self, chunks: Sequence[Chunk]) -> Iterator[ChunkRows]:
        files: dict[str, pq.ParquetFile] = {}
        groups: dict[tuple[str, int], list[Chunk]] = {}
        for chunk in chunks:
            groups.setdefault((chunk.ref["path"], chunk.ref["row_group"]), []).append(chunk)
        for (path, rg), wanted in groups.items():
            columns = wanted[0].ref.get("columns", PARQUET_COLUMNS)
            if path not in files:
                files[path] = self._open(path, columns)
            yield from self._row_group(files[path], path, rg, sorted(wanted, key=lambda c: c.ref["start"]), columns)

    def _row_group(self, pf: pq.ParquetFile, path: str, rg: int, wanted: list[Chunk], columns: list[str]) -> Iterator[ChunkRows]:
        """Stream row group ``rg`` once, in batches of about ``READ_BATCH_BYTES``, and hand on the
        rows of the ``wanted`` chunks (sorted by start) as zero-copy slices of those batches, a
        batch at a time; reading stops after the last wanted row."""
        first_id = wanted[0].first_id - wanted[0].ref["start"]  # sample id of the row group's row 0
        ranges: list[list[int]] = []  # the wanted rows as merged [start, stop) runs
        for chunk in wanted:
            start, stop = chunk.ref["start"], chunk.ref["start"] + chunk.num_rows
            if ranges and ranges[-1][1] == start:
                ranges[-1][1] = stop
            else:
                ranges.append([start, stop])
        group = pf.metadata.row_group(rg)
        row_bytes = max(1, group.total_byte_size // max(group.num_rows, 1))
        batch_rows = max(max(c.num_rows for c in wanted), READ_BATCH_BYTES // row_bytes)
        where = f"{path} row group {rg}"
        at, run = 0, 0  # row group row of the batch's first row; the first range not yet done
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[rg], columns=columns):
            end = at + batch.num_rows
            while run < len(ranges) and ranges[run][0] < end:
                lo, hi = max(ranges[run][0], at), min(ranges[run][1], end)
                piece = batch.slice(lo - at, hi - lo)
                yield ChunkRows(
                    images=piece.column("image"),
                    labels=piece.column("label").to_numpy().astype(np.int64) if "label" in columns else None,
                    sample_ids=np.arange(first_id + lo, first_id + hi, dtype=np.int64),
                    where=_one_per_row(where, hi - lo),
                    rows=np.arange(lo, hi, dtype=np.int64),
                )
                if ranges[run][1] > end:
                    break
                run += 1
            if run == len(ranges):
                return
            at = end
        if run < len(ranges):
            raise DataError(f"{where}: ends before row {ranges[-1][1]}; the file changed after it was planned")


@register_source("folder")
class FolderReader:
    def _listing(self, spec: FolderSource) -> tuple[list[str], list[tuple[str, int]]]:
        root = Path(spec.path)
        if not root.is_dir():
            raise DataError(f"{spec.path}: no such directory")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"{spec.path}: no class subfolders")
        files = [
            (str(f), label)
            for label, name in enumerate(classes)
            for f in sorted((root / name).iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
        return classes, files

    def class_names(self, spec: FolderSource) -> list[str] | None:
        return self._listing(spec)[0]

    def chunks(self, spec: FolderSource, rows_per_chunk: int) -> list[Chunk]:
        _, files = self._listing(spec)
        return [
            Chunk("folder", {"files": [f for f, _ in files[s : s + n]], "labels": [lab for _, lab in files[s : s + n]]}, s, n)
            for s, n in _split(0, len(files), rows_per_chunk)
        ]

    def labels(self, spec: FolderSource) -> Iterator[LabelBlock]:
        _, files = self._listing(spec)
        yield LabelBlock(spec.path, 0, np.array([lab for _, lab in files], dtype=np.int64))

    def unit_key(self, chunk: Chunk) -> Hashable:
        return chunk.first_id  # every file is read on its own: a chunk is its own unit

    def read_many(self, chunks: Sequence[Chunk]) -> Iterator[ChunkRows]:
        for chunk in chunks:
            images = []
            for path in chunk.ref["files"]:
                with open(path, "rb") as fh:
                    images.append(fh.read())
            yield ChunkRows(
                images=pa.array(images, pa.binary()),
                labels=np.asarray(chunk.ref["labels"], dtype=np.int64),
                sample_ids=np.arange(chunk.first_id, chunk.first_id + chunk.num_rows, dtype=np.int64),
                where=pa.array(chunk.ref["files"], pa.string()),
                rows=np.full(chunk.num_rows, -1, dtype=np.int64),
            )


@register_source("generator")
class GeneratorReader:
    def class_names(self, spec: GeneratorSource) -> list[str] | None:
        return generators.get(spec.name).classes(spec.params)

    def chunks(self, spec: GeneratorSource, rows_per_chunk: int) -> list[Chunk]:
        total = generators.get(spec.name).num_rows(spec.split, spec.params)
        ref = {"name": spec.name, "split": spec.split, "params": spec.params}
        return [Chunk("generator", {**ref, "start": s}, s, n) for s, n in _split(0, total, rows_per_chunk)]

    def labels(self, spec: GeneratorSource) -> Iterator[LabelBlock]:
        gen = generators.get(spec.name)
        _, labels = gen.rows(spec.split, spec.params, 0, gen.num_rows(spec.split, spec.params))
        yield LabelBlock(f"generator {spec.name}:{spec.split}", 0, labels.astype(np.int64))

    def unit_key(self, chunk: Chunk) -> Hashable:
        return chunk.first_id  # rows are computed, not read: nothing to share between chunks

    def read_many(self, chunks: Sequence[Chunk]) -> Iterator[ChunkRows]:
        for chunk in chunks:
            ref = chunk.ref
            start = ref["start"]
            arrays, labels = generators.get(ref["name"]).rows(ref["split"], ref["params"], start, start + chunk.num_rows)
            yield ChunkRows(
                images=pa.array([_png(a) for a in arrays], pa.binary()),
                labels=labels.astype(np.int64),
                sample_ids=np.arange(chunk.first_id, chunk.first_id + chunk.num_rows, dtype=np.int64),
                where=_one_per_row(f"generator {ref['name']}:{ref['split']}", chunk.num_rows),
                rows=np.arange(start, start + chunk.num_rows, dtype=np.int64),
            )


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
