"""The ``strata`` command."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from pipeline.errors import StrataError

console = Console()


def _one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input ends the command with one line on stderr and exit code 2, not a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except StrataError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


@click.group()
@click.version_option(package_name="strata")
def main() -> None:
    """Single-pass continual training of adapters on frozen backbones, on Ray."""


@main.command("run")
@click.argument("configs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config value (repeatable)")
@_one_line_errors
def run_cmd(configs: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Train and evaluate the task stream in CONFIGS (later files merge over earlier ones, e.g.
    a stream config then configs/methods/l2p.yaml); writes OUTPUT_DIR/summary.json."""
    from pipeline.config import load_config
    from pipeline.train import run

    cfg = load_config(configs, overrides)
    summary = run(cfg)
    _print_summary(summary, cfg.output_dir)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_summary(summary: dict[str, Any], output_dir: str) -> None:
    table = Table(title=f"{summary['method']} · {summary['scenario']} · {len(summary['tasks'])} tasks")
    table.add_column("after task")
    for task in summary["tasks"]:
        table.add_column(task, justify="right")
    for task, row in zip(summary["tasks"], summary["accuracy_matrix"], strict=True):
        table.add_row(task, *(_fmt(v) for v in row))
    console.print(table)
    console.print(
        "  ".join(f"{k} {_fmt(summary[k])}" for k in ("avg_acc", "last_acc", "forgetting", "bwt", "transfer"))
        + f"  wall {summary['wall_s']:.1f}s"
    )
    console.print(f"summary: {output_dir}/summary.json   mlflow run: {summary['mlflow_run_id']}")


@main.command("sweep")
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a sweep-file value, e.g. search.num_samples=4")
@_one_line_errors
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
        table.add_row(str(t["trial_id"]), *(str(t["config"].get(k)) for k in cfg.space), f"{t['tasks_run']}/{report['num_tasks']}", _fmt(last))
    console.print(table)
    console.print(f"best: {report['best']['config']}  validation {report['objective']} {_fmt(report['best']['validation_objective'])}")
    if "final" in report:
        final = report["final"]
        console.print("re-run on test: " + "  ".join(f"{k} {_fmt(final[k])}" for k in ("avg_acc", "last_acc", "forgetting", "bwt")))
    console.print(f"best config: {cfg.output_dir}/best_config.yaml   mlflow sweep run: {report['mlflow_run_id']}")


@main.command("methods")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def methods_cmd(as_json: bool) -> None:
    """List the registered continual-learning methods and their scenarios."""
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


@main.group("memory")
def memory_group() -> None:
    """Inspect a memory store."""


@memory_group.command("show")
@click.argument("uri")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_one_line_errors
def memory_show(uri: str, as_json: bool) -> None:
    """List the records of the memory store at URI, verifying every checksum."""
    from pipeline.memory import MemoryStore

    entries = MemoryStore(uri).verify()
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    table = Table(title=f"{uri} · version {len(entries)}")
    for column in ("version", "task", "method", "backbone", "bytes", "sha256"):
        table.add_column(column)
    for e in entries:
        table.add_row(str(e.version), e.task_id, e.method, e.backbone_id, f"{e.memory_bytes:,}", e.sha256[:12])
    console.print(table)
