"""Hyperparameter sweeps with Ray Tune, chosen on validation data and reported on test.

A sweep file names the run config(s) it starts from, a search space over their dotted keys,
and how to search. Every trial is a full ``strata run`` of the stream (or its first K tasks)
through the same driver, with two changes: each task's training data loses a validation
fraction (carved by hashed sample id), and the accuracy matrix is measured on those validation
rows -- a trial never opens a test source. Each task's report reaches Tune (task index =
training iteration), so ASHA can stop weak trials after early tasks. The best trial among those
that finished every task is written out as a complete run config and re-run on the test sets.

MLflow: one parent run for the sweep, a nested run per trial (its params and per-task
metrics), the best config and an objective-vs-hyperparameter plot as the parent's artifacts;
the final test run is a separate run tagged with the sweep's run id.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from pipeline.config import (
    StrictModel,
    StrataConfig,
    absolute_path,
    apply_override,
    format_validation_error,
    load_config,
    read_yaml,
    validate_config,
    with_absolute_paths,
)
from pipeline.errors import ConfigError
from pipeline.methods import resolve_method_params
from pipeline.tracking import TrackedRun, resolve_tracking_uri
from pipeline.run.outputs import OutputDir
from pipeline.run.preflight import alive_nodes, check_shared_storage, shared_dirs

log = logging.getLogger("strata")

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
# The per-task value Tune sees for each sweep objective (see the worker's report).
OBJECTIVES = {"avg_acc": "running_avg_acc", "last_acc": "avg_seen_acc"}


class SearchSettings(StrictModel):
    algorithm: Literal["random", "optuna"] = Field(default="random", description="random (grid keys expand) or optuna")
    num_samples: int = Field(default=8, ge=1, description="trials (random: samples of the space; each grid point this often)")
    objective: Literal["avg_acc", "last_acc"] = "avg_acc"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(default=1, ge=1, description="ASHA: tasks every trial gets before it may be stopped")
    reduction_factor: float = Field(default=2.0, gt=1.0)
    max_concurrent_trials: int = Field(default=4, ge=1)
    seed: int = 0


class TrialSettings(StrictModel):
    tasks: int | None = Field(default=None, ge=1, description="run only the first K tasks of the stream")
    validation_fraction: float = Field(default=0.2, gt=0.0, lt=1.0, description="of each task's training rows")
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers per trial")
    cpus_per_worker: float = Field(default=0.5, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    driver_cpus: float = Field(default=0.25, gt=0, description="CPU of the Tune trial that drives its TorchTrainer")


class SweepConfig(StrictModel):
    base: list[str] = Field(min_length=1, description="run config files, merged in order like `strata run A B`")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted overrides of the run config, for every trial")
    space: dict[str, dict[str, Any]] = Field(
        min_length=1, description="dotted key -> {choice|grid|uniform|loguniform|randint: ...}"
    )
    search: SearchSettings = SearchSettings()
    trial: TrialSettings = TrialSettings()
    final_run: bool = Field(default=True, description="re-run the best config on the test sets")
    output_dir: str = "runs/sweep"

    @field_validator("space")
    @classmethod
    def _one_known_distribution(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for key, spec in space.items():
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ValueError(f"space.{key}: give exactly one of {', '.join(DISTRIBUTIONS)}")
            kind, args = next(iter(spec.items()))
            if kind in ("choice", "grid") and not (isinstance(args, list) and args):
                raise ValueError(f"space.{key}: {kind} takes a non-empty list")
            if kind in ("uniform", "loguniform", "randint") and not (
                isinstance(args, list) and len(args) == 2 and args[0] < args[1]
            ):
                raise ValueError(f"space.{key}: {kind} takes [low, high] with low < high")
            if kind == "loguniform" and args[0] <= 0:
                raise ValueError(f"space.{key}: loguniform needs low > 0")
        return space


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    data = read_yaml(path)
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(str(path), err)) from None
    _check_space(sweep)
    return sweep


def base_config(sweep: SweepConfig) -> dict[str, Any]:
    """The run config every trial starts from: the base files merged, the manifest inlined, ``set``
    applied, and the MLflow URI resolved here -- a trial runs in Tune's trial directory, where
    the default ``sqlite:///<cwd>/mlflow.db`` would be another file. For the same reason local
    paths (sources, checkpoint, local-dir models) are made absolute against this directory."""
    data = load_config(sweep.base).model_dump(mode="json")
    for key, value in _dotted(sweep.set):
        apply_override(data, f"{key}={json.dumps(value)}")
    data = with_absolute_paths(validate_config(data, "sweep base")).model_dump(mode="json")
    data["tracking"]["uri"] = resolve_tracking_uri(validate_config(data, "sweep base").tracking)
    return data


def _dotted(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``set`` entries as dotted keys. A nested mapping under a plain name (``{train: {lr: 1}}``,
    what ``--set set.train.lr=1`` makes) sets train.lr instead of replacing the train section; a
    dotted key's mapping (``backbone.kwargs: {...}``) is the value, as written."""
    out: list[tuple[str, Any]] = []
    for key, value in values.items():
        if isinstance(value, dict) and value and "." not in key:
            out += _dotted(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _with(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for key, value in values.items():
        apply_override(out, f"{key}={json.dumps(value)}")
    return out


def _example(spec: dict[str, Any]) -> Any:
    return next(iter(spec.values()))[0]


def _validate_run(data: dict[str, Any], origin: str) -> StrataConfig:
    """The run config and the method's own typed hyperparameters, as ``strata run`` checks them."""
    cfg = validate_config(data, origin)
    try:
        resolve_method_params(cfg.method, cfg.train.lr)
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from None
    return cfg


def _check_space(sweep: SweepConfig) -> None:
    """Every space key must be a real config key that accepts the space's values: fail before any trial."""
    base = base_config(sweep)
    for key, spec in sweep.space.items():
        for value in next(iter(spec.values())):  # every choice, or both bounds
            _validate_run(_with(base, {key: value}), f"space.{key}={value!r}")
    if sweep.search.algorithm == "optuna" and any(next(iter(s)) == "grid" for s in sweep.space.values()):
        raise ConfigError("space: grid keys need search.algorithm random (Optuna samples, it does not enumerate)")
    _validate_run(_with(base, {k: _example(s) for k, s in sweep.space.items()}), "sweep base + space")


def trial_config(
    sweep: SweepConfig, base: dict[str, Any], values: dict[str, Any], output_dir: str, run_name: str, storage: str
) -> StrataConfig:
    """One trial's run config: the sampled values, the first K tasks, evaluated on validation rows
    only, checkpoints in the sweep's ``storage`` (a trial's driver lands on any node)."""
    t = sweep.trial
    data = _with(base, values)
    if t.tasks is not None:
        data["stream"]["tasks"] = data["stream"]["tasks"][: t.tasks]
    data["data"]["validation_fraction"] = t.validation_fraction
    data["eval"]["split"] = "validation"
    data["train"] |= {"num_workers": t.num_workers, "cpus_per_worker": t.cpus_per_worker, "use_gpu": t.gpus_per_worker > 0}
    if t.gpus_per_worker > 0:
        data["train"]["gpus_per_worker"] = t.gpus_per_worker
    data["output_dir"] = str(output_dir)
    data["memory"] = {"uri": None, "resume": False}
    data["train"] |= {
        "storage_path": storage,
        "checkpoint_every": 0,
        "checkpoint_every_s": 0,
    }  # Tune sees every task's report, no others
    data["tracking"] |= {"run_name": run_name, "model_name": None}  # trials are not versions of the model
    return validate_config(data, f"trial {run_name}")


def final_config(
    sweep: SweepConfig, base: dict[str, Any], values: dict[str, Any], output_dir: str, storage: str
) -> dict[str, Any]:
    """The chosen configuration as a complete run config: the whole stream, scored on test.

    It trains on the same rows the trials did (the validation rows stay held out), so the test
    figure belongs to exactly the configuration that was selected.
    """
    data = _with(base, values)
    data["data"]["validation_fraction"] = sweep.trial.validation_fraction
    data["eval"]["split"] = "test"
    data["output_dir"] = str(output_dir)
    data["memory"]["uri"] = None
    data["train"]["storage_path"] = storage
    return validate_config(data, "best config").model_dump(mode="json")


def _tune_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from ray import tune

    makers = {
        "choice": tune.choice,
        "grid": tune.grid_search,
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(a[0], a[1] + 1),  # inclusive high, like the YAML reads
    }
    return {key: makers[kind](args) for key, spec in space.items() for kind, args in spec.items()}


def _search_algorithm(sweep: SweepConfig) -> Any:
    if sweep.search.algorithm == "random":
        return None  # Tune's BasicVariantGenerator: random samples, grid keys expanded
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError("search.algorithm: optuna needs `pip install optuna`") from None
    return OptunaSearch(seed=sweep.search.seed)


def _run_trial(
    values: dict[str, Any], sweep: SweepConfig, base: dict[str, Any], root: str, storage: str, parent: tuple[str, str] | None
) -> None:
    """A Tune trial: one full ``strata run`` on validation rows, each task reported to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.run import run

    context = tune.get_context()
    trial_id = context.get_trial_id()
    cfg = trial_config(sweep, base, values, f"{root}/trials/{trial_id}", f"trial {trial_id}", storage)
    tags = {"strata.trial": trial_id} | ({"mlflow.parentRunId": parent[1], "strata.sweep_run_id": parent[1]} if parent else {})
    run(cfg, callbacks=[TuneReportCallback()], tracking_tags=tags)


def sweep(sweep_cfg: SweepConfig) -> dict[str, Any]:
    """Run the sweep, pick the best finished trial on validation, re-run it on test; return the report."""
    from pipeline.run import init_ray, run

    base = base_config(sweep_cfg)
    base_cfg = validate_config(base, "sweep base")
    if base_cfg.eval.every > 1:
        raise ConfigError(
            "eval.every: a sweep scores and stops trials by their validation accuracy after every task; it needs eval.every 1"
        )
    num_tasks = sweep_cfg.trial.tasks or len(base_cfg.stream.tasks)
    root = OutputDir(absolute_path(sweep_cfg.output_dir, Path.cwd()))  # trials run in folders of their own
    # Tune's own state lives in the sweep's folder; every trial's and the final run's checkpoints
    # in the base config's train.storage_path (shared on a multi-node cluster), else there too.
    storage = absolute_path(base_cfg.train.storage_path or root.uri, Path.cwd())
    init_ray()
    check_shared_storage(
        {"output_dir": root.uri, "train.storage_path": storage},  # Tune's storage is output_dir
        resolve_tracking_uri(base_cfg.tracking) if base_cfg.tracking.enabled else None,
        alive_nodes(),
        shared_dirs(),
    )
    sweep_file = root.write_text("sweep.yaml", yaml.safe_dump(sweep_cfg.model_dump(mode="json"), sort_keys=False))
    parent = None
    if base_cfg.tracking.enabled:
        tracking = base_cfg.tracking.model_copy(update={"run_name": f"sweep {root.name}"})
        parent = TrackedRun.start(tracking, tags={"strata.sweep": root.name, "strata.method": base_cfg.method.name})
        parent.log_params({"sweep": sweep_cfg.model_dump(mode="json")})
        parent.log_artifact(sweep_file)
    metric = OBJECTIVES[sweep_cfg.search.objective]
    try:
        trials = _trials(_tuner(sweep_cfg, base, root, storage, parent, num_tasks).fit(), metric)
        finished = [t for t in trials if t["tasks_run"] == num_tasks and t["error"] is None]
        if not finished:
            failed = sum(t["error"] is not None for t in trials)
            raise ConfigError(f"sweep {root.name}: no trial finished all {num_tasks} tasks ({failed} failed)")
    except Exception:
        if parent:
            parent.finish("FAILED")
        raise
    best = max(finished, key=lambda t: t["objective_per_task"][-1])
    report: dict[str, Any] = {
        "objective": sweep_cfg.search.objective,
        "num_tasks": num_tasks,
        "trials": trials,
        "stopped_early": sum(t["tasks_run"] < num_tasks and t["error"] is None for t in trials),
        "best": {"trial_id": best["trial_id"], "config": best["config"], "validation_objective": best["objective_per_task"][-1]},
        "mlflow_run_id": parent.run_id if parent else None,
    }
    best_config = final_config(sweep_cfg, base, best["config"], root.join("final"), storage)
    root.write_text("best_config.yaml", yaml.safe_dump(best_config, sort_keys=False))
    _plot(trials, sweep_cfg, metric, root.local / "sweep_objective.png")
    root.publish("sweep_objective.png")
    if sweep_cfg.final_run:
        tags = {"strata.sweep_run_id": parent.run_id, "strata.sweep_role": "final"} if parent else {}
        best_config["tracking"]["run_name"] = f"sweep {root.name}: best config on test"
        summary = run(validate_config(best_config, "best config"), tracking_tags=tags)
        report["final"] = summary.headline()
    root.write_text("sweep_summary.json", json.dumps(report, indent=1))
    if parent:
        _close_parent(parent, report, trials, sweep_cfg, root, num_tasks)
    return report


def _tuner(
    sweep_cfg: SweepConfig, base: dict[str, Any], root: OutputDir, storage: str, parent: TrackedRun | None, num_tasks: int
) -> Any:
    """The Tuner: a trial per point of the space, each a full run on validation rows; ASHA (or
    FIFO) over the per-task reports."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    search = sweep_cfg.search
    # max_t one past the last task: ASHA stops a trial that reaches max_t, which would kill a
    # finished trial before its run is closed and its summary written.
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            max_t=num_tasks + 1,
            grace_period=search.grace_period,
            reduction_factor=search.reduction_factor,
        )
        if search.scheduler == "asha"
        else FIFOScheduler()
    )
    trainable = tune.with_resources(
        tune.with_parameters(
            _run_trial, sweep=sweep_cfg, base=base, root=root.uri, storage=storage,
            parent=(parent.tracking_uri, parent.run_id) if parent else None,
        ),
        {"CPU": sweep_cfg.trial.driver_cpus},
    )  # fmt: skip
    return tune.Tuner(
        trainable,
        param_space=_tune_space(sweep_cfg.space),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVES[search.objective],
            mode="max",
            scheduler=scheduler,
            search_alg=_search_algorithm(sweep_cfg),
            num_samples=search.num_samples,
            max_concurrent_trials=search.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=root.uri, verbose=0),
    )


def _trials(grid: Any, metric: str) -> list[dict[str, Any]]:
    """Each trial of a finished Tune grid: its config, how many tasks it ran, the objective after each, its error."""
    trials = []
    for result in grid:
        history = result.metrics_dataframe
        trials.append({
            "trial_id": (result.metrics or {}).get("trial_id"),
            "config": dict(result.config),
            "tasks_run": int(len(history)) if history is not None else 0,
            "objective_per_task": [float(v) for v in history[metric]] if history is not None and metric in history else [],
            "error": str(result.error).splitlines()[0] if result.error else None,
        })  # fmt: skip
    return trials


def _close_parent(
    parent: TrackedRun,
    report: dict[str, Any],
    trials: list[dict[str, Any]],
    sweep_cfg: SweepConfig,
    root: OutputDir,
    num_tasks: int,
) -> None:
    """The sweep's MLflow run: stopped trials marked, the best validation and final test metrics, the artifacts."""
    _mark_stopped_trials(parent, trials, num_tasks)
    parent.log_metrics({f"best_validation_{sweep_cfg.search.objective}": report["best"]["validation_objective"],
                        "trials_stopped_early": float(report["stopped_early"])})  # fmt: skip
    if "final" in report:
        parent.log_metrics({f"test_{k}": report["final"][k] for k in ("avg_acc", "last_acc", "forgetting", "bwt")})
        parent.client.set_tag(parent.run_id, "strata.final_run_id", report["final"]["mlflow_run_id"] or "")
    for name in ("best_config.yaml", "sweep_objective.png", "sweep_summary.json"):
        parent.log_artifact(root.local / name)
    parent.finish()


def _mark_stopped_trials(parent: TrackedRun, trials: list[dict[str, Any]], num_tasks: int) -> None:
    """ASHA kills a stopped trial mid-run; close its MLflow run as KILLED and say why."""
    from mlflow.entities import RunStatus

    runs = parent.client.search_runs(
        [parent.client.get_run(parent.run_id).info.experiment_id], filter_string=f"tags.strata.sweep_run_id = '{parent.run_id}'"
    )
    done = {t["trial_id"]: t for t in trials}
    for r in runs:
        trial = done.get(r.data.tags.get("strata.trial"))
        if trial and r.info.status == "RUNNING":
            parent.client.set_tag(r.info.run_id, "strata.stopped_after_tasks", str(trial["tasks_run"]))
            parent.client.set_terminated(r.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))


def _plot(trials: list[dict[str, Any]], sweep_cfg: SweepConfig, metric: str, path: Path) -> None:
    """Objective (at each trial's last task) against each hyperparameter; trials ASHA stopped are hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(sweep_cfg.space)
    fig, axes = plt.subplots(1, len(keys), figsize=(max(5.0, 4.0 * len(keys)), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for t in trials:
            if not t["objective_per_task"]:
                continue
            value = t["config"].get(key)
            x = value if isinstance(value, int | float) else str(value)
            full = t["tasks_run"] == max(tr["tasks_run"] for tr in trials)
            ax.scatter([x], [t["objective_per_task"][-1]], facecolors="C0" if full else "none", edgecolors="C0")
        ax.set_xlabel(key)
        if next(iter(sweep_cfg.space[key])) == "loguniform":
            ax.set_xscale("log")
    axes[0][0].set_ylabel(f"validation {sweep_cfg.search.objective}")
    fig.suptitle("sweep trials: filled = ran every task, hollow = stopped early", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
