"""OUTPUT_DIR, a local folder or any fsspec URI (``s3://bucket/runs/x``).

On a multi-node cluster the driver's outputs -- the run file that lets the same command continue
after the driver's pod is gone, the summary, the accuracy matrix -- must outlive the node, so
they may live in object storage. Files are written to a local folder first (the output dir
itself when it is local; a per-URI cache folder otherwise: MLflow logs artifacts from local
files) and then published, each in one piece: a rename locally, a single upload remotely.
"""

from __future__ import annotations

import hashlib
import tempfile
import uuid
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


class OutputDir:
    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/") or "/"
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self.remote = not isinstance(self.fs, LocalFileSystem)
        if self.remote:
            key = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
            self.local = Path(tempfile.gettempdir()) / "strata-outputs" / key
        else:
            self.local = Path(self.root)
        self.local.mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    def join(self, name: str) -> str:
        """The URI (or path) of ``name`` inside this folder."""
        return f"{self.uri}/{name}"

    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(f"{self.root}/{name}"))

    def read_text(self, name: str) -> str | None:
        """The file's text; None when it does not exist."""
        try:
            with self.fs.open(f"{self.root}/{name}", "rb") as fh:
                return fh.read().decode()
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> Path:
        """Write ``name`` and publish it; returns the local copy (for MLflow)."""
        tmp = self.local / f".{name}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(text)
        tmp.replace(self.local / name)
        self.publish(name)
        return self.local / name

    def publish(self, name: str) -> None:
        """Send the local file ``name`` (written by a library, e.g. a plot) to the output dir."""
        if self.remote:
            self.fs.put_file(str(self.local / name), f"{self.root}/{name}")

    def remove(self, name: str) -> None:
        if self.exists(name):
            self.fs.rm_file(f"{self.root}/{name}")
        (self.local / name).unlink(missing_ok=True)
