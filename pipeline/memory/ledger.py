"""The retraining ledger: which landed tasks a continual model has learned, kept in its memory store.

Claims carry a lease. ``<store>/ledger/<task>.claim.<g>`` is generation ``g`` of the claim on a
task; the highest generation is the claim in force. A claim holds ``owner`` and ``expires``; its
owner renews it (``renew``, from a heartbeat thread while it trains) well before it expires.

- Taking a free task publishes generation 0; taking over a claim whose lease has expired (its
  retrainer was OOM-killed, its node lost) publishes generation ``g + 1``, with a log line. Of
  any number of retrainers racing for the same generation exactly one wins: a generation file is
  published whole or not at all, and only if it does not exist yet -- on a local filesystem it
  is written to a temporary file and hard-linked to its name (``link`` fails if the name
  exists); elsewhere it is an exclusive create (``open(mode="xb")``) of a body small enough to
  be written in one request. No reader ever sees a half-written claim. Object stores honour
  ``"xb"`` only from some release of their fsspec driver on (a conditional PUT: s3fs sends
  ``If-None-Match`` for small files from 2025.7.0, gcsfs ``ifGenerationMatch=0`` from
  2024.12.0; older ones silently overwrite), so a claim on an older driver is refused.
- Renewing rewrites the owner's own generation atomically (temporary file, then rename). An
  owner that finds a higher generation has lost its lease (it stalled past ``expires``) and
  must not record the task as learned: ``renew`` raises.
- ``<store>/ledger/<task>.done.json`` is written atomically when the task is learned and
  registered; it keeps what later runs need (the task's sources, its accuracy row, the
  registered version). A done task's claims stay.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from packaging.version import Version

from pipeline.errors import StoreError
from pipeline.memory.store import safe_name

LEDGER_DIR = "ledger"
DEFAULT_LEASE_S = 600.0
# The first release of each object-store driver whose open(mode="xb") fails on an existing key.
EXCLUSIVE_CREATE_SINCE = {"s3fs": "2025.7.0", "gcsfs": "2024.12.0"}
log = logging.getLogger("strata")


def _check_exclusive_create(fs: fsspec.AbstractFileSystem, uri: str) -> None:
    """Refuse a filesystem driver known to ignore ``"xb"`` (claims would silently overwrite)."""
    package = type(fs).__module__.split(".", 1)[0]
    since = EXCLUSIVE_CREATE_SINCE.get(package)
    if since is not None and Version(version(package)) < Version(since):
        raise StoreError(f"{uri}: {package} {version(package)} overwrites on open(mode='xb'); claims need {package}>={since}")


class LeaseLost(StoreError):
    """Another retrainer took over this owner's claim after its lease expired."""


class Ledger:
    def __init__(self, store_uri: str, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.uri = f"{store_uri.rstrip('/')}/{LEDGER_DIR}"
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self.lease_s = lease_s

    def _path(self, task_id: str, suffix: str) -> str:
        return f"{self.root}/{safe_name(task_id)}.{suffix}"

    def _generations(self, task_id: str) -> list[tuple[int, str]]:
        pattern = re.compile(re.escape(safe_name(task_id)) + r"\.claim\.(\d+)$")
        found = []
        for path in self.fs.glob(self._path(task_id, "claim.*")) if self.fs.exists(self.root) else []:
            match = pattern.search(path)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def _body(self, task_id: str, owner: str, generation: int, claimed: float) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "task_id": task_id,
                "owner": owner,
                "generation": generation,
                "claimed": claimed,
                "renewed": now,
                "expires": now + self.lease_s,
            }
        ).encode()

    def _publish(self, target: str, body: bytes) -> bool:
        """Create ``target`` with ``body`` if it does not exist; False if it does."""
        try:
            if isinstance(self.fs, LocalFileSystem):
                tmp = f"{self.root}/.{uuid.uuid4().hex}.claim.tmp"
                Path(tmp).write_bytes(body)
                try:
                    os.link(tmp, target)
                finally:
                    os.unlink(tmp)
            else:
                _check_exclusive_create(self.fs, self.uri)
                with self.fs.open(target, "xb") as fh:
                    fh.write(body)
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError) as exc:
            raise StoreError(f"{self.uri}: this filesystem cannot create a file exclusively ({exc}); claims need it") from None
        return True

    def claim(self, task_id: str, owner: str) -> bool:
        """Take ``task_id`` for ``owner``; False if anyone (this owner included) holds a live claim."""
        self.fs.makedirs(self.root, exist_ok=True)
        current = self.claim_of(task_id)
        if current is None:
            generation = 0
        elif time.time() < current["expires"]:
            return False
        else:
            generation = current["generation"] + 1
        won = self._publish(self._path(task_id, f"claim.{generation}"), self._body(task_id, owner, generation, time.time()))
        if won and current is not None:
            expired = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(current["expires"]))
            log.warning("task %s: took over the claim of %s, whose lease expired at %s", task_id, current["owner"], expired)
        return won

    def renew(self, task_id: str, owner: str) -> dict[str, Any]:
        """Extend ``owner``'s lease on ``task_id``; LeaseLost if the claim in force is not its own."""
        current = self.claim_of(task_id)
        if current is None or current["owner"] != owner:
            holder = "nobody" if current is None else current["owner"]
            raise LeaseLost(
                f"{self.uri}: task {task_id!r}: the claim of {owner} is gone (now held by {holder}); its lease expired"
            )
        generation = current["generation"]
        body = self._body(task_id, owner, generation, current["claimed"])
        tmp = f"{self.root}/.{uuid.uuid4().hex}.renew.tmp"
        with self.fs.open(tmp, "wb") as fh:
            fh.write(body)
        self.fs.mv(tmp, self._path(task_id, f"claim.{generation}"))
        return json.loads(body)

    @contextmanager
    def hold(self, task_id: str, owner: str) -> Iterator[None]:
        """Renew the lease every third of its length while the block runs (a daemon thread); a
        lost lease is raised when the block ends, so its work is not recorded as learned."""
        stop = threading.Event()
        lost: list[LeaseLost] = []

        def heartbeat() -> None:
            while not stop.wait(self.lease_s / 3):
                try:
                    self.renew(task_id, owner)
                except LeaseLost as exc:
                    lost.append(exc)
                    log.error("%s", exc)
                    return

        thread = threading.Thread(target=heartbeat, name=f"lease-{task_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        if lost:
            raise lost[0]
        self.renew(task_id, owner)

    def _read(self, path: str) -> dict[str, Any] | None:
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as fh:
            return json.loads(fh.read())

    def claim_of(self, task_id: str) -> dict[str, Any] | None:
        """The claim in force (highest generation), or None."""
        generations = self._generations(task_id)
        return self._read(generations[-1][1]) if generations else None

    def release(self, task_id: str) -> None:
        """Drop every claim on an unfinished task so that a later retrain may take it."""
        if self.done(task_id) is not None:
            raise StoreError(f"{self.uri}: task {task_id!r} is learned; its claim stays")
        for _, path in self._generations(task_id):
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
