"""Shared fixtures: one local Ray for the whole session, tiny streams, tiny backbones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))  # so `import strata_test_methods` works here and in Ray workers
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
# Train's controller polls its workers every 2 s by default, so every fit ends up to 2 s after its
# last report; the suite runs ~20 fits.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # a local Ray is never preempted

TINY_VIT = {
    "name": "timm:vit_tiny_patch16_224",
    "kwargs": {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2},
}


def blobs_task(
    task_id: str, *, classes: int = 4, rows: int = 48, seed: int = 0, subset: list[int] | None = None
) -> dict[str, Any]:
    params = {"num_classes": classes, "rows": rows, "size": 16, "seed": seed}
    task: dict[str, Any] = {
        "id": task_id,
        "train": {"type": "generator", "name": "blobs", "split": "train", "params": params},
        "test": {"type": "generator", "name": "blobs", "split": "test", "params": {**params, "rows": rows // 2}},
    }
    if subset is not None:
        task["class_subset"] = subset
    return task


def new_method(name: str, backbone: Any, collective: Any = None, *, seed: int | None = 0, **params: Any) -> Any:
    """``create_method`` of ``name`` with ``params`` on ``backbone``, after ``torch.manual_seed(seed)``
    (``seed=None``: the global generator as it is)."""
    import torch

    from pipeline.config import MethodConfig
    from pipeline.methods import create_method, resolve_method_params

    if seed is not None:
        torch.manual_seed(seed)
    return create_method(resolve_method_params(MethodConfig(name=name, **params)), backbone, collective)


def random_images(n: int, size: int = 32, seed: int = 0) -> Any:
    """(n, 3, size, size) standard-normal images (already normalised) from a seeded generator."""
    import torch

    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def two_task_plan(holdout: float = 0.0) -> Any:
    """Two 2-class blobs tasks, 64 training rows each, as the driver resolves them (StreamPlan)."""
    from pipeline.config import StreamConfig
    from pipeline.data.stream import resolve_stream

    cfg = StreamConfig(tasks=[blobs_task("a", rows=64, subset=[0, 1]), blobs_task("b", rows=64, subset=[2, 3])])
    return resolve_stream(cfg, rows_per_chunk=16, holdout=holdout, seed=3)


def task_batches(task: Any, backbone: Any, size: int = 8, image_size: int = 16) -> list[dict[str, Any]]:
    """A TaskPlan's training rows decoded as the pipeline decodes them, normalised for
    ``backbone``, in batches of ``size`` (image, label, task, sample_id)."""
    import numpy as np
    import torch

    from pipeline.data.ray_data import load_rows

    rows = []
    for block in load_rows(
        task.train.chunks, label_map=task.label_map, task_index=task.index, size=image_size, rows=task.train.rows
    ):
        rows += [{k: v[i] for k, v in block.items()} for i in range(len(block["label"]))]
    out = []
    for start in range(0, len(rows), size):
        part = rows[start : start + size]
        image = torch.from_numpy(np.stack([r["image"] for r in part]))
        out.append(
            {
                "image": backbone.normalize(image),
                **{k: torch.tensor(np.array([r[k] for r in part])) for k in ("label", "task", "sample_id")},
            }
        )
    return out


def run_config(tmp_path: Path, tasks: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    """A complete config dict for a tiny run that writes everything under tmp_path."""
    return {
        "stream": {"scenario": "cil", "tasks": tasks},
        "backbone": TINY_VIT,
        "method": {"name": "ncm"},
        "train": {"batch_size": 16, "num_workers": 2, "cpus_per_worker": 0.5},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"},
        "output_dir": str(tmp_path / "out"),
        **sections,
    }


RAY_FIXTURES = {"ray_session", "ray_head"}  # the tests that start or join a Ray cluster


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test on a Ray cluster carries the ``ray`` marker, however it gets there, so that
    ``pytest -m "not ray"`` is the fast, Ray-free subset."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _ray_only_in_ray_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test without the ``ray`` marker may not start Ray: the marker stays true as tests change."""
    if request.node.get_closest_marker("ray") is None:
        import ray

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise AssertionError(f"{request.node.nodeid} starts Ray: mark it @pytest.mark.ray (or take the ray_session fixture)")

        monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every integration test (the pattern of Ray's ray_start_regular_shared)."""
    import ray

    ray.init(
        num_cpus=8,  # more logical CPUs than cores: fractional workers plus Ray Data tasks
        _system_config={"worker_maximum_startup_concurrency": 8},  # as init_ray: no warning at 4x the cores
        include_dashboard=True,  # Train's placement-group cleaner polls the state API it serves
        dashboard_host="127.0.0.1",
        object_store_memory=512 * 1024**2,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}},
    )
    yield ray
    ray.shutdown()


def strata_process(ray_session: Any, *args: str) -> subprocess.Popen[str]:
    """``strata ARGS`` in a process of its own that joins the session's Ray (a second local Ray
    would fight this one for ports), with the test methods importable in that driver and, through
    the injected job config, in its Ray workers."""
    pythonpath = os.pathsep.join([str(TESTS), str(REPO)])
    env = os.environ | {
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
        "PYTHONPATH": pythonpath,
        "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}}}),
    }
    driver = "import sys, strata_test_methods; from pipeline.cli import main; sys.exit(main())"
    return subprocess.Popen(
        [sys.executable, "-c", driver, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
