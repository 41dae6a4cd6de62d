"""Replay: herding by hand, the same exemplars on every rank as in one process, exemplars are the
training rows' original bytes (never a validation or test row) and counted in the record, the
memory shrinks per group as classes arrive, replayed rows join every batch, NME, task state."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline.backbones import create_backbone
from pipeline.config import BackboneConfig
from pipeline.data.ray_data import decode_image
from pipeline.data.sources import read_chunks
from pipeline.data.stream import StreamPlan, TaskPlan, task_rows
from pipeline.memory import MemoryStore
from pipeline.methods import Batch
from pipeline.methods.exemplars import herding
from pipeline.train.collective import TorchCollective
from pipeline.train.worker import phase_task_info
from pipeline.train.progress import Phase

from conftest import TINY_VIT, new_method, task_batches, two_task_plan

BACKBONE = create_backbone(BackboneConfig(**TINY_VIT))


def plan(holdout: float = 0.0) -> StreamPlan:
    return two_task_plan(holdout)


def batches(task: TaskPlan, size: int = 8) -> list[Batch]:
    return task_batches(task, BACKBONE, size)


def make(collective=None, **params):
    return new_method("replay", BACKBONE, collective, **params)


def learn(method, data: list[Batch]) -> None:
    optimizer, _ = method.build_optimizer(len(data), 8)
    for batch in data:
        method.training_step(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_herding_picks_the_running_mean_closest_to_the_class_mean():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    mean = torch.tensor([0.5, 0.5])
    # k=1: distances 0.5, 0.5, 0.1 -> c; k=2: (c+a)/2 = (0.8, 0.4) at 0.1 beats (c+b)/2 = (0.3, 0.9) at 0.2 -> a; then b.
    assert herding(features, mean, 3) == [2, 0, 1]
    assert herding(features, mean, 1) == [2]
    assert herding(features, mean, 10) == [2, 0, 1]


def test_exemplars_are_training_rows_original_bytes_counted_and_shrink_per_group(tmp_path):
    stream = plan(holdout=0.25)
    method = make(memory_size=12, herding_pool=2.0)
    store = MemoryStore(str(tmp_path / "memory"))
    records = []
    for index, task in enumerate(stream.tasks):
        method.begin_task(phase_task_info(stream, Phase(row=index, tasks=(index,))))
        learn(method, batches(task))
        record = method.end_task()
        entry = store.append(record, task_index=index, task_id=task.id, method="replay", backbone_id=BACKBONE.backbone_id)
        records.append(record)
        t = record.tensors
        ids = t["exemplars.sample_ids"].numpy()
        # 12 // 2 groups = 6 per class after the first task; the second stores 12 // 4 = 3 per new class.
        assert np.bincount(t["exemplars.labels"].numpy()).tolist() == ([6, 6] if index == 0 else [0, 0, 3, 3])
        fit_ids, fit_labels = task_rows(task)
        assert set(ids) <= set(fit_ids.tolist())
        assert np.array_equal(fit_labels[np.searchsorted(fit_ids, ids)], t["exemplars.labels"].numpy())
        validation = task.validation
        assert validation is not None and validation.rows.mask(ids).sum() == 0
        # Exactly the source's encoded bytes, and none is a validation or test row's image.
        data, offsets = t["exemplars.data"].numpy().tobytes(), t["exemplars.offsets"].tolist()
        stored = [data[offsets[i] : offsets[i + 1]] for i in range(len(ids))]
        by_id = {
            int(i): img
            for rows in read_chunks(task.train.chunks)
            for i, img in zip(rows.sample_ids, rows.images.to_pylist(), strict=True)
        }
        assert stored == [by_id[int(i)] for i in ids]
        held_out = {img for i, img in by_id.items() if validation.rows.mask(np.array([i]))[0]}
        assert task.test is not None
        test_images = {img for rows in read_chunks(task.test.chunks) for img in rows.images.to_pylist()}
        assert not (set(stored) & (held_out | test_images))
        assert (
            entry.memory_bytes
            == record.nbytes
            == len(data) + 8 * (len(ids) + 1) + 16 * len(ids) + 4 * t["head.weight"].numel() + 4 * t["head.bias"].numel()
        )
    # Live: 12 // 4 groups = 3 per group, each group's herding prefix; a restore rebuilds exactly that.
    live = method.exemplars.live()
    assert [label for label, _, _ in live] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    first_ids = records[0].tensors["exemplars.sample_ids"][records[0].tensors["exemplars.labels"] == 0][:3].tolist()
    assert [sid for label, _, sid in live if label == 0] == first_ids
    restored = make(memory_size=12, herding_pool=2.0)
    restored.restore(store.load_all(backbone_id=BACKBONE.backbone_id))
    assert restored.exemplars.live() == live


def test_replayed_exemplars_join_every_batch_and_nme_uses_their_means():
    stream = plan()
    method = make(memory_size=8, classifier="nme")
    method.begin_task(phase_task_info(stream, Phase(row=0, tasks=(0,))))
    learn(method, batches(stream.tasks[0]))
    method.end_task()
    method.begin_task(phase_task_info(stream, Phase(row=1, tasks=(1,))))
    batch = batches(stream.tasks[1])[0]
    images = torch.from_numpy(np.stack([decode_image(img, 16, "x") for _, img, _ in method.exemplars.live()]))
    mem_features = BACKBONE.features(BACKBONE.normalize(images))
    mem_labels = torch.tensor([label for label, _, _ in method.exemplars.live()])
    assert len(mem_labels) == 8 and torch.equal(method.memory_features(16)[0], mem_features)
    # As many exemplars as the memory holds (8 per batch of 8) draws all of it: the loss is over batch + memory.
    method = make(memory_size=8, classifier="nme", replay_ratio=1.0)
    method.restore([]), method.begin_task(phase_task_info(stream, Phase(row=0, tasks=(0,))))
    learn(method, batches(stream.tasks[0]))
    method.end_task()
    method.begin_task(phase_task_info(stream, Phase(row=1, tasks=(1,))))
    expected = F.cross_entropy(
        method.head(torch.cat([BACKBONE.features(batch["image"]), mem_features])), torch.cat([batch["label"], mem_labels])
    )
    torch.testing.assert_close(method.training_step(batch), expected, rtol=0, atol=1e-6)
    # NME: cosine to the mean of each class's normalised exemplar features; unseen classes -inf.
    x = batch["image"][:3]
    means = torch.stack([F.normalize(mem_features[mem_labels == c], dim=1).mean(0) for c in (0, 1)])
    logits = method.predict(x)
    torch.testing.assert_close(
        logits[:, :2], F.normalize(BACKBONE.features(x), dim=1) @ F.normalize(means, dim=1).T, rtol=0, atol=1e-5
    )
    assert torch.isinf(logits[:, 2:]).all()


def test_icarl_loss_distils_the_previous_heads_sigmoids_on_earlier_classes_only():
    stream = plan()
    method = make(memory_size=8, distill=True)
    method.begin_task(phase_task_info(stream, Phase(row=0, tasks=(0,))))
    first = batches(stream.tasks[0])
    features = BACKBONE.features(first[0]["image"])
    # First task: nothing earlier, so the targets are the one-hot labels.
    expected = F.binary_cross_entropy_with_logits(
        method.head(features), F.one_hot(first[0]["label"], method.head.num_classes).float()
    )
    torch.testing.assert_close(method.training_step(first[0]), expected, rtol=0, atol=1e-6)
    learn(method, first)
    record = method.end_task()
    task = phase_task_info(stream, Phase(row=1, tasks=(1,)))
    method.begin_task(task)
    batch = batches(stream.tasks[1])[0]
    mem_features, mem_labels = method.memory_features(16)
    x = torch.cat([BACKBONE.features(batch["image"]), mem_features])
    labels = torch.cat([batch["label"], mem_labels])
    old = record.tensors["head.weight"].shape[0]
    assert old == 2 and set(task.classes) == {2, 3}
    targets = F.one_hot(labels, method.head.num_classes).float()
    targets[:, :old] = torch.sigmoid(F.linear(x, record.tensors["head.weight"], record.tensors["head.bias"]))
    assert not torch.equal(
        targets[:, :old], F.one_hot(labels, 4).float()[:, :old]
    )  # the exemplars' own labels are not the targets
    expected = F.binary_cross_entropy_with_logits(method.head(x), targets)
    torch.testing.assert_close(method.training_step(batch), expected, rtol=0, atol=1e-6)
    restarted = make(memory_size=8, distill=True)  # the previous model comes back from the record alone
    restarted.restore([record])
    restarted.begin_task(task)
    expected = F.binary_cross_entropy_with_logits(restarted.head(x), targets)  # its new rows have their own init
    torch.testing.assert_close(restarted.training_step(batch), expected, rtol=0, atol=1e-6)


def test_a_task_resumed_from_its_task_state_selects_the_same_exemplars():
    stream = plan()
    info = phase_task_info(stream, Phase(row=0, tasks=(0,)))
    data = batches(stream.tasks[0])
    whole = make(memory_size=10)
    whole.begin_task(info)
    learn(whole, data)
    one = whole.end_task()
    first = make(memory_size=10)
    first.begin_task(info)
    learn(first, data[:3])
    second = make(memory_size=10)
    second.begin_task(info)
    second.load_task_state(first.task_state())
    with torch.no_grad():  # the selection depends on the frozen features alone, not the head
        for batch in data[3:]:
            second.training_step(batch)
    two = second.end_task()
    for key in ("exemplars.sample_ids", "exemplars.labels", "exemplars.data", "exemplars.offsets"):
        assert torch.equal(one.tensors[key], two.tensors[key])


def rank_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    stream = plan()
    data = batches(stream.tasks[0], size=5)
    method = make(TorchCollective(), memory_size=10)
    method.begin_task(phase_task_info(stream, Phase(row=0, tasks=(0,))))
    with torch.no_grad():
        for batch in data[:3] if rank == 0 else data[3:]:  # uneven shares: 15 rows and the rest
            method.training_step(batch)
    record = method.end_task()
    save_file({k: v for k, v in record.tensors.items() if k.startswith("exemplars.")}, f"{out}/rank{rank}.safetensors")
    dist.destroy_process_group()


def test_two_ranks_herd_the_same_exemplars_as_one_process(tmp_path):
    mp.start_processes(rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    stream = plan()
    single = make(memory_size=10)
    single.begin_task(phase_task_info(stream, Phase(row=0, tasks=(0,))))
    with torch.no_grad():
        for batch in batches(stream.tasks[0], size=5)[::-1]:  # another order, too
            single.training_step(batch)
    expected = single.end_task().tensors
    assert int(expected["exemplars.labels"].numel()) == 10
    for result in ranks:
        assert set(result) == {"exemplars.data", "exemplars.offsets", "exemplars.labels", "exemplars.sample_ids"}
        for key, tensor in result.items():
            assert torch.equal(tensor, expected[key]), key


def test_replay_through_ray_on_two_workers_stores_the_configured_memory(ray_session, tmp_path):
    import json

    import yaml
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.config import StreamConfig
    from pipeline.data.stream import resolve_stream

    from conftest import blobs_task, run_config

    tasks = [blobs_task("r0", rows=64, subset=[0, 1]), blobs_task("r1", rows=64, subset=[2, 3])]
    config = run_config(tmp_path, tasks, data={"rows_per_chunk": 16}, tracking={"enabled": False})
    config["method"] = {"name": "replay", "memory_size": 12}
    config["train"]["batch_size"] = 8
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "stream.yaml")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["samples_seen"] == [32, 32] and all(steps >= 2 for steps in summary["steps"])
    assert [stats["exemplars_stored"] for stats in summary["task_stats"]] == [12, 6]
    assert [stats["exemplars_live"] for stats in summary["task_stats"]] == [12, 12]
    store = MemoryStore(summary["memory_store"])
    assert summary["memory_bytes"] == [entry.memory_bytes for entry in store.entries()]
    stream = resolve_stream(StreamConfig(**config["stream"]), rows_per_chunk=16)
    for record, task in zip(store.load_all(backbone_id=BACKBONE.backbone_id), stream.tasks, strict=True):
        ids, labels = task_rows(task)
        stored = record.tensors["exemplars.sample_ids"].numpy()
        assert np.array_equal(labels[np.searchsorted(ids, stored)], record.tensors["exemplars.labels"].numpy())
