"""Checkpoints inside a task: a phase stopped after k steps and resumed from its saved state ends
exactly where the uninterrupted phase ends (optimizer, schedule, partial sums, consumed rows)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from pipeline.config import MethodConfig
from pipeline.methods import TaskInfo, create_method, resolve_method_params
from pipeline.train.checkpoint import PhaseState
from pipeline.train.collective import TorchCollective
from pipeline.train.loop import CheckpointPolicy, StepSettings, train_phase

from conftest import new_method
from test_methods import flat_backbone

INFO = TaskInfo(index=0, id="t", classes=(0, 1, 2), num_seen_classes=3, class_names=("0", "1", "2"))
ROWS = 40  # sample ids 0..39 of the source; the batches below hold some of them


def batches(ids: list[int], size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(ROWS, 1, 2, 2, generator=g)
    y = torch.randint(0, 3, (ROWS,), generator=g)
    out = []
    for start in range(0, len(ids), size):
        idx = torch.tensor(ids[start : start + size])
        out.append({"image": x[idx], "label": y[idx], "task": torch.zeros(len(idx), dtype=torch.long), "sample_id": idx})
    return out


def make_method(name: str, collective=None, **params):
    method = new_method(name, flat_backbone(), collective, **params)
    method.begin_task(INFO)
    return method


def run_phase(method, data, *, saved: list[PhaseState] | None = None, resume: PhaseState | None = None, every: int = 0):
    policy = (
        CheckpointPolicy(lambda state: saved.append(state), every_steps=every, source_rows={0: ROWS})
        if saved is not None
        else None
    )
    settings = StepSettings(
        num_tasks=1, num_samples=sum(len(b["label"]) for b in data) + (sum(resume.samples) if resume else 0), global_batch_size=4
    )
    return train_phase(method, lambda: data, settings, checkpoints=policy, resume=resume)


def roundtrip(state: PhaseState, tmp_path: Path) -> PhaseState:
    state.write(tmp_path)
    read = PhaseState.read(tmp_path)
    assert read is not None
    return read


def test_adam_with_cosine_resumed_mid_phase_is_bitwise_the_uninterrupted_phase(tmp_path):
    ids = list(range(0, 36, 2)) + [37, 39]  # a subsample, as `every` makes: 20 rows, 5 steps of 4
    data = batches(ids, 4)
    params = {"lr": 0.05, "optimizer": "adam", "schedule": "cosine", "min_lr": 1e-3}
    whole = make_method("finetune", **params)
    run_phase(whole, data)

    saved: list[PhaseState] = []
    first = make_method("finetune", **params)
    run_phase(first, data, saved=saved, every=2)
    assert [s.steps for s in saved] == [2, 4]
    state = roundtrip(saved[1], tmp_path)  # a restart after step 4: batches 0-3 are in the checkpoint
    assert state.samples == [16] and state.consumed[0].nonzero().flatten().tolist() == ids[:16]

    resumed = make_method("finetune", **params)
    stats = run_phase(resumed, data[4:], resume=state)
    assert stats.steps == 5 and stats.samples_per_task == [20]
    assert torch.equal(resumed.head.weight, whole.head.weight) and torch.equal(resumed.head.bias, whole.head.bias)


def test_a_fresh_phase_with_checkpoints_trains_exactly_like_one_without():
    data = batches(list(range(12)), 4)
    plain, checked = make_method("finetune", lr=0.1), make_method("finetune", lr=0.1)
    run_phase(plain, data)
    run_phase(checked, data, saved=[], every=1)
    assert torch.equal(plain.head.weight, checked.head.weight)


SHARDS = {0: list(range(0, 24, 2)), 1: list(range(1, 17, 2))}  # uneven: 12 and 8 rows


def ncm_worker(rank: int, init_file: str, out: str, phase: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    method = make_method("ncm", TorchCollective())
    data = batches(SHARDS[rank], 2, seed=3)
    if phase == "first":  # uninterrupted, checkpointing as it goes (which changes nothing, tested above)
        saved: list[PhaseState] = []
        run_phase(method, data, saved=saved, every=3)
        if rank == 0:
            saved[0].write(Path(out))  # after 3 lockstep steps: 6 rows of each rank
    else:
        state = PhaseState.read(Path(out))
        assert state is not None
        run_phase(method, data[3:], resume=state)  # each rank's unconsumed rows
    record = method.end_task()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in record.tensors.items()}, f"{out}/{phase}.safetensors")
    dist.destroy_process_group()


def test_partial_sums_on_two_ranks_are_summed_once_across_a_resume(tmp_path):
    for phase in ("first", "resumed"):
        mp.start_processes(
            ncm_worker, args=(str(tmp_path / f"init-{phase}"), str(tmp_path), phase), nprocs=2, start_method="spawn"
        )
    state = PhaseState.read(tmp_path)
    assert state is not None and state.samples == [12]
    assert sorted(state.consumed[0].nonzero().flatten().tolist()) == sorted(SHARDS[0][:6] + SHARDS[1][:6])
    assert int(state.method["sum.counts"].sum()) == 12  # summed over both ranks
    whole, resumed = load_file(tmp_path / "first.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert torch.equal(whole["counts"], resumed["counts"]) and int(whole["counts"].sum()) == 20
    torch.testing.assert_close(whole["means"], resumed["means"], rtol=0, atol=1e-6)  # float64 sums in another order


STATE_CASES = {
    "ncm": ({}, "vit"),
    "finetune": ({}, "vit"),
    "lwf": ({}, "vit"),
    "l2p": ({"pool_size": 4, "top_n": 2, "prompt_length": 2}, "vit"),
    "probe": ({"task_inference": True}, "vit"),
    "ranpac": ({"projection_dim": 32, "validation_share": 0.5}, "vit"),
    "slda": ({}, "vit"),
    "piggyback": ({"task_inference": True}, "vit"),
    "rkr": ({"task_inference": True}, "vit"),
    "mask_rkr": ({"task_inference": True}, "vit"),
    "meat": ({"task_inference": True}, "vit"),
    "diki": ({"image_layers": [0, 1], "text_layers": [0, 1], "residual_length": 2}, "clip"),
    "gmm": ({"lora_rank": 2}, "coca"),
}


@pytest.mark.parametrize("name", list(STATE_CASES))
def test_every_methods_task_state_restores_the_task_in_progress(name):
    """After a few steps, a fresh instance given the task state continues identically: the same
    state, the same next loss, the same record."""
    from pipeline.backbones import create_backbone
    from pipeline.config import BackboneConfig

    from conftest import TINY_VIT
    from test_diki import clip_backbone

    params, kind = STATE_CASES[name]
    backbones = {"clip": clip_backbone, "coca": lambda: create_backbone(BackboneConfig(name="open_clip:strata-tiny-coca")),
                 "vit": lambda: create_backbone(BackboneConfig(**TINY_VIT))}  # fmt: skip
    size = 16 if kind == "vit" else 32
    info = TaskInfo(index=0, id="t", classes=(0, 1, 2), num_seen_classes=3, class_names=("cat", "dog", "emu"))
    g = torch.Generator().manual_seed(1)
    data = [{"image": torch.randn(4, 3, size, size, generator=g), "label": torch.tensor([0, 1, 2, 0]), "task": torch.zeros(4, dtype=torch.long),
             "sample_id": torch.arange(4) + 4 * i} for i in range(3)]  # fmt: skip

    def fresh():
        torch.manual_seed(0)
        m = create_method(resolve_method_params(MethodConfig(name=name, **params)), backbones[kind]())  # LoRA edits its backbone
        m.begin_task(info)
        return m

    first = fresh()
    train_phase(first, lambda: data[:2], StepSettings(num_tasks=1, num_samples=12, global_batch_size=4))
    state = first.task_state()
    second = fresh()
    second.load_task_state(state)
    again = second.task_state()
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)
    if first.trainable_parameters():
        torch.manual_seed(5)
        loss_first = first.training_step(data[2])
        torch.manual_seed(5)
        loss_second = second.training_step(data[2])
        assert torch.equal(loss_first, loss_second)
    else:
        first.training_step(data[2]), second.training_step(data[2])
    one, two = first.end_task(), second.end_task()
    assert set(one.tensors) == set(two.tensors) and all(torch.equal(one.tensors[k], two.tensors[k]) for k in one.tensors)
