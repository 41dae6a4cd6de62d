"""The ``strata`` command."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import replace
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from pipeline.errors import RunInterrupted, StrataError

if TYPE_CHECKING:
    from pipeline.run.summary import RunSummary
    from pipeline.train.live import Event

console = Console()


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input ends the command with one line on stderr and exit code 2, not a traceback; SIGINT
    or SIGTERM with 128 + the signal. The jobs/ entrypoints end the same way."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except StrataError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except RunInterrupted as exc:  # SIGINT -> 130, SIGTERM -> 143, as shells report them
            click.echo(f"interrupted: {exc}", err=True)
            sys.exit(128 + exc.signum)

    return wrapper


@click.group()
@click.version_option(package_name="strata")
def main() -> None:
    """Single-pass continual training of adapters on frozen backbones, on Ray."""


@main.command("run")
@click.argument("configs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config value (repeatable)")
@click.option("--fresh", is_flag=True, help="start over: forget an earlier run in OUTPUT_DIR and the memory store's records")
@click.option("--verbose", "-v", is_flag=True, help="also show Ray's own output and the workers' log lines")
@one_line_errors
def run_cmd(configs: tuple[str, ...], overrides: tuple[str, ...], fresh: bool, verbose: bool) -> None:
    """Train and evaluate the task stream in CONFIGS (later files merge over earlier ones, e.g.
    a stream config then configs/methods/l2p.yaml); writes OUTPUT_DIR/summary.json. Run again
    after an interruption, the same command continues where the run stopped."""
    from pipeline.config import load_config
    from pipeline.run import run

    cfg = load_config(configs, overrides)
    with _TaskBars(console) as bars:
        summary = run(cfg, fresh=fresh, on_progress=bars.on_event, log_to_driver=verbose)
    _print_summary(summary, cfg.output_dir)


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.0f} samples/s" if task.speed else "", style="progress.data.speed")


class _TaskBars:
    """A run's progress events (``pipeline.train.live``) drawn on the console: a bar for the task
    under way (samples, samples/s, time left, loss), replaced by its accuracy line when done."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(), TimeRemainingColumn(),
            TextColumn("{task.fields[loss]}"), console=console, transient=True,
        )  # fmt: skip
        self._task: TaskID | None = None

    def __enter__(self) -> _TaskBars:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def on_event(self, event: Event) -> None:
        from pipeline.train.live import Step, TaskDone, TaskStarted

        progress = self._progress
        if isinstance(event, TaskStarted):
            label = f"task {event.row + 1}/{event.num_tasks} {event.task_id}"
            self._task = progress.add_task(label, total=event.samples or None, loss="")
        elif isinstance(event, Step) and self._task is not None:
            progress.update(self._task, completed=event.samples, loss="" if event.loss is None else f"loss {event.loss:.4f}")
        elif isinstance(event, TaskDone):
            if self._task is not None:
                progress.remove_task(self._task)
                self._task = None
            seen = " ".join("-" if v is None else f"{v:.3f}" for v in event.accuracy[: event.row + 1])
            loss = "" if event.loss is None else f"  loss {event.loss:.4f}"
            scored = (
                "not scored (eval.every)"
                if event.avg_seen_acc is None
                else f"accuracy on seen tasks {event.avg_seen_acc:.4f} [{seen}]"
            )
            progress.console.print(f"task {event.row + 1}/{event.num_tasks} {event.task_id}: {scored}{loss}  {event.wall_s:.1f}s")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_summary(summary: RunSummary, output_dir: str) -> None:
    table = Table(title=f"{summary.method} · {summary.scenario} · {len(summary.tasks)} tasks")
    table.add_column("after task")
    for task in summary.tasks:
        table.add_column(task, justify="right")
    for task, row in zip(summary.tasks, summary.accuracy_matrix, strict=True):
        table.add_row(task, *(_fmt(v) for v in row))
    console.print(table)
    shown = ("avg_acc", "last_acc", "forgetting", "bwt", "transfer")
    console.print("  ".join(f"{k} {_fmt(getattr(summary, k))}" for k in shown) + f"  wall {summary.wall_s:.1f}s")
    console.print(f"summary: {output_dir}/summary.json   mlflow run: {summary.mlflow_run_id}")


@main.command("sweep")
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a sweep-file value, e.g. search.num_samples=4"
)
@one_line_errors
def sweep_cmd(sweep_file: str, overrides: tuple[str, ...]) -> None:
    """Search the hyperparameters in SWEEP_FILE with Ray Tune on validation rows, then re-run the
    best configuration on the test sets; writes OUTPUT_DIR/best_config.yaml and sweep_summary.json."""
    from pipeline.tune import load_sweep, sweep

    cfg = load_sweep(sweep_file, overrides)
    report = sweep(cfg)
    table = Table(title=f"sweep · {len(report['trials'])} trials · objective validation {report['objective']}")
    for column in ("trial", *cfg.space, "tasks run", "objective"):
        table.add_column(column)
    for t in sorted(report["trials"], key=lambda t: -(t["objective_per_task"][-1] if t["objective_per_task"] else -1)):
        last = t["objective_per_task"][-1] if t["objective_per_task"] else None
        table.add_row(
            str(t["trial_id"]),
            *(str(t["config"].get(k)) for k in cfg.space),
            f"{t['tasks_run']}/{report['num_tasks']}",
            _fmt(last),
        )
    console.print(table)
    console.print(
        f"best: {report['best']['config']}  validation {report['objective']} {_fmt(report['best']['validation_objective'])}"
    )
    if "final" in report:
        final = report["final"]
        console.print(
            "re-run on test: " + "  ".join(f"{k} {_fmt(final[k])}" for k in ("avg_acc", "last_acc", "forgetting", "bwt"))
        )
    console.print(f"best config: {cfg.output_dir}/best_config.yaml   mlflow sweep run: {report['mlflow_run_id']}")


@main.command("methods")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@one_line_errors
def methods_cmd(as_json: bool) -> None:
    """List the registered continual-learning methods and their scenarios: strata's own and those
    installed packages declare in the `strata.methods` entry-point group."""
    from pipeline.methods import available_methods

    rows = [
        {"name": name, "scenarios": sorted(cls.scenarios), "summary": (cls.__doc__ or "").strip().splitlines()[0]}
        for name, cls in available_methods().items()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="methods")
    for column in ("name", "scenarios", "summary"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], ", ".join(row["scenarios"]), row["summary"])
    console.print(table)


@main.command("check-manifests")
@click.argument("manifests", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--repo", type=click.Path(exists=True, file_okay=False), default=".", show_default=True,
              help="the project the image was built from: entrypoint paths under the image root map onto it")  # fmt: skip
@one_line_errors
def check_manifests_cmd(manifests: tuple[str, ...], repo: str) -> None:
    """Check that every RayJob in MANIFESTS (the RayJob templates a CronJob's ConfigMap holds
    included) asks for workers that fit the largest cluster it may grow to; exit 1 if one does not.
    A RayJob with a clusterSelector is checked against the RayCluster of that name among MANIFESTS."""
    from pipeline.deploy import check_manifests

    failed = False
    for name, demands, problem in check_manifests([Path(m) for m in manifests], Path(repo)):
        failed |= problem is not None
        click.echo(f"{name}: {problem}" if problem else f"{name}: fits ({'; '.join(str(d) for d in demands)})")
    if failed:
        raise SystemExit(1)


@main.group("memory")
def memory_group() -> None:
    """Inspect a memory store."""


@memory_group.command("show")
@click.argument("uri")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@one_line_errors
def memory_show(uri: str, as_json: bool) -> None:
    """List the records of the memory store at URI, verifying every checksum."""
    from pipeline.memory import MemoryStore

    store = MemoryStore(uri)
    if not store.exists():
        raise StrataError(f"{uri}: no such memory store")
    entries = store.verify()
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    table = Table(title=f"{uri} · version {len(entries)}")
    for column in ("version", "task", "method", "backbone", "bytes", "sha256"):
        table.add_column(column)
    for e in entries:
        table.add_row(str(e.version), e.task_id, e.method, e.backbone_id, f"{e.memory_bytes:,}", e.sha256[:12])
    console.print(table)


def _pairs(items: tuple[str, ...], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StrataError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


@main.command("submit")
@click.argument("configs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--address", envvar="RAY_ADDRESS", help="Ray dashboard address, e.g. http://HEAD:8265 (default $RAY_ADDRESS)")
@click.option(
    "--job",
    "kind",
    type=click.Choice(["run", "sweep", "retrain"]),
    default="run",
    show_default=True,
    help="which jobs/ entrypoint",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config value (repeatable)")
@click.option("--landing", help="landing zone URI (--job retrain)")
@click.option("--model", "model_name", help="registered model name (--job retrain)")
@click.option(
    "--working-dir",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False, exists=True),
    help="uploaded as the job's working dir",
)
@click.option(
    "--runtime-env", "runtime_env_file", type=click.Path(dir_okay=False), help="Ray runtime_env YAML merged over the defaults"
)
@click.option(
    "--pip", multiple=True, metavar="PKG", help="pip package for the job's environment (repeatable), or one requirements .txt"
)
@click.option("--conda", metavar="NAME|FILE", help="conda env name or environment YAML")
@click.option("--env", "env_vars", multiple=True, metavar="KEY=VALUE", help="environment variable for the job (repeatable)")
@click.option("--submission-id", help="job id to use; resubmitting an id that exists fails instead of running twice")
@click.option("--entrypoint-num-cpus", type=float, help="CPUs reserved for the job's driver")
@click.option("--entrypoint-num-gpus", type=float, help="GPUs reserved for the job's driver")
@click.option("--wait", is_flag=True, help="follow the job's log until it ends; exit 1 unless it succeeded")
@click.option("--max-upload-mb", type=float, default=100.0, show_default=True, help="refuse a larger working-dir upload")
@click.option("--force", is_flag=True, help="upload even above --max-upload-mb")
@one_line_errors
def submit_cmd(
    configs: tuple[str, ...],
    address: str | None,
    kind: str,
    overrides: tuple[str, ...],
    landing: str | None,
    model_name: str | None,
    working_dir: str,
    runtime_env_file: str | None,
    pip: tuple[str, ...],
    conda: str | None,
    env_vars: tuple[str, ...],
    submission_id: str | None,
    entrypoint_num_cpus: float | None,
    entrypoint_num_gpus: float | None,
    wait: bool,
    max_upload_mb: float,
    force: bool,
) -> None:
    """Submit CONFIGS as a job (jobs/continual_train.py, jobs/sweep.py or jobs/retrain.py) to the
    Ray cluster at --address through Ray's Job Submission API; prints the job id.

    The working dir is uploaded without secrets (.env, keys, credentials), data (landing/, runs/,
    Parquet outside configs/) and what .gitignore lists; what goes up and its size are printed
    to stderr first."""
    from pipeline.ops import submit

    if kind == "retrain" and not (landing and model_name):
        raise StrataError("--job retrain: needs --landing and --model")
    if kind != "retrain" and (landing or model_name):
        raise StrataError("--landing/--model: only with --job retrain")
    if kind == "sweep" and len(configs) != 1:
        raise StrataError("--job sweep: give exactly one sweep file")
    extra = ("--landing", landing, "--model", model_name) if kind == "retrain" else ()
    job_id = submit.submit(
        kind,
        configs,
        overrides,
        address=address,
        working_dir=working_dir,
        extra_args=[a for a in extra if a],
        submission_id=submission_id,
        entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_num_gpus=entrypoint_num_gpus,
        runtime_env_file=runtime_env_file,
        pip=pip,
        conda=conda,
        env_vars=_pairs(env_vars, "--env"),
        max_upload_mb=max_upload_mb,
        force=force,
        on_upload=lambda upload: click.echo(upload.describe(), err=True),
    )
    click.echo(job_id)
    if wait:
        for chunk in submit.follow_logs(address, job_id):
            click.echo(chunk, nl=False)
        state = submit.wait(address, job_id)
        click.echo(f"job {job_id}: {state}", err=True)
        sys.exit(0 if state == "SUCCEEDED" else 1)


@main.group("jobs")
def jobs_group() -> None:
    """Inspect and stop jobs on a Ray cluster (--address or $RAY_ADDRESS)."""


_address = click.option("--address", envvar="RAY_ADDRESS", help="Ray dashboard address (default $RAY_ADDRESS)")


@jobs_group.command("status")
@click.argument("job_id")
@_address
@click.option("--wait", "wait_s", type=float, default=None, metavar="SECONDS", help="poll until the job ends (or SECONDS pass)")
@one_line_errors
def jobs_status(job_id: str, address: str | None, wait_s: float | None) -> None:
    """Print the job's status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    from pipeline.ops import submit

    state = submit.wait(address, job_id, timeout_s=wait_s) if wait_s is not None else submit.status(address, job_id)
    click.echo(state)


@jobs_group.command("logs")
@click.argument("job_id")
@_address
@click.option("--follow", is_flag=True, help="keep printing until the job ends")
@one_line_errors
def jobs_logs(job_id: str, address: str | None, follow: bool) -> None:
    """Print the job's driver log."""
    from pipeline.ops import submit

    if follow:
        for chunk in submit.follow_logs(address, job_id):
            click.echo(chunk, nl=False)
    else:
        click.echo(submit.logs(address, job_id), nl=False)


@jobs_group.command("stop")
@click.argument("job_id")
@_address
@one_line_errors
def jobs_stop(job_id: str, address: str | None) -> None:
    """Ask the cluster to stop the job."""
    from pipeline.ops import submit

    click.echo("stopping" if submit.stop(address, job_id) else "not running")


@jobs_group.command("list")
@_address
@one_line_errors
def jobs_list(address: str | None) -> None:
    """List the cluster's submitted jobs."""
    from pipeline.ops import submit

    table = Table(title="jobs")
    for column in ("id", "status", "entrypoint"):
        table.add_column(column)
    for job in submit.list_jobs(address):
        table.add_row(job["id"], job["status"], job["entrypoint"])
    console.print(table)


_tracking_uri = click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    help="MLflow tracking/registry URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db)",
)


@main.command("predict")
@click.argument("data")
@click.option(
    "--model", "model_spec", required=True, metavar="NAME[/VERSION|@ALIAS]",
    help="registered continual model; NAME alone is NAME@champion (@latest-task: the newest version)",
)  # fmt: skip
@click.option("--out", required=True, help="new or empty directory (any fsspec URI) for the predictions' Parquet parts")
@_tracking_uri
@click.option("--task", help="score only this task's classes, with its task id (til)")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--actors", type=int, default=1, show_default=True, help="model replicas scoring in parallel")
@one_line_errors
def predict_cmd(
    data: str, model_spec: str, out: str, tracking_uri: str | None, task: str | None, batch_size: int, actors: int
) -> None:
    """Batch inference with Ray Data: score the images in DATA (Parquet with an 'image' column, or
    a folder of images) with a registered version of a continual model; the scoring tasks write
    Parquet parts under --out. An image that cannot be decoded gets a null prediction and the
    reason in column 'error'. The same version loads with
    pipeline.serve.pyfunc.load("models:/NAME@champion") and predicts the same."""
    from pipeline.config import TrackingConfig
    from pipeline.serve.predict import predict
    from pipeline.tracking import resolve_tracking_uri
    from pipeline.serve import champion_lag, load_version
    from pipeline.run import init_ray

    uri = resolve_tracking_uri(TrackingConfig(uri=tracking_uri))
    version = load_version(uri, model_spec)
    if "/" not in model_spec and "@" not in model_spec and (behind := champion_lag(uri, version)):
        click.echo(f"note: {behind}", err=True)
    init_ray()
    result = predict(version.card, data, out, task=task, batch_size=batch_size, actors=actors)
    click.echo(
        f"{result['rows']} predictions by {version.name} version {version.version} ({len(version.card.tasks)} tasks) -> {out}"
    )
    if result["errors"]:
        click.echo(f"{result['errors']} of them null: the image could not be decoded (column 'error' says why)", err=True)


def _retrain_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option("--landing", required=True, help="landing zone: directory or fsspec URI with one folder per task"),
            click.option("--model", "model_name", required=True, help="registered model name"),
            click.option(
                "--config",
                "configs",
                required=True,
                multiple=True,
                type=click.Path(dir_okay=False),
                help="the model's config (repeat to merge)",
            ),
            click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config value (repeatable)"),
            click.option(
                "--lease",
                "lease_s",
                type=float,
                default=600,
                show_default=True,
                help="seconds a task's claim lasts without renewal; a dead retrainer's claim is taken over after it",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _print_retrain(report: Any) -> None:
    for record in report.trained:
        row = " ".join(_fmt(v) for v in record["accuracy_row"])
        console.print(
            f"learned {record['task_id']}: version {record['model_version']}  accuracy [{row}]  {record['wall_s']:.0f}s"
        )
    if report.learned_before:
        console.print(f"already learned: {', '.join(report.learned_before)}")
    if report.incomplete:
        console.print(f"waiting for _READY: {', '.join(report.incomplete)}")
    if not report.trained and not report.busy:
        console.print("nothing new to learn")
    if report.stalled:
        click.echo(f"stalled: {report.busy_reason}", err=True)
        sys.exit(3)


@main.command("retrain")
@_retrain_options
@click.option("--max-tasks", type=int, help="learn at most this many new tasks")
@one_line_errors
def retrain_cmd(
    landing: str, model_name: str, configs: tuple[str, ...], overrides: tuple[str, ...], lease_s: float, max_tasks: int | None
) -> None:
    """Learn the complete tasks (folders with _READY) in the landing zone that the model has not
    learned yet, in arrival order; registers a model version per task. Exits 3 when it stopped
    at a task another live retrainer holds."""
    from pipeline.config import load_config
    from pipeline.ops import retrain

    _print_retrain(retrain(load_config(configs, overrides), landing, model_name, max_tasks=max_tasks, lease_s=lease_s))


@main.command("watch")
@_retrain_options
@click.option("--interval", type=float, default=300, show_default=True, help="seconds between looks at the landing zone")
@click.option("--iterations", type=int, help="stop after this many looks (default: run until interrupted)")
@one_line_errors
def watch_cmd(
    landing: str,
    model_name: str,
    configs: tuple[str, ...],
    overrides: tuple[str, ...],
    lease_s: float,
    interval: float,
    iterations: int | None,
) -> None:
    """Run `strata retrain` every --interval seconds (a task held by another retrainer is
    reported and looked at again next time)."""
    from pipeline.config import load_config
    from pipeline.ops import watch

    watch(
        load_config(configs, overrides), landing, model_name, interval_s=interval, iterations=iterations, lease_s=lease_s,
        on_report=_print_watch,
    )  # fmt: skip


def _print_watch(report: Any) -> None:
    """The retrain report, without ending the watch at a held task."""
    _print_retrain(replace(report, busy=None))
    if report.stalled:
        click.echo(f"stalled: {report.busy_reason}", err=True)
