"""The memory store: what survives each task, as versioned, checksummed safetensors records.

Layout of a store directory (a local path or any fsspec URI)::

    manifest.json            {"format": ..., "records": [entry, ...]}  -- written last
    0000-<task_id>.safetensors

A record is visible only once the manifest lists it: the tensor file is written to a temporary
name and renamed, then the manifest is rewritten the same way. A crash at any point leaves the
previous manifest, and so the previous version of the model, intact. Every file's sha256 is in
the manifest and is verified on load. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.errors import StoreError

FORMAT = "strata-memory/1"
MANIFEST = "manifest.json"


@dataclass
class TaskRecord:
    """What a method keeps from one task: named tensors plus JSON-serialisable metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class RecordEntry:
    version: int  # 1-based: the store after this record is version `version`
    task_index: int
    task_id: str
    method: str
    backbone_id: str
    file: str
    sha256: str
    memory_bytes: int  # tensor payload
    file_bytes: int
    created: float
    plan: dict[str, Any] | None = None  # the task's plan when it was learned (data.stream.task_plan_record)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


NAME_CHARS = 60


def safe_name(name: str) -> str:
    """A task id as a file-name part, distinct for distinct ids: an id that is not already a
    short, plain name keeps a readable prefix and gains ``~`` and a hash of the whole id (``~``
    never occurs in a plain name, so no id's name can equal another's)."""
    plain = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    if plain == name and len(name) <= NAME_CHARS:
        return name
    return f"{plain[: NAME_CHARS - 13]}~{hashlib.sha256(name.encode()).hexdigest()[:12]}"


class MemoryStore:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root = fsspec.core.url_to_fs(uri)

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _location(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"

    def _write_atomic(self, name: str, data: bytes) -> None:
        tmp = self._path(f".{name}.{uuid.uuid4().hex}.tmp")
        with self.fs.open(tmp, "wb") as fh:
            fh.write(data)
        self.fs.mv(tmp, self._path(name))

    def _read_manifest(self) -> dict[str, Any]:
        path = self._path(MANIFEST)
        if not self.fs.exists(path):
            return {"format": FORMAT, "records": []}
        try:
            with self.fs.open(path, "rb") as fh:
                manifest = json.loads(fh.read())
        except (OSError, ValueError) as exc:
            raise StoreError(f"{self._location(MANIFEST)}: unreadable manifest ({exc})") from None
        if not isinstance(manifest, dict):
            raise StoreError(f"{self._location(MANIFEST)}: not a strata manifest (its top level is a {type(manifest).__name__})")
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{self._location(MANIFEST)}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        if not isinstance(manifest.get("records"), list):
            raise StoreError(f"{self._location(MANIFEST)}: has no 'records' list")
        return manifest

    def exists(self) -> bool:
        """Whether the store's directory exists (an empty store is one with no manifest yet)."""
        return bool(self.fs.exists(self.root))

    def entries(self) -> list[RecordEntry]:
        try:
            return [RecordEntry(**e) for e in self._read_manifest()["records"]]
        except TypeError as exc:
            raise StoreError(f"{self._location(MANIFEST)}: malformed record entry ({exc})") from None

    @property
    def version(self) -> int:
        return len(self.entries())

    def append(
        self,
        record: TaskRecord,
        *,
        task_index: int,
        task_id: str,
        method: str,
        backbone_id: str,
        plan: dict[str, Any] | None = None,
    ) -> RecordEntry:
        """Write ``record`` as the next version; it becomes visible only when complete. ``plan``
        is what planning the task found (JSON), so that no later run need read its training data."""
        manifest = self._read_manifest()
        version = len(manifest["records"]) + 1
        name = f"{version - 1:04d}-{safe_name(task_id)}.safetensors"
        tensors = {k: v.detach().contiguous().cpu() for k, v in record.tensors.items()}
        for key, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise StoreError(
                    f"{self.uri}: task {task_id!r}: tensor {key!r} holds nan/inf values; refused, the store stays at version {version - 1}"
                )
        header = {"strata": json.dumps({"task_id": task_id, "method": method, "backbone_id": backbone_id, **record.meta})}
        data = st_save(tensors, metadata=header)
        self.fs.makedirs(self.root, exist_ok=True)
        self._write_atomic(name, data)
        entry = RecordEntry(
            version=version,
            task_index=task_index,
            task_id=task_id,
            method=method,
            backbone_id=backbone_id,
            file=name,
            sha256=hashlib.sha256(data).hexdigest(),
            memory_bytes=TaskRecord(tensors).nbytes,
            file_bytes=len(data),
            created=time.time(),
            plan=plan,
        )
        manifest["records"].append(entry.to_dict())
        self._write_atomic(MANIFEST, json.dumps(manifest, indent=1).encode())
        return entry

    def truncate(self, version: int) -> None:
        """Make ``version`` the latest again (rolls back records of a task that did not finish)."""
        manifest = self._read_manifest()
        if len(manifest["records"]) > version:
            manifest["records"] = manifest["records"][:version]
            self._write_atomic(MANIFEST, json.dumps(manifest, indent=1).encode())

    def load(self, entry: RecordEntry, *, backbone_id: str | None = None) -> TaskRecord:
        """Read and verify one record; refuse it for a different backbone."""
        if backbone_id is not None and entry.backbone_id != backbone_id:
            raise StoreError(
                f"{self._location(entry.file)}: made with backbone {entry.backbone_id}, but the current backbone is {backbone_id}"
            )
        data = self._read_verified(entry)
        meta = {k: v for k, v in _header_meta(data).items() if k not in ("task_id", "method", "backbone_id")}
        return TaskRecord(tensors=st_load(data), meta=meta)

    def _read_verified(self, entry: RecordEntry) -> bytes:
        location = self._location(entry.file)
        try:
            with self.fs.open(self._path(entry.file), "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            raise StoreError(f"{location}: listed in the manifest but missing") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            raise StoreError(f"{location}: checksum mismatch (sha256 {digest[:12]}…, manifest says {entry.sha256[:12]}…)")
        return data

    def verify(self) -> list[RecordEntry]:
        """Check every listed file against its checksum; the first bad one raises."""
        entries = self.entries()
        for entry in entries:
            self._read_verified(entry)
        return entries

    def load_all(self, *, backbone_id: str | None = None, upto: int | None = None) -> list[TaskRecord]:
        return [self.load(e, backbone_id=backbone_id) for e in self.entries()[:upto]]


def _header_meta(data: bytes) -> dict[str, Any]:
    """The record's own metadata, from the safetensors header (8-byte length + JSON)."""
    header_len = int.from_bytes(data[:8], "little")
    header: Mapping[str, Any] = json.loads(data[8 : 8 + header_len])
    return json.loads(header.get("__metadata__", {}).get("strata", "{}"))
