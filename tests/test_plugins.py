"""A method from another package registers through the ``strata.methods`` entry-point group: an
installed distribution (here a .dist-info folder on sys.path, which is what `pip install` leaves,
found by importlib.metadata the supported way) is listed, validated and built by name."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import BackboneConfig, MethodConfig
from pipeline.errors import ConfigError
from pipeline.methods import TaskInfo, create_method, method_class, resolve_method_params

from conftest import TINY_VIT

PLUGIN = '''
import torch
from pipeline.memory import TaskRecord
from pipeline.methods import Method, MethodParams


class MeanConfig(MethodParams):
    momentum: float = 0.5


class RunningMean(Method):
    """Predicts the class whose running mean feature is nearest."""

    scenarios = frozenset({"cil", "dil"})
    Config = MeanConfig

    def begin_task(self, task):
        super().begin_task(task)
        self.means = torch.zeros(task.num_seen_classes, self.backbone.feature_dim)

    def training_step(self, batch):
        features = self.frozen_features(batch["image"])
        for c in batch["label"].unique():
            self.means[c] = self.cfg.momentum * self.means[c] + (1 - self.cfg.momentum) * features[batch["label"] == c].mean(0)
        return None

    def end_task(self):
        return TaskRecord({"means": self.means.clone()})

    def restore(self, records):
        if records:
            self.means = records[-1].tensors["means"].clone()

    def predict(self, images, task_ids=None):
        return -torch.cdist(self.frozen_features(images), self.means)
'''


def install(folder, entry_points: str) -> None:
    """What `pip install` leaves for a distribution: its module and a .dist-info with entry points."""
    (folder / "strata_plugin_example.py").write_text(PLUGIN)
    info = folder / "strata_plugin_example-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: strata-plugin-example\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[strata.methods]\n{entry_points}\n")


@pytest.fixture
def plugins(monkeypatch):
    from pipeline.methods import base

    before = dict(base._METHODS)
    yield monkeypatch
    base._METHODS.clear()
    base._METHODS.update(before)
    sys.modules.pop("strata_plugin_example", None)  # each test imports its own install afresh


def test_an_installed_packages_method_is_found_by_name_listed_and_built(plugins, tmp_path):
    install(tmp_path, "running_mean = strata_plugin_example:RunningMean")
    plugins.syspath_prepend(str(tmp_path))
    cls = method_class("running_mean")
    assert cls.__module__ == "strata_plugin_example" and cls.name == "running_mean"
    result = CliRunner().invoke(main, ["methods", "--json"])
    assert result.exit_code == 0, result.output
    listed = {row["name"]: set(row["scenarios"]) for row in json.loads(result.output)}
    assert listed["running_mean"] == {"cil", "dil"}
    assert listed["lwf"] == listed["replay"] == {"cil", "dil", "til"} and listed["gmm"] == {"cil", "dil", "dcil"}
    params = resolve_method_params(MethodConfig(name="running_mean", momentum=0.0))
    assert params.momentum == 0.0
    with pytest.raises(ConfigError, match=r"method\.momentum: Input should be a valid number"):
        resolve_method_params(MethodConfig(name="running_mean", momentum="fast"))
    from pipeline.backbones import create_backbone

    backbone = create_backbone(BackboneConfig(**TINY_VIT))
    method = create_method(params, backbone)
    method.begin_task(TaskInfo(index=0, id="a", classes=(0, 1), num_seen_classes=2, class_names=("0", "1")))
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 0, 1, 1])
    method.training_step({"image": images, "label": labels})
    features = backbone.features(images)
    assert torch.equal(method.end_task().tensors["means"], torch.stack([features[:2].mean(0), features[2:].mean(0)]))


def test_a_bad_entry_point_is_one_line_naming_it(plugins, tmp_path):
    install(tmp_path, "broken = strata_plugin_example:MeanConfig")
    plugins.syspath_prepend(str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"^entry point broken = strata_plugin_example:MeanConfig \(strata\.methods\): not a subclass of"
    ):
        method_class("broken")
    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 2 and "entry point broken" in result.output
