"""A registry version carries no code: strata's loader refuses anything but the card it wrote."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import save_file

from pipeline.backbones import create_backbone, weight_files
from pipeline.backbones import factory
from pipeline.config import BackboneConfig, validate_config
from pipeline.errors import ConfigError
from pipeline.serve.predict import Predictor
from pipeline.serve.pyfunc import LOADER_MODULE, load
from pipeline.memory import MemoryStore, TaskRecord
from pipeline.serve import ModelCard, load_version, register_version
from pipeline.serve.registry import CARD_DATA

from conftest import TINY_VIT, run_config

EVIL = "import os, pathlib; pathlib.Path(os.environ['STRATA_TEST_MARKER']).write_text('ran')\n"  # code a registry writer planted


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ModelCard, Path]:
    return register(tmp_path_factory.mktemp("registry"))


def register(tmp_path: Path) -> tuple[str, ModelCard, Path]:
    """Version 1 of model ``m``: an NCM over two classes on the tiny ViT (from a checkpoint file),
    in a SQLite registry under ``tmp_path``; (tracking URI, card, the version's model directory)."""
    checkpoint = tmp_path / "weights" / "tiny-vit.safetensors"
    checkpoint.parent.mkdir()
    save_file(create_backbone(BackboneConfig(**TINY_VIT)).model.state_dict(), str(checkpoint))
    cfg = validate_config(
        run_config(tmp_path, [], backbone={**TINY_VIT, "checkpoint": str(checkpoint)}, memory={"uri": str(tmp_path / "memory")})
    )
    backbone = create_backbone(cfg.backbone)
    store = MemoryStore(str(tmp_path / "memory"))
    means = torch.randn(2, backbone.feature_dim, generator=torch.Generator().manual_seed(0))
    record = TaskRecord({"classes": torch.tensor([0, 1]), "means": means, "counts": torch.tensor([5, 7])})
    store.append(record, task_index=0, task_id="a", method="ncm", backbone_id=backbone.backbone_id)
    card = ModelCard(
        config=cfg.model_dump(mode="json"),
        backbone_id=backbone.backbone_id,
        memory_store=store.uri,
        memory_version=1,
        scenario="cil",
        label_space="seen",
        image_size=16,
        tasks=[{"id": "a", "classes": [0, 1], "domain": None}],
        class_names=["cat", "dog"],
        records_sha256=[e.sha256 for e in store.entries()],
        weights_sha256=weight_files(cfg.backbone),
    )
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking)
    experiment = client.create_experiment("registry", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    assert register_version(tracking, run_id, "m", card, {}, LOADER_MODULE) == "1"
    return tracking, card, Path(client.get_model_version("m", "1").source)


def test_a_version_holds_the_card_and_the_pyfunc_agrees_with_strata_predict(registered, monkeypatch):
    tracking, card, source = registered
    files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    assert files == ["MLmodel", "conda.yaml", CARD_DATA, "python_env.yaml", "requirements.txt"]
    assert not [f for f in files if f.endswith((".py", ".pkl", ".pickle"))]
    pyfunc = yaml.safe_load((source / "MLmodel").read_text())["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "pipeline.serve.pyfunc" and pyfunc.get("code") is None and "python_model" not in pyfunc
    assert load_version(tracking, "m/1").card == card  # what strata predict reads, field for field

    images = [_png(i) for i in range(6)]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    frame = load("models:/m/1").predict(pd.DataFrame({"image": images}))
    direct = Predictor(card.to_json(), None, "image")(
        {"image": np.array(images, dtype=object)}
    ).to_pandas()  # strata predict's actor
    assert frame["pred_class"].tolist() == direct["pred_class"].tolist() and set(direct["pred_class"]) <= {"cat", "dog"}
    assert frame["score"].tolist() == direct["score"].tolist()
    assert (
        mlflow.pyfunc.load_model("models:/m/1").predict(pd.DataFrame({"image": images}))["pred"].tolist()
        == direct["pred"].tolist()
    )


def _tamper(source: Path, target: Path, flavor: dict, files: dict[str, str]) -> Path:
    shutil.copytree(source, target)
    mlmodel = yaml.safe_load((target / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"].update(flavor)
    (target / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    for name, text in files.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_text(text)
    return target


@pytest.mark.parametrize(
    ("flavor", "files", "refusal"),
    [
        ({"loader_module": "evil_loader", "code": "code"}, {"code/evil_loader.py": EVIL}, "MLmodel loads 'evil_loader'"),
        (
            {"code": "code"},
            {"code/pipeline/__init__.py": EVIL, "code/pipeline/serve/pyfunc.py": EVIL},
            "python_function has code",
        ),
        (
            {"loader_module": "mlflow.pytorch", "data": "data"},
            {"data/model.pth": "not a state dict"},
            "MLmodel loads 'mlflow.pytorch'",
        ),
        (
            {"python_model": "python_model.pkl", "cloudpickle_version": "3.1"},
            {"python_model.pkl": "x"},
            "python_function has cloudpickle_version",
        ),
        ({}, {"code/evil_loader.py": EVIL}, "holds code/evil_loader.py"),
    ],
)
def test_a_tampered_version_is_refused_before_anything_of_it_runs(registered, tmp_path, monkeypatch, flavor, files, refusal):
    _, _, source = registered
    tampered = _tamper(source, tmp_path / "tampered", flavor, files)
    monkeypatch.setenv("STRATA_TEST_MARKER", str(tmp_path / "RAN"))
    monkeypatch.delitem(sys.modules, "evil_loader", raising=False)
    with pytest.raises(ConfigError, match=refusal):
        load(str(tampered))
    assert not (tmp_path / "RAN").exists() and "evil_loader" not in sys.modules


def test_mlflow_alone_runs_what_a_registry_writer_put_in_a_version(registered, tmp_path, monkeypatch):
    """Why ``load`` checks: MLflow's own loader imports whatever module MLmodel names."""
    _, _, source = registered
    tampered = _tamper(
        source, tmp_path / "tampered", {"loader_module": "evil_loader", "code": "code"}, {"code/evil_loader.py": EVIL}
    )
    monkeypatch.setenv("STRATA_TEST_MARKER", str(tmp_path / "RAN"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # MLflow prepends the version's code directory
    monkeypatch.delitem(sys.modules, "evil_loader", raising=False)
    try:
        with pytest.raises(AttributeError):  # evil_loader has no _load_pyfunc; its code ran on import all the same
            mlflow.pyfunc.load_model(str(tampered))
    finally:
        sys.modules.pop("evil_loader", None)  # imported from a temporary directory: forget it
    assert (tmp_path / "RAN").read_text() == "ran"


def test_the_card_pins_the_backbone_files_and_a_changed_one_is_refused_before_it_is_read(tmp_path, monkeypatch):
    tracking, card, _ = register(tmp_path)
    (checkpoint,) = card.weights_sha256
    assert card.weights_sha256 == {checkpoint: factory.file_sha256(Path(checkpoint))}
    state = {k: v.clone() for k, v in create_backbone(BackboneConfig(**TINY_VIT)).model.state_dict().items()}
    next(iter(state.values())).add_(1.0)
    save_file(state, checkpoint)  # someone with write access to the weights' location swapped them

    def never(path: str) -> dict:
        raise AssertionError(f"{path} was read")

    monkeypatch.setattr(factory, "load_state_dict_file", never)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    with pytest.raises(ConfigError, match=rf"model card: {checkpoint}: sha256 \w{{12}}, but the model version pins \w{{12}}"):
        load("models:/m/1")


@pytest.mark.parametrize(
    ("kwargs", "accepted"),
    [
        ({"img_size": 16, "patch_size": 4, "global_pool": "token", "drop_rate": 0.1, "pretrained_hf": False}, True),
        ({"checkpoint_path": "/tmp/evil.pth"}, False),  # timm loads it with the unpickler
        ({"pretrained_cfg_overlay": {"file": "/tmp/evil.pth"}}, False),
        ({"cache_dir": "/tmp/elsewhere"}, False),
        ({"global_pool": "../../x"}, False),
    ],
)
def test_a_card_passes_the_backbone_library_no_argument_that_says_where_to_load_from(registered, kwargs, accepted):
    _, card, _ = registered
    config = {**card.config, "backbone": {**card.config["backbone"], "kwargs": kwargs}}
    text = ModelCard(**{**card.__dict__, "config": config}).to_json()
    if accepted:
        assert ModelCard.from_json(text, "card").config["backbone"]["kwargs"] == kwargs
    else:
        with pytest.raises(ConfigError, match=rf"card: backbone.kwargs.{next(iter(kwargs))} = .* is not accepted from here"):
            ModelCard.from_json(text, "card")
