"""Faults in real processes: a driver stopped by SIGINT, SIGTERM or SIGKILL in the middle of a
task, then the same command run again. No mocks: the driver is a ``strata run`` subprocess that
joins the session's Ray; the tests choose the moment of the fault with the ``pausing_counter``
method (it holds still inside task 2 while a file exists) instead of racing the run."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.memory import MemoryStore

import strata_test_methods  # noqa: F401  (registers pausing_counter in this process too)
from conftest import blobs_task, run_config, strata_process

def wait_for(condition: Any, what: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def pausing_config(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    pause = tmp_path / "pause"
    pause.touch()
    tasks = [blobs_task("a", rows=32), blobs_task("b", rows=32, seed=1), blobs_task("c", rows=32, seed=2)]
    config = run_config(tmp_path, tasks, method={"name": "pausing_counter", "pause_file": str(pause), "pause_task": 1})
    config["train"] |= {"num_workers": 2, "batch_size": 8}
    config["data"] = {"rows_per_chunk": 8}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return config, pause


def mlflow_runs(config: dict[str, Any]) -> list[Any]:
    client = MlflowClient(config["tracking"]["uri"])
    return client.search_runs([client.get_experiment_by_name("tests").experiment_id])


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_a_driver_stopped_mid_task_continues_with_the_same_command(ray_session, tmp_path, sig, code):
    config, pause = pausing_config(tmp_path)
    store = MemoryStore(config["output_dir"] + "/memory")
    driver = strata_process(ray_session, "run", str(tmp_path / "c.yaml"))
    snapshots = tmp_path / "out" / "ray"
    reported = lambda: any("checkpoint_" in p.read_text() for p in snapshots.glob("*/checkpoint_manager_snapshot.json"))  # noqa: E731
    wait_for(lambda: reported() or driver.poll() is not None, "task 1's checkpoint")
    time.sleep(0.5)  # task 2 is under way, held by the pause file
    assert driver.poll() is None and store.version == 1
    first_record = store.entries()[0]
    driver.send_signal(sig)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == code, stderr
    state = json.loads((tmp_path / "out" / "run.json").read_text())
    (run,) = mlflow_runs(config)
    if sig == signal.SIGKILL:  # no word from the driver: the folder and the MLflow run say "running"
        assert state["status"] == "running" and run.info.status == "RUNNING"
    else:
        assert stderr.strip().splitlines()[-1].startswith(f"interrupted: {tmp_path / 'out'}: stopped by {sig.name}; 1 finished tasks")
        assert state["status"] == "killed" and run.info.status == "KILLED"
    assert [e.task_id for e in store.verify()] == ["a"]
    assert not (tmp_path / "out" / "summary.json").exists()

    pause.unlink()
    again = strata_process(ray_session, "run", str(tmp_path / "c.yaml"))
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert store.entries()[0] == first_record  # task 1 was not learned again
    records = store.load_all()
    assert [e.task_id for e in store.entries()] == ["a", "b", "c"]
    for i, record in enumerate(records):  # every training sample of every task entered exactly once
        visits = record.tensors["visits"]
        assert int(visits.sum()) == 32 and int(visits.max()) == 1, f"task {i}"
    matrix = summary["accuracy_matrix"]
    assert all(v is not None for i, row in enumerate(matrix) for v in row[: i + 1])  # task 1's row came from its checkpoint
    (run,) = mlflow_runs(config)  # one MLflow run, continued, finished
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["strata.continued_at_task"] == "1"
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "finished"


def test_a_finished_run_is_not_repeated_and_fresh_starts_over(ray_session, tmp_path):
    config, pause = pausing_config(tmp_path)
    pause.unlink()
    from click.testing import CliRunner

    from pipeline.cli import main

    config["stream"]["tasks"] = config["stream"]["tasks"][:1]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert CliRunner().invoke(main, ["run", str(tmp_path / "c.yaml")]).exit_code == 0
    again = CliRunner().invoke(main, ["run", str(tmp_path / "c.yaml")])
    assert again.exit_code == 2 and "this run has finished" in again.output and "--fresh" in again.output
    other = CliRunner().invoke(main, ["run", str(tmp_path / "c.yaml"), "--set", "seed=3"])
    assert other.exit_code == 2 and "already holds 1 records" in other.output
    fresh = CliRunner().invoke(main, ["run", str(tmp_path / "c.yaml"), "--fresh"])
    assert fresh.exit_code == 0, fresh.output
    assert [r.info.status for r in mlflow_runs(config)] == ["FINISHED", "FINISHED"]
    assert MemoryStore(config["output_dir"] + "/memory").version == 1
