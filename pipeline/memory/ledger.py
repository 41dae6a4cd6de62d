"""The retraining ledger: which landed tasks a continual model has learned, kept in its memory store.

``<store>/ledger/<task>.claim`` is published whole or not at all, and only if it does not exist
yet, so of any number of retrainers racing for a task exactly one wins it and no reader ever
sees a half-written claim: on a local filesystem the claim is written to a temporary file and
hard-linked to its name (``link`` fails if the name exists); elsewhere it is an exclusive create
(``open(mode="xb")``) of a body small enough to be written in one request.
``<store>/ledger/<task>.done.json`` is written atomically when the task is learned and
registered; it keeps what later runs need (the task's sources, its accuracy row, the registered
version). A claim without a done record is a task in progress, or one whose retrainer died:
it is never trained twice automatically; ``release`` clears it on purpose.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import StoreError
from pipeline.memory.store import safe_name

LEDGER_DIR = "ledger"


class Ledger:
    def __init__(self, store_uri: str) -> None:
        self.uri = f"{store_uri.rstrip('/')}/{LEDGER_DIR}"
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)

    def _path(self, task_id: str, suffix: str) -> str:
        return f"{self.root}/{safe_name(task_id)}.{suffix}"

    def claim(self, task_id: str, owner: str) -> bool:
        """Take ``task_id`` for ``owner``; False if anyone (this owner included) holds it already."""
        self.fs.makedirs(self.root, exist_ok=True)
        body = json.dumps({"task_id": task_id, "owner": owner, "claimed": time.time()}).encode()
        target = self._path(task_id, "claim")
        try:
            if isinstance(self.fs, LocalFileSystem):
                tmp = f"{self.root}/.{safe_name(task_id)}.{uuid.uuid4().hex}.claim.tmp"
                Path(tmp).write_bytes(body)
                try:
                    os.link(tmp, target)
                finally:
                    os.unlink(tmp)
            else:
                with self.fs.open(target, "xb") as fh:
                    fh.write(body)
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError) as exc:
            raise StoreError(f"{self.uri}: this filesystem cannot create a file exclusively ({exc}); claims need it") from None
        return True

    def _read(self, path: str) -> dict[str, Any] | None:
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as fh:
            return json.loads(fh.read())

    def claim_of(self, task_id: str) -> dict[str, Any] | None:
        return self._read(self._path(task_id, "claim"))

    def release(self, task_id: str) -> None:
        """Drop the claim on an unfinished task so that a later retrain may take it."""
        if self.done(task_id) is not None:
            raise StoreError(f"{self.uri}: task {task_id!r} is learned; its claim stays")
        path = self._path(task_id, "claim")
        if self.fs.exists(path):
            self.fs.rm(path)

    def complete(self, task_id: str, record: dict[str, Any]) -> None:
        tmp = f"{self.root}/.{safe_name(task_id)}.{uuid.uuid4().hex}.tmp"
        with self.fs.open(tmp, "wb") as fh:
            fh.write(json.dumps({"task_id": task_id, **record}, indent=1).encode())
        self.fs.mv(tmp, self._path(task_id, "done.json"))

    def done(self, task_id: str) -> dict[str, Any] | None:
        return self._read(self._path(task_id, "done.json"))

    def learned(self) -> list[dict[str, Any]]:
        """Done records in the order the tasks were learned."""
        if not self.fs.exists(self.root):
            return []
        records = [self._read(path) for path in self.fs.glob(f"{self.root}/*.done.json")]
        return sorted((r for r in records if r is not None), key=lambda r: r["position"])
