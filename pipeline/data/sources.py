"""Source readers: list a source's deterministic chunks, read one chunk, stream its labels.

A chunk is the unit of reading and of recovery: a slice of a Parquet row group, a run of
image files, a row range of a generator. Chunks are JSON-serialisable, ordered, and carry the
id of their first row, so every sample has a stable ``sample_id`` (its row index in the source).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
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
    images: list[bytes]
    labels: np.ndarray
    sample_ids: np.ndarray
    locations: list[str]


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
    def read(self, chunk: Chunk) -> ChunkRows: ...


_READERS: dict[str, SourceReader] = {}


def register_source(type_name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        _READERS[type_name] = cls()
        return cls

    return deco


def reader_for(type_name: str) -> SourceReader:
    return _READERS[type_name]


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

    def _open(self, path: str) -> pq.ParquetFile:
        try:
            pf = pq.ParquetFile(fsspec.open(path, "rb").open())
        except Exception as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc.__class__.__name__}: {exc})") from None
        missing = {"image", "label"} - set(pf.schema_arrow.names)
        if missing:
            raise DataError(f"{path}: missing column {sorted(missing)[0]!r} (needs 'image' and 'label')")
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

    def chunks(self, spec: ParquetSource, rows_per_chunk: int) -> list[Chunk]:
        out: list[Chunk] = []
        first_id = 0
        for path in self.files(spec):
            meta = self._open(path).metadata
            for rg in range(meta.num_row_groups):
                rows = meta.row_group(rg).num_rows
                for start, n in _split(first_id, rows, rows_per_chunk):
                    out.append(Chunk("parquet", {"path": path, "row_group": rg, "start": start}, first_id + start, n))
                first_id += rows
        return out

    def labels(self, spec: ParquetSource) -> Iterator[LabelBlock]:
        first_row = 0
        for path in self.files(spec):
            pf = self._open(path)
            kind = pf.schema_arrow.field("label").type
            if not pa.types.is_integer(kind):
                raise DataError(f"{path}: column 'label' holds {kind} values; it must hold integer class indices")
            for rg in range(pf.metadata.num_row_groups):
                column = pf.read_row_group(rg, columns=["label"]).column("label")
                if column.null_count:
                    row = first_row + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
                    raise DataError(f"{path}: column 'label' is null at row {row}")
                labels = column.to_numpy(zero_copy_only=False)
                yield LabelBlock(path, first_row, labels.astype(np.int64))
                first_row += len(labels)

    def read(self, chunk: Chunk) -> ChunkRows:
        ref = chunk.ref
        table = self._open(ref["path"]).read_row_group(ref["row_group"], columns=["image", "label"])
        table = table.slice(ref["start"], chunk.num_rows)
        rows = range(ref["start"], ref["start"] + chunk.num_rows)
        return ChunkRows(
            images=table.column("image").to_pylist(),
            labels=table.column("label").to_numpy(zero_copy_only=False).astype(np.int64),
            sample_ids=np.arange(chunk.first_id, chunk.first_id + chunk.num_rows, dtype=np.int64),
            locations=[f"{ref['path']} row group {ref['row_group']} row {r}" for r in rows],
        )


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

    def read(self, chunk: Chunk) -> ChunkRows:
        images = []
        for path in chunk.ref["files"]:
            with open(path, "rb") as fh:
                images.append(fh.read())
        return ChunkRows(
            images=images,
            labels=np.asarray(chunk.ref["labels"], dtype=np.int64),
            sample_ids=np.arange(chunk.first_id, chunk.first_id + chunk.num_rows, dtype=np.int64),
            locations=list(chunk.ref["files"]),
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

    def read(self, chunk: Chunk) -> ChunkRows:
        ref = chunk.ref
        start = ref["start"]
        arrays, labels = generators.get(ref["name"]).rows(ref["split"], ref["params"], start, start + chunk.num_rows)
        return ChunkRows(
            images=[_png(a) for a in arrays],
            labels=labels.astype(np.int64),
            sample_ids=np.arange(chunk.first_id, chunk.first_id + chunk.num_rows, dtype=np.int64),
            locations=[f"generator {ref['name']}:{ref['split']} row {r}" for r in range(start, start + chunk.num_rows)],
        )


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
