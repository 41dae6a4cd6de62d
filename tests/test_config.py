from pathlib import Path

import pytest
import yaml

from pipeline.config import apply_override, load_config, validate_config
from pipeline.errors import ConfigError
from pipeline.methods import resolve_method_params

from conftest import blobs_task

REPO = Path(__file__).parent.parent


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def base(tmp_path: Path) -> dict:
    return {"stream": {"tasks": [blobs_task("a")]}, "output_dir": str(tmp_path / "out")}


def test_quickstart_config_loads_with_defaults():
    cfg = load_config(REPO / "configs/quickstart.yaml")
    assert len(cfg.stream.tasks) >= 4
    assert cfg.train.num_workers == 2
    assert cfg.memory_uri.endswith("memory")


def test_overrides_are_typed_and_reach_lists(tmp_path):
    path = write(tmp_path / "c.yaml", base(tmp_path))
    cfg = load_config(path, ["train.batch_size=7", "train.use_gpu=false", "stream.tasks.0.domain=sketch", "method.name=finetune"])
    assert cfg.train.batch_size == 7
    assert cfg.train.use_gpu is False
    assert cfg.stream.tasks[0].domain == "sketch"
    assert cfg.method.name == "finetune"


def test_unknown_key_names_the_key(tmp_path):
    path = write(tmp_path / "c.yaml", {**base(tmp_path), "train": {"batch_sise": 3}})
    with pytest.raises(ConfigError, match=r"train\.batch_sise: Extra inputs are not permitted"):
        load_config(path)


def test_wrong_type_names_the_key(tmp_path):
    path = write(tmp_path / "c.yaml", base(tmp_path))
    with pytest.raises(ConfigError, match=r"train\.num_workers: Input should be a valid integer"):
        load_config(path, ["train.num_workers=many"])


def test_wrong_source_type_names_the_task_field(tmp_path):
    data = base(tmp_path)
    data["stream"]["tasks"][0]["train"] = {"type": "csv", "path": "x"}
    with pytest.raises(ConfigError, match=r"stream\.tasks\.0\.train"):
        load_config(write(tmp_path / "c.yaml", data))


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override({}, "train.batch_size")
    with pytest.raises(ConfigError, match="no list index"):
        apply_override({"stream": {"tasks": []}}, "stream.tasks.3.id=x")


def test_manifest_is_inlined(tmp_path):
    manifest = write(tmp_path / "stream.yaml", {"tasks": [blobs_task("a"), blobs_task("b")]})
    path = write(tmp_path / "c.yaml", {"stream": {"scenario": "dil", "manifest": str(manifest)}})
    cfg = load_config(path)
    assert [t.id for t in cfg.stream.tasks] == ["a", "b"]
    assert cfg.stream.scenario == "dil"
    write(tmp_path / "stream.yaml", {"tasks": [], "extra": 1})
    with pytest.raises(ConfigError, match="unknown top-level key 'extra'"):
        load_config(path)


def test_method_params_are_validated_by_the_method(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", base(tmp_path)), ["method.name=finetune", "method.lr=0.5"])
    assert resolve_method_params(cfg.method).lr == 0.5
    assert resolve_method_params(cfg.method, lr=0.1).lr == 0.1  # train.lr overrides
    bad = load_config(write(tmp_path / "d.yaml", base(tmp_path)), ["method.name=finetune", "method.lrr=1"])
    with pytest.raises(ConfigError, match=r"method\.lrr: Extra inputs are not permitted"):
        resolve_method_params(bad.method)
    unknown = load_config(write(tmp_path / "e.yaml", base(tmp_path)), ["method.name=nope"])
    with pytest.raises(ConfigError, match=r"method\.name: 'nope' is not a registered method"):
        resolve_method_params(unknown.method)


def test_later_files_merge_over_earlier_ones(tmp_path):
    first = write(tmp_path / "a.yaml", {**base(tmp_path), "train": {"batch_size": 8, "passes": 2}})
    second = write(tmp_path / "b.yaml", {"method": {"name": "finetune", "lr": 0.2}, "train": {"batch_size": 64}})
    cfg = load_config([first, second])
    assert (cfg.train.batch_size, cfg.train.passes) == (64, 2)
    assert cfg.method.name == "finetune" and resolve_method_params(cfg.method).lr == 0.2


def test_local_paths_become_absolute_for_the_workers(tmp_path):
    from pipeline.config import with_absolute_paths

    task = {
        "id": "t",
        "train": {"type": "parquet", "path": ["data/a.parquet", "s3://bucket/b.parquet"]},
        "test": {"type": "folder", "path": "/abs/test"},
    }
    cfg = validate_config(
        {
            "stream": {"tasks": [task]},
            "backbone": {"name": "open_clip:local-dir:cache/clip", "checkpoint": "w.safetensors"},
            "output_dir": "runs/x",
        }
    )
    out = with_absolute_paths(cfg, tmp_path)
    assert out.stream.tasks[0].train.path == [str(tmp_path / "data/a.parquet"), "s3://bucket/b.parquet"]
    assert out.stream.tasks[0].test.path == "/abs/test"
    assert out.backbone.name == f"open_clip:local-dir:{tmp_path / 'cache/clip'}"
    assert out.backbone.checkpoint == str(tmp_path / "w.safetensors")
    assert out.output_dir == str(tmp_path / "runs/x") and out.memory_uri == str(tmp_path / "runs/x/memory")


def test_every_shipped_method_config_validates_against_its_method():
    from pipeline.config import MethodConfig, read_yaml

    paths = sorted((REPO / "configs/methods").glob("*.yaml"))
    assert len(paths) >= 20
    for path in paths:
        section = read_yaml(path)["method"]
        params = resolve_method_params(MethodConfig(**section))
        assert params.name == section["name"], path


def test_eval_every_is_refused_where_a_row_must_be_scored_after_every_task(tmp_path):
    path = write(tmp_path / "c.yaml", {**base(tmp_path), "eval": {"every": 2}})
    assert load_config(path).eval.every == 2
    with pytest.raises(ConfigError, match="eval.every: a registered version's champion gate reads its task's accuracy row"):
        load_config(path, ["tracking.model_name=m"])
    with pytest.raises(ConfigError, match=r"eval\.every: Input should be greater than or equal to 1"):
        load_config(path, ["eval.every=0"])
