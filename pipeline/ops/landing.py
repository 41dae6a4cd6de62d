"""The landing zone: where new tasks arrive, one folder each, for ``strata retrain``.

A landing zone is a directory or any fsspec URI. Each task is a folder holding its data and a
manifest ``task.yaml`` (a stream task: ``train``, ``test``, optional ``id``, ``classes``,
``class_subset``, ``rename``, ``domain``; source paths relative to the folder and inside it),
and it is complete once the uploader writes ``_READY`` last. Arrival order is the time
``_READY`` appeared (then the folder name), so a folder copied slowly is ordered by when it was
finished. A manifest is data, not code: it may not name code to import or read outside its folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

import fsspec
import yaml
from pydantic import ValidationError

from pipeline.config import TaskConfig, describe_yaml_error, format_validation_error, refuse_code
from pipeline.errors import ConfigError, DataError

MANIFEST = "task.yaml"
TASK_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
READY = "_READY"


@dataclass(frozen=True)
class LandedTask:
    folder: str  # URI of the task's folder
    task: TaskConfig  # source paths absolute (URIs)
    arrived: float


def _timestamp(info: dict[str, Any]) -> float:
    for key in ("mtime", "LastModified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return 0.0


def _confined_sources(data: dict[str, Any], folder: str, origin: str) -> dict[str, Any]:
    """Source paths made absolute inside ``folder``. A landed task reads its own folder only: an
    absolute path, another URI or a ``..`` would let an uploader make the trainer read anything."""

    def join(key: str, path: Any) -> Any:
        if not isinstance(path, str):
            return path  # the model's validation names the wrong type
        if (
            "://" in path
            or path.startswith(("/", "~", "\\"))
            or ".." in PurePosixPath(path).parts
            or ":" in path.split("/", 1)[0]
        ):
            raise ConfigError(f"{origin}: {key} {path!r} must be a relative path inside the task folder")
        return f"{folder.rstrip('/')}/{path}"

    for split in ("train", "test"):
        source = data.get(split)
        if isinstance(source, dict) and "path" in source:
            paths = source["path"]
            key = f"{split}.path"
            source["path"] = join(key, paths) if not isinstance(paths, list) else [join(key, p) for p in paths]
    return data


def _load_manifest(fs: fsspec.AbstractFileSystem, folder: str, location: str) -> TaskConfig:
    path = f"{folder}/{MANIFEST}"
    if not fs.exists(path):
        raise DataError(f"{location}/{MANIFEST}: missing (a complete task folder needs its manifest)")
    try:
        with fs.open(path, "rb") as fh:
            data = yaml.safe_load(fh.read()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{location}/{MANIFEST}{describe_yaml_error(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{location}/{MANIFEST}: the top level must be a mapping")
    origin = f"{location}/{MANIFEST}"
    refuse_code(data, origin)
    data.setdefault("id", location.rstrip("/").rsplit("/", 1)[-1])
    if not isinstance(data["id"], str) or not TASK_ID.fullmatch(data["id"]) or set(data["id"]) == {"."}:
        # The id names the task's output folder and ledger entries: a path in it would escape them.
        raise ConfigError(f"{origin}: id {data['id']!r} must be letters, digits, '.', '_' or '-' (it names folders)")
    try:
        return TaskConfig.model_validate(_confined_sources(data, location, origin))
    except ValidationError as err:
        raise ConfigError(format_validation_error(f"{location}/{MANIFEST}", err)) from None


def scan(landing: str) -> tuple[list[LandedTask], list[str]]:
    """(complete tasks in arrival order, URIs of folders still without ``_READY``)."""
    fs, root = fsspec.core.url_to_fs(landing)
    if not fs.isdir(root):
        raise DataError(f"{landing}: no such landing directory")
    complete: list[LandedTask] = []
    incomplete: list[str] = []
    for entry in sorted(fs.ls(root, detail=True), key=lambda e: e["name"]):
        if entry["type"] != "directory" or entry["name"].rstrip("/").rsplit("/", 1)[-1].startswith((".", "_")):
            continue
        folder = entry["name"].rstrip("/")
        location = fs.unstrip_protocol(folder) if "://" in landing else folder
        ready = f"{folder}/{READY}"
        if not fs.exists(ready):
            incomplete.append(location)
            continue
        complete.append(LandedTask(location, _load_manifest(fs, folder, location), _timestamp(fs.info(ready))))
    complete.sort(key=lambda t: (t.arrived, t.folder))
    seen: dict[str, str] = {}
    for landed in complete:
        if landed.task.id in seen:
            raise DataError(f"{landed.folder}/{MANIFEST}: task id {landed.task.id!r} already used by {seen[landed.task.id]}")
        seen[landed.task.id] = landed.folder
    return complete, incomplete


def land_task(landing: str, folder: str, files: dict[str, str], manifest: dict[str, Any]) -> str:
    """What an uploader does: copy ``files`` (name in the folder -> local path) into
    ``landing/folder``, write the manifest, and write ``_READY`` last. Returns the folder URI."""
    fs, root = fsspec.core.url_to_fs(landing)
    target = f"{root.rstrip('/')}/{folder}"
    if fs.exists(f"{target}/{READY}"):
        raise DataError(f"{landing}/{folder}: already landed (it has {READY})")
    fs.makedirs(target, exist_ok=True)
    for name, local in files.items():
        fs.put_file(local, f"{target}/{name}")
    with fs.open(f"{target}/{MANIFEST}", "wb") as fh:
        fh.write(yaml.safe_dump(manifest, sort_keys=False).encode())
    fs.touch(f"{target}/{READY}")
    return f"{landing.rstrip('/')}/{folder}"
