"""RanPAC and SLDA: the model after a stream is the joint closed-form fit on every row seen, on one
worker or two, and a record rebuilds it exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline.backbones import create_backbone
from pipeline.config import BackboneConfig, MethodConfig
from pipeline.data.stream import sample_hash
from pipeline.methods import TaskInfo, create_method, resolve_method_params
from pipeline.methods.ranpac import RIDGES
from pipeline.train.collective import TorchCollective
from pipeline.train.loop import StepSettings, train_phase

from conftest import TINY_VIT, new_method

PARAMS = {"ranpac": {"projection_dim": 48, "validation_share": 0.3}, "slda": {}}
NAMES = ("a", "b", "c", "d", "e", "f")


def stream() -> list[list[dict[str, torch.Tensor]]]:
    """Three 2-class tasks, 30 rows each in batches of 6: images shifted per class."""
    g = torch.Generator().manual_seed(0)
    tasks = []
    for t in range(3):
        labels = torch.arange(30) % 2 + 2 * t
        images = torch.randn(30, 3, 16, 16, generator=g) + 0.5 * labels.view(-1, 1, 1, 1)
        ids = torch.arange(30) * 7  # sample ids need not be consecutive
        tasks.append([{"image": images[i : i + 6], "label": labels[i : i + 6], "task": torch.full((6,), t), "sample_id": ids[i : i + 6]}
                      for i in range(0, 30, 6)])  # fmt: skip
    return tasks


BACKBONE = create_backbone(BackboneConfig(**TINY_VIT))


def make(name: str, collective=None):
    return new_method(name, BACKBONE, collective, seed=None, **PARAMS[name])


def run(method, tasks, rank: int = 0, world: int = 1):
    records = []
    for t, batches in enumerate(tasks):
        method.begin_task(TaskInfo(t, f"t{t}", (2 * t, 2 * t + 1), 2 * t + 2, NAMES[: 2 * t + 2]))
        for batch in batches[rank::world]:
            method.training_step(batch)
        records.append(method.end_task())
    return records


def test_ranpac_after_three_tasks_is_the_joint_ridge_fit_with_the_held_back_choice():
    method = make("ranpac")
    tasks = stream()
    records = run(method, tasks)
    rows = [(b, t) for t, batches in enumerate(tasks) for b in batches]
    h = torch.cat([torch.relu(BACKBONE.features(b["image"]).double() @ method.projection) for b, _ in rows])
    y = F.one_hot(torch.cat([b["label"] for b, _ in rows]), 6).double()
    held = torch.cat([torch.from_numpy(sample_hash(b["sample_id"].numpy(), t) < 0.3) for b, t in rows])
    assert 0 < int(held.sum()) < len(held)
    eye = torch.eye(48, dtype=torch.float64)
    fit, val = ~held, held
    errors = []
    for ridge in RIDGES:
        w = torch.linalg.solve(h[fit].T @ h[fit] + ridge * eye, h[fit].T @ y[fit])
        errors.append(float(((h[val] @ w - y[val]) ** 2).sum()))
    ridge = RIDGES[int(np.argmin(errors))]
    assert records[-1].meta["ridge"] == ridge
    joint = torch.linalg.solve(h.T @ h + ridge * eye, h.T @ y)
    torch.testing.assert_close(method.weight, joint, rtol=1e-7, atol=1e-9)
    x = tasks[0][0]["image"]
    fresh = make("ranpac")
    fresh.restore(records)
    assert torch.equal(fresh.predict(x), method.predict(x))
    m = 48
    assert records[0].nbytes == 8 * (2 * m * (m + 1) // 2 + 2 * m * 2 + 1)  # G, G_val (upper), C, C_val (M x 2 classes), n_val


def test_slda_is_the_lda_rule_on_the_running_statistics():
    method = make("slda")
    tasks = stream()
    records = run(method, tasks)
    x = torch.cat([BACKBONE.features(b["image"]).double() for batches in tasks for b in batches])
    labels = torch.cat([b["label"] for batches in tasks for b in batches])
    means = torch.stack([x[labels == c].mean(0) for c in range(6)])
    centred = x - means[labels]
    sigma = centred.T @ centred / len(x)
    shrunk = (1 - 1e-4) * sigma + 1e-4 * torch.eye(x.shape[1], dtype=torch.float64)
    precision = torch.linalg.inv(shrunk)
    expected = x @ precision @ means.T - 0.5 * ((means @ precision) * means).sum(1)
    images = torch.cat([b["image"] for batches in tasks for b in batches])
    torch.testing.assert_close(method.predict(images).double(), expected, rtol=1e-4, atol=1e-3)  # float32 logits
    fresh = make("slda")
    fresh.restore(records[:1])  # after the first task: two classes, the rest -inf
    logits = fresh.predict(images[:4])
    assert torch.isinf(logits[:, 2:]).all() and torch.isfinite(logits[:, :2]).all()
    d = x.shape[1]
    assert [r.nbytes for r in records] == [8 * (k * d + k + d * (d + 1) // 2) for k in (2, 4, 6)]


def _worker(rank: int, init_file: str, out: str, name: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    record = run(make(name, TorchCollective()), stream(), rank, 2)[-1]
    if rank == 0:
        save_file({k: v.contiguous() for k, v in record.tensors.items()}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["ranpac", "slda"])
def test_two_workers_give_the_one_worker_model(tmp_path, name):
    mp.start_processes(
        _worker, args=(str(tmp_path / "init"), str(tmp_path / "two.safetensors"), name), nprocs=2, start_method="spawn"
    )
    two = load_file(tmp_path / "two.safetensors")
    one = run(make(name), stream())[-1].tensors
    assert set(two) == set(one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-12, atol=1e-12)  # float64 sums in another order


def test_ssf_at_its_init_reproduces_the_frozen_backbone_exactly():
    backbone = create_backbone(BackboneConfig(**TINY_VIT))
    x = stream()[0][0]["image"]
    frozen = backbone.features(x)
    hooks = backbone.weight_hooks()
    for hook in hooks.values():
        out = hook.inner.weight.shape[0]
        hook.scale, hook.shift = (torch.ones(out),), (torch.zeros(out),)
    with backbone.routing(0):
        assert torch.equal(backbone.features(x), frozen)
    hook = next(iter(hooks.values()))
    hook.shift = (torch.full_like(hook.shift[0], 0.5),)
    with backbone.routing(0):
        assert not torch.equal(backbone.features(x), frozen)


def test_ranpac_first_task_adaptation_trains_ssf_then_reads_task_one_through_it(tmp_path):
    """Task 1: ``train.passes`` gradient passes on SSF and a head, then one statistics pass through
    the final adapter (no optimizer step in it); task 2: one statistics pass, nothing trains."""
    backbone = create_backbone(BackboneConfig(**TINY_VIT))
    cfg = MethodConfig(name="ranpac", projection_dim=48, validation_share=0.3, first_task_adaptation=True, lr=0.05)
    method = create_method(resolve_method_params(cfg), backbone)
    tasks = stream()
    records = []
    for t, batches in enumerate(tasks[:2]):
        method.begin_task(TaskInfo(t, f"t{t}", (2 * t, 2 * t + 1), 2 * t + 2, NAMES[: 2 * t + 2]))
        stats = train_phase(
            method, lambda batches=batches: batches, StepSettings(num_tasks=2, num_samples=30, global_batch_size=6, passes=2)
        )
        if t == 0:
            assert method.pass_plan(2) == (True, True, False)
            assert stats.steps == 10 and stats.samples_per_task == [90, 0]  # 2 x 5 optimizer steps; 3 passes read
            adapted = {name: p.detach().clone() for name, p in method.adapter.items()}
            assert any(not torch.equal(p, torch.zeros_like(p)) for name, p in adapted.items() if name.startswith("shift."))
            with backbone.routing(0), torch.no_grad():
                h = torch.cat([torch.relu(backbone.features(b["image"]).double() @ method.projection) for b in batches])
            torch.testing.assert_close(method._task["sum.gram"], h.T @ h, rtol=1e-10, atol=1e-8)
        else:
            assert method.pass_plan(2) == (False,) and method.trainable_parameters() == []
            assert stats.samples_per_task == [0, 30]
        records.append(method.end_task())
    for name, p in method.adapter.items():
        assert torch.equal(p, adapted[name])  # frozen after task 1
        assert torch.equal(records[1].tensors[f"adapter.{name}"], adapted[name])
    x = tasks[1][0]["image"]
    fresh = create_method(resolve_method_params(cfg), create_backbone(BackboneConfig(**TINY_VIT)))
    fresh.restore(records[1:])  # the last record alone rebuilds the model
    assert torch.equal(fresh.predict(x), method.predict(x))
    save_file(records[1].tensors, tmp_path / "record.safetensors")  # and comes back from disk tensor for tensor
    loaded = load_file(tmp_path / "record.safetensors")
    assert set(loaded) == set(records[1].tensors) and all(torch.equal(loaded[k], v) for k, v in records[1].tensors.items())
    assert not torch.equal(make("ranpac").predict(x), method.predict(x))
