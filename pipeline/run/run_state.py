"""``OUTPUT_DIR/run.json``: which run owns an output folder, so that the same command continues it.

A run writes it before training (status ``running``) and again when it ends (``finished``,
``failed`` or ``killed``). It holds the id that names the Ray Train run (so a re-run finds the
last checkpoint in ``storage_path``), the MLflow run id (so a re-run continues the same run), and
the sha256 of the resolved config (so a different command is never mistaken for a re-run).
A driver that died without a word leaves ``running``: the next run of the same config resumes.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Literal

from pipeline import jsonout
from pipeline.config import StrataConfig, dump_config
from pipeline.errors import ConfigError
from pipeline.run.outputs import OutputDir

RUN_FILE = "run.json"
Status = Literal["running", "finished", "failed", "killed"]


def config_sha256(cfg: StrataConfig) -> str:
    return hashlib.sha256(dump_config(cfg).encode()).hexdigest()


@dataclass(frozen=True)
class RunState:
    run_uid: str
    config_sha256: str
    mlflow_run_id: str | None
    status: Status
    tasks_done: int = 0

    @property
    def train_run_name(self) -> str:
        return f"strata-{self.run_uid}"

    @classmethod
    def new(cls, cfg: StrataConfig) -> RunState:
        return cls(uuid.uuid4().hex[:16], config_sha256(cfg), None, "running")

    @classmethod
    def load(cls, output_dir: OutputDir) -> RunState | None:
        text = output_dir.read_text(RUN_FILE)
        if text is None:
            return None
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"{output_dir.join(RUN_FILE)}: not a strata run file ({exc.__class__.__name__}); remove it or pass --fresh"
            ) from None

    def save(self, output_dir: OutputDir) -> RunState:
        output_dir.write_text(RUN_FILE, jsonout.dumps(asdict(self), indent=1))
        return self

    def with_status(self, status: Status, **changes: object) -> RunState:
        return replace(self, status=status, **changes)  # type: ignore[arg-type]
