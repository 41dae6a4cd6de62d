"""Job submission against a real Ray head (`ray start --head` on loopback), through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.errors import ConfigError
from pipeline.ops import submit

from conftest import REPO
from test_ray_pipeline import digit_pairs_in_train_split


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all bound at once, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_head(log: Path) -> tuple[subprocess.Popen, str, str]:
    dashboard, gcs, agent, agent_grpc, metrics, runtime_env, client = free_ports(7)
    temp_dir = f"/tmp/strata-ray-{dashboard}"
    bin_dir = Path(sys.executable).parent
    env = os.environ | {
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }  # jobs run `python` from this venv
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=8",
         f"--object-store-memory={512 * 1024**2}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # Ports of its own: the session's Ray (or any other on this machine) holds the defaults.
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}", f"--ray-client-server-port={client}"],
        env=env, start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    return head, f"http://127.0.0.1:{dashboard}", temp_dir


def stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    try:
        os.killpg(head.pid, signal.SIGKILL)  # `ray start --block` takes half a minute over SIGTERM; nothing needs a clean stop
    except ProcessLookupError:
        pass
    head.wait()
    for pid in cluster_processes(temp_dir):  # raylet and workers that left the head's process group
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head of its own (the test session's in-process Ray cannot take jobs from outside)."""
    log = tmp_path_factory.mktemp("ray-head") / "ray-start.log"
    for attempt in range(2):  # a port taken between choosing and binding kills the start: once more
        head, address, temp_dir = start_head(log)
        deadline = time.monotonic() + 120
        while head.poll() is None and time.monotonic() < deadline:
            try:
                submit.list_jobs(address)
                break
            except Exception:
                time.sleep(2)
        else:
            stop_head(head, temp_dir)
            if attempt == 0:
                continue
            raise RuntimeError(f"ray start --head did not come up: {log.read_text()[-2000:]}")
        break
    yield address
    stop_head(head, temp_dir)


def cluster_processes(temp_dir: str) -> list[int]:
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if temp_dir.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout.strip()  # stderr has the upload's description


def test_submit_quickstart_polls_to_success_and_finds_its_mlflow_run(ray_head, tmp_path):
    """The quickstart stream through `strata submit` -> jobs/continual_train.py on the cluster, with the
    joint upper bound as its method: one training phase over every task's data."""
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job_id = cli(
        "submit", str(REPO / "configs/quickstart.yaml"), "--address", ray_head, "--working-dir", str(REPO),
        "--set", "method.name=joint", "--set", f"output_dir={tmp_path / 'out'}", "--set", f"tracking.uri={tracking}",
    )  # fmt: skip
    assert job_id.startswith("raysubmit_")
    deadline = time.monotonic() + 600
    while (state := cli("jobs", "status", job_id, "--address", ray_head)) not in submit.TERMINAL:
        assert time.monotonic() < deadline, f"job {job_id} still {state}"
        time.sleep(3)
    logs = cli("jobs", "logs", job_id, "--address", ray_head, "--follow")  # a finished job: its whole log, then the end
    assert state == "SUCCEEDED", logs[-3000:]
    result = next(json.loads(line) for line in logs.splitlines() if line.startswith('{"avg_acc"'))  # the entrypoint's result line
    run = MlflowClient(tracking).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["mlflow_run_id"] == result["mlflow_run_id"] and summary["method"] == "joint"
    assert run.data.metrics["last_acc"] == pytest.approx(summary["last_acc"], abs=1e-12) == result["last_acc"]
    *earlier, last = summary["accuracy_matrix"]
    assert all(v is None for row in earlier for v in row) and None not in last  # one phase: only the last row
    assert summary["avg_acc"] is None and summary["forgetting"] is None
    assert summary["samples_seen"] == digit_pairs_in_train_split()  # every task's data, exactly once
    assert summary["memory_bytes"][:-1] == [None] * 4 and summary["memory_bytes"][-1] > 0
    assert any(job["id"] == job_id for job in submit.list_jobs(ray_head))


def test_stop_and_a_resubmitted_id_is_refused(ray_head, tmp_path):
    args = ["submit", str(REPO / "configs/quickstart.yaml"), "--address", ray_head, "--working-dir", str(REPO),
            "--submission-id", "strata-test-stop", "--set", f"output_dir={tmp_path / 'out'}",
            "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip
    assert cli(*args) == "strata-test-stop"
    assert cli("jobs", "stop", "strata-test-stop", "--address", ray_head) == "stopping"
    assert cli("jobs", "status", "strata-test-stop", "--address", ray_head, "--wait", "120") == "STOPPED"
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "strata-test-stop" in str(again.exception or again.output)


def test_entrypoint_and_runtime_env_are_built_from_the_working_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    command = submit.entrypoint(
        "run", [str(REPO / "configs/quickstart.yaml"), str(REPO / "configs/methods/l2p.yaml")], ["method.lr=0.01"], REPO
    )
    assert (
        command
        == "python jobs/continual_train.py --config configs/quickstart.yaml --config configs/methods/l2p.yaml --set method.lr=0.01"
    )
    assert (
        submit.entrypoint("sweep", [str(REPO / "configs/sweeps/l2p.yaml")], [], REPO)
        == "python jobs/sweep.py --sweep configs/sweeps/l2p.yaml"
    )
    outside = tmp_path / "c.yaml"
    outside.write_text("{}")
    with pytest.raises(ConfigError, match=r"c.yaml: outside the uploaded working directory"):
        submit.entrypoint("run", [str(outside)], [], REPO)
    extra = tmp_path / "env.yaml"
    extra.write_text("excludes: [data]\nenv_vars: {A: '1'}\n")
    env = submit.runtime_env(REPO, runtime_env_file=str(extra), pip=["timm>=1.0"], env_vars={"B": "2"})
    assert env["working_dir"] == str(REPO) and {".venv", "runs", "data"} <= set(env["excludes"])
    assert env["pip"] == ["timm>=1.0"]
    assert env["env_vars"] == {"A": "1", "MLFLOW_TRACKING_URI": "http://mlflow:5000", "B": "2"}
    for name, value in [("MLFLOW_TRACKING_PASSWORD", "x"), ("MLFLOW_TRACKING_TOKEN", "x"), ("AWS_SECRET_ACCESS_KEY", "x"),
                        ("MLFLOW_TRACKING_USERNAME", "strata"), ("MLFLOW_TRACKING_URI", "https://strata:hunter2@mlflow:5000")]:  # fmt: skip
        with pytest.raises(
            ConfigError, match=rf"env var {name}: holds a credential, and a job's runtime env is stored in the job's metadata"
        ):
            submit.runtime_env(REPO, env_vars={name: value})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://strata:hunter2@mlflow:5000")  # the shell's URI is passed on: not this one
    with pytest.raises(ConfigError, match="env var MLFLOW_TRACKING_URI: holds a credential"):
        submit.runtime_env(REPO)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = CliRunner().invoke(main, ["jobs", "status", "x"])
    assert result.exit_code == 2 and "error: --address: no cluster given" in result.output


def test_the_upload_leaves_out_secrets_data_links_and_what_gitignore_lists_and_has_a_size_limit(tmp_path):
    root = tmp_path / "project"
    files = {
        "jobs/continual_train.py": 10, "configs/a.yaml": 5, "configs/sample/tiny.parquet": 7, "pipeline/x.py": 20,
        ".env": 1, ".env.prod": 1, "deploy/tls.key": 1, "creds/credentials.json": 1, ".aws/config": 1, "id_rsa": 1,
        ".git-credentials": 1, "home/.ssh/config": 1, "landing/2026-11-01/train.parquet": 1, "runs/latest/summary.json": 1,
        "data/big.parquet": 1, "scratch/notes.txt": 3, "configs/private/x.yaml": 4, "configs/sample/ignored.parquet": 2,
        ".venv/bin/python": 1, "pipeline/__pycache__/x.pyc": 1, ".git/HEAD": 1, "mlflow.db": 1,
    }  # fmt: skip
    for rel, size in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * size)
    (root / ".gitignore").write_text("scratch/\n")
    (root / "configs" / ".gitignore").write_text("private/\nsample/ignored.parquet\n")  # a nested one, relative to its folder
    outside = tmp_path / "secret.txt"
    outside.write_text("key")
    (root / "configs" / "linked.yaml").symlink_to(outside)
    (root / "linked-dir").symlink_to(tmp_path)
    upload = submit.plan_upload(root, ["pipeline/x.py"])  # a --runtime-env excludes entry
    assert dict(upload.files) == {
        ".gitignore": 9, "configs/.gitignore": 32, "configs/a.yaml": 5, "configs/sample/tiny.parquet": 7, "jobs/continual_train.py": 10,
    }  # fmt: skip
    assert upload.total == 63
    assert upload.describe().startswith(f"uploading {root}: 5 files, 63 B (") and "configs/ 44 B" in upload.describe()
    staged = submit.stage_upload(upload, max_mb=1)
    try:
        assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()) == sorted(dict(upload.files))
    finally:
        shutil.rmtree(staged)
    (root / "configs/weights.bin").write_bytes(b"x" * 2 * 1024**2)
    with pytest.raises(
        ConfigError,
        match=r"the upload is 2\.0 MiB, above the 1 MiB limit \(largest file: configs/weights\.bin, 2\.0 MiB\).*--force",
    ):
        submit.stage_upload(submit.plan_upload(root), max_mb=1)
    shutil.rmtree(submit.stage_upload(submit.plan_upload(root), max_mb=1, force=True))
    (root / "jobs/sweep.py").write_text("")
    with pytest.raises(ConfigError, match=r"private/x\.yaml: excluded from the upload"):
        submit.submit("run", [str(root / "configs/private/x.yaml")], working_dir=str(root))  # refused before any cluster is asked
    env = tmp_path / "env.yaml"
    env.write_text("working_dir: /elsewhere\n")
    with pytest.raises(ConfigError, match=r"env\.yaml: working_dir is not allowed"):
        submit.runtime_env(root, runtime_env_file=str(env))
