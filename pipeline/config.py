"""Typed run configuration: pydantic models, YAML loading and dotted ``--set`` overrides.

Every run is reproducible from its resolved config alone: defaults are filled in, the task
manifest is inlined, and the result is written next to the run's outputs and to MLflow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import ConfigError

Scenario = Literal["til", "cil", "dil", "dcil"]
MAX_LR = 1e3  # no learning rate of any strata method's parameterisation is meaningful above this
CLUSTER_MAX_FAILURES = 3
BUILTIN_KEY_REMAPS = ("in_order",)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceBase(StrictModel):
    every: int = Field(
        default=1,
        ge=1,
        description="keep every k-th row (row id % k == 0): a deterministic subsample, class-balanced on label-sorted files",
    )


class ParquetSource(SourceBase):
    """Parquet files of encoded images (columns ``image`` bytes and ``label`` int)."""

    type: Literal["parquet"] = "parquet"
    path: str | list[str] = Field(description="file, directory of *.parquet, glob, or list; any fsspec URI")


class FolderSource(SourceBase):
    """An image folder with one subfolder per class (class names = sorted subfolder names)."""

    type: Literal["folder"] = "folder"
    path: str


class GeneratorSource(SourceBase):
    """An in-process generator registered in ``pipeline.data.generators`` (tests, quickstart)."""

    type: Literal["generator"] = "generator"
    name: str
    split: Literal["train", "test"] = "train"
    params: dict[str, Any] = Field(default_factory=dict)


Source = Annotated[ParquetSource | FolderSource | GeneratorSource, Field(discriminator="type")]


class TaskConfig(StrictModel):
    id: str = Field(min_length=1)
    train: Source
    test: Source
    classes: list[str] | None = Field(
        default=None, description="the source's class names by label; read from the Parquet metadata when absent"
    )
    domain: str | None = None
    class_subset: list[int | str] | None = Field(
        default=None, description="source labels (or class names) to keep, in this order; others are dropped"
    )
    rename: dict[str, str] = Field(
        default_factory=dict,
        description="class name -> name used in the stream; tasks share a class exactly when names are equal",
    )


class StreamConfig(StrictModel):
    scenario: Scenario = "cil"
    manifest: str | None = Field(default=None, description="YAML file with a top-level 'tasks' list")
    tasks: list[TaskConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_task_source(self) -> StreamConfig:
        if self.manifest is not None and self.tasks:
            raise ValueError("give either 'manifest' or 'tasks', not both")
        return self


class BackboneConfig(StrictModel):
    name: str = Field(default="timm:vit_tiny_patch16_224", description="FAMILY:MODEL, e.g. timm:resnet18")
    pretrained: bool | str = Field(default=False, description="the library's own pretrained weights (True or a tag)")
    checkpoint: str | None = Field(default=None, description="local weights file (.safetensors, or a torch state dict)")
    key_remap: str | None = Field(
        default=None,
        description="'in_order' (checkpoint tensors onto the model's, in order, shape for shape) or 'module:function' "
        "(imported; only from a config file you run, never from a registry card or a landed task)",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the model constructor")
    seed: int = Field(default=0, description="seed for random init, so every worker builds the same model")


class MethodConfig(BaseModel):
    """The method's name plus its own hyperparameters, validated by the method's typed config."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = "ncm"


class TrainConfig(StrictModel):
    batch_size: int = Field(default=32, ge=1, description="global batch size, split across workers")
    lr: float | None = Field(
        default=None, gt=0, le=MAX_LR, allow_inf_nan=False, description="overrides the method's default learning rate"
    )
    passes: int = Field(default=1, ge=1, description="passes over each task's training data")
    num_workers: int = Field(default=2, ge=1, description="Ray Train workers")
    cpus_per_worker: float = Field(default=0.5, gt=0)
    use_gpu: bool | Literal["auto"] = "auto"
    gpus_per_worker: float = Field(default=1.0, gt=0, description="GPUs per worker when training on GPU; a fraction shares one")
    amp: bool = Field(default=True, description="autocast to bfloat16 on GPU; ignored on CPU")
    max_failures: int | Literal["auto"] = Field(
        default="auto",
        description="worker-group restarts after a worker dies; a restart resumes at the unfinished task. 'auto': "
        f"{CLUSTER_MAX_FAILURES} on a cluster joined through RAY_ADDRESS (preemptible nodes), 0 on a local Ray, where "
        "a failure is a bug that a retry repeats; -1 retries forever",
    )
    log_every: int = Field(default=10, ge=1, description="steps between progress lines")
    storage_path: str | None = Field(default=None, description="Ray Train storage; default OUTPUT_DIR/ray")
    checkpoint_every: int = Field(
        default=0,
        ge=0,
        description="also checkpoint inside a task every N optimizer steps (0: off); a restarted worker group then "
        "goes on from there and reads only the rows the checkpoint does not hold",
    )
    checkpoint_every_s: float = Field(
        default=1800.0,
        ge=0,
        description="also checkpoint inside a task when this many seconds have passed since the last (0: off; "
        "single-pass runs only, as checkpoint_every)",
    )
    resources_timeout_s: float = Field(
        default=0.0,
        ge=0,
        description="how long to wait for the cluster to offer the worker group (an autoscaler adding nodes) before "
        "failing; 0 fails at once when the workers do not fit",
    )


class DataConfig(StrictModel):
    rows_per_chunk: int = Field(
        default=128, ge=1, description="rows per chunk, the unit of planning and resume (a row-group slice, files, ...)"
    )
    decode_cpus: float = Field(default=0.25, gt=0, description="CPUs per Ray Data read or decode task")
    decode_tasks: int | None = Field(
        default=None,
        ge=1,
        description="most decode tasks one dataset runs at once; default: the CPUs of the whole cluster, on a "
        "one-node cluster its cores (more only start more Python workers that wait for the same cores)",
    )
    shuffle_chunks: bool = Field(
        default=True,
        description="shuffle the order of read units per task (seeded); a unit is a Parquet row group, read in one "
        "pass in file order, so a label-sorted source mixes across row groups and within the shuffle buffer",
    )
    shuffle_buffer: int = Field(
        default=2048,
        ge=0,
        description="rows each worker mixes before batching (a seeded local shuffle buffer; 0 = chunk order only). "
        "With chunks shuffled, a label-sorted source then gives batches of many classes",
    )
    image_size: int | None = Field(default=None, ge=1, description="resize side; default: the backbone's input size")
    validation_fraction: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="fraction of each task's training rows held out as its validation split"
    )


class EvalConfig(StrictModel):
    batch_size: int = Field(default=128, ge=1)
    split: Literal["test", "validation"] = Field(
        default="test",
        description="what the accuracy matrix measures: the test sets, or the validation rows carved out of "
        "training data (data.validation_fraction); with 'validation' no test source is ever opened",
    )
    label_space: Literal["auto", "task", "seen"] = Field(
        default="auto",
        description="classes a test sample is scored against: its task's own (til; dcil as in MTIL), "
        "or every seen class (cil, dil); auto picks by scenario",
    )
    every: int = Field(
        default=1,
        ge=1,
        description="score the seen tasks' test sets after every k-th task and after the last; other rows of the "
        "accuracy matrix stay null (T tasks cost about T^2 / 2k test-set passes instead of T^2 / 2)",
    )
    cache_mb: int = Field(
        default=2048,
        ge=0,
        description="local disk per worker for its share of the test sets, decoded once per run and read back at every "
        "later evaluation; a share that does not fit is decoded again each time (0: always)",
    )


class TrackingConfig(StrictModel):
    enabled: bool = True
    uri: str | None = Field(default=None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    experiment: str = "strata"
    run_name: str | None = None
    model_name: str | None = Field(
        default=None,
        description="register a version of the continual model (backbone id + memory-store version) under this "
        "name in MLflow's model registry after every task",
    )
    champion_tolerance: float = Field(
        default=2.0,
        ge=0,
        le=100,
        description="accuracy points a new version may lose, on mean over the tasks the current @champion knows, "
        "and still become @champion",
    )


class MemoryConfig(StrictModel):
    uri: str | None = Field(default=None, description="memory store directory or fsspec URI; default OUTPUT_DIR/memory")
    resume: bool = Field(
        default=False,
        description="continue a stream: the store's records must be the stream's first tasks (same ids, method and "
        "backbone); those tasks are not trained again",
    )


class StrataConfig(StrictModel):
    stream: StreamConfig
    backbone: BackboneConfig = BackboneConfig()
    method: MethodConfig = MethodConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    memory: MemoryConfig = MemoryConfig()
    output_dir: str = "runs/latest"
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> StrataConfig:
        if self.eval.split == "validation" and self.data.validation_fraction == 0:
            raise ValueError("eval.split 'validation' needs data.validation_fraction > 0")
        if self.tracking.model_name and not self.tracking.enabled:
            raise ValueError("tracking.model_name registers versions in MLflow: it needs tracking.enabled")
        if self.tracking.model_name and self.eval.every > 1:
            raise ValueError(
                "eval.every: a registered version's champion gate reads its task's accuracy row; it needs eval.every 1"
            )
        if self.train.passes > 1 and self.train.checkpoint_every:
            raise ValueError("train.checkpoint_every: checkpoints inside a task need train.passes: 1")
        return self

    @property
    def memory_uri(self) -> str:
        return self.memory.uri or f"{self.output_dir.rstrip('/')}/memory"  # a string join: output_dir may be a URI


# Model-constructor arguments a config that arrives as data may pass to timm / open_clip: shapes,
# regularisation, switches. Others name files, URLs or modules to load from (timm's
# checkpoint_path and pretrained_cfg_overlay, open_clip's cache_dir, ...).
DATA_BACKBONE_KWARGS = frozenset(
    {
        "img_size", "patch_size", "depth", "embed_dim", "num_heads", "mlp_ratio", "qkv_bias", "in_chans", "class_token",
        "global_pool", "drop_rate", "drop_path_rate", "init_values", "reg_tokens", "no_embed_class", "dynamic_img_size",
        "force_quick_gelu", "force_image_size", "force_patch_dropout", "pretrained_hf",
    }
)  # fmt: skip


def refuse_code(data: Any, origin: str) -> None:
    """A config that arrives as data -- a registry card ``strata predict`` loads, a landed
    ``task.yaml`` -- may not name code to import, nor pass the backbone library an argument that
    says where to load from: whoever can write it could run code or swap weights otherwise."""
    backbone = data.get("backbone") if isinstance(data, dict) else None
    if not isinstance(backbone, dict):
        return
    remap = backbone.get("key_remap")
    if remap is not None and remap not in BUILTIN_KEY_REMAPS:
        raise ConfigError(
            f"{origin}: backbone.key_remap {remap!r} names code to import, which only a config file you run may do; "
            f"from here only {', '.join(BUILTIN_KEY_REMAPS)} is accepted"
        )
    kwargs = backbone.get("kwargs") or {}
    for key, value in kwargs.items() if isinstance(kwargs, dict) else []:
        plain = isinstance(value, bool | int | float) or (isinstance(value, str) and value.isidentifier())
        sizes = isinstance(value, list) and all(isinstance(v, int | float) for v in value)
        if key not in DATA_BACKBONE_KWARGS or not (plain or sizes):
            raise ConfigError(
                f"{origin}: backbone.kwargs.{key} = {value!r} is not accepted from here (only numbers, flags and names for "
                f"{', '.join(sorted(DATA_BACKBONE_KWARGS))}); only a config file you run may pass other arguments"
            )


def format_validation_error(origin: str, err: ValidationError) -> str:
    """One line: ``origin: a.b.c: message`` for each problem, joined by '; '."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "tagged-union")))
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{origin}: " + "; ".join(parts)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.0.c=value`` in place; the value is parsed as YAML (so 3, true, [1, 2] work)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE")
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: no list index {part!r} at {'.'.join(parts[:depth])}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict | list):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: depth + 1])} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {key}: no list index {last!r}")
        node[int(last)] = _parse_value(raw)
    else:
        node[last] = _parse_value(raw)


def describe_yaml_error(exc: yaml.YAMLError) -> str:
    """``:LINE:COLUMN: not valid YAML (problem)`` -- the position 1-based, where the parser knows it."""
    mark = getattr(exc, "problem_mark", None)
    position = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    return f"{position}: not valid YAML ({getattr(exc, 'problem', None) or exc.__class__.__name__})"


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}{describe_yaml_error(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` on top of ``base``: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(
    path: str | Path | list[str | Path] | tuple[str | Path, ...] | None, overrides: list[str] | tuple[str, ...] = ()
) -> StrataConfig:
    """Read YAML config(s) (later files merge over earlier ones), apply ``--set`` overrides,
    inline the task manifest, validate."""
    paths = [] if path is None else [path] if isinstance(path, str | Path) else list(path)
    data: dict[str, Any] = {}
    for item in paths:
        data = deep_merge(data, read_yaml(item))
    for assignment in overrides:
        apply_override(data, assignment)
    origin = " + ".join(str(p) for p in paths) or "config"
    stream = data.get("stream")
    if isinstance(stream, dict) and stream.get("manifest") and not stream.get("tasks"):
        manifest = read_yaml(stream["manifest"])
        extra = set(manifest) - {"tasks"}
        if extra:
            raise ConfigError(f"{stream['manifest']}: unknown top-level key {sorted(extra)[0]!r} (expected 'tasks')")
        origin = f"{origin} (tasks from {stream['manifest']})"
        data = {**data, "stream": {**stream, "tasks": manifest.get("tasks", []), "manifest": None}}
    return validate_config(data, origin)


def validate_config(data: dict[str, Any], origin: str = "config") -> StrataConfig:
    try:
        return StrataConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(origin, err)) from None


def absolute_path(path: str, root: Path) -> str:
    """``path`` against ``root`` unless it is absolute or a URI."""
    return path if "://" in path or Path(path).is_absolute() else os.path.normpath(root / path)


def with_absolute_paths(cfg: StrataConfig, root: Path | None = None) -> StrataConfig:
    """Local paths made absolute against ``root`` (the driver's working directory): Ray's
    workers run in directories of their own, where a relative path means something else."""
    root = root or Path.cwd()
    data = cfg.model_dump(mode="json")
    for task in data["stream"]["tasks"]:
        for split in ("train", "test"):
            source = task[split]
            if "path" in source:
                paths = source["path"]
                source["path"] = absolute_path(paths, root) if isinstance(paths, str) else [absolute_path(p, root) for p in paths]
    backbone = data["backbone"]
    if backbone["checkpoint"]:
        backbone["checkpoint"] = absolute_path(backbone["checkpoint"], root)
    family, _, model = backbone["name"].partition(":")
    if model.startswith("local-dir:"):
        backbone["name"] = f"{family}:local-dir:{absolute_path(model.removeprefix('local-dir:'), root)}"
    data["output_dir"] = absolute_path(data["output_dir"], root)
    for section, key in (("memory", "uri"), ("train", "storage_path")):
        if data[section][key]:
            data[section][key] = absolute_path(data[section][key], root)
    return StrataConfig.model_validate(data)


def dump_config(cfg: StrataConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
