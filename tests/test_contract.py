"""The contract every library method keeps, in process and without Ray, on the stream's own
plan and decoded rows: two tasks through ``train_phase`` (a joint method: one phase over both),
each record written to a memory store and read back equal in every tensor and meta field, and a
fresh instance restored from the store scoring exactly as the trained one. A task-incremental
method's answers for task 0, given its id, do not change when task 1 is learned; one that infers
tasks infers them for every sample. Its task statistics are JSON. (The task in progress restores exactly too:
``test_checkpoint.test_every_methods_task_state_restores_the_task_in_progress``.)"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from pipeline.backbones import create_backbone
from pipeline.config import BackboneConfig
from pipeline.eval.evaluate import reduce_eval_stats
from pipeline.memory import MemoryStore
from pipeline.methods import Method, available_methods, method_class
from pipeline.train.loop import StepSettings, train_phase
from pipeline.train.progress import make_phases
from pipeline.train.worker import phase_task_info

from conftest import TINY_VIT, new_method, task_batches, two_task_plan
from test_checkpoint import STATE_CASES

BACKBONES = {
    "vit": lambda: create_backbone(BackboneConfig(**TINY_VIT)),
    "convnext": lambda: create_backbone(BackboneConfig(name="timm:test_convnext")),
    "clip": lambda: create_backbone(BackboneConfig(name="open_clip:strata-tiny-clip")),
    "coca": lambda: create_backbone(BackboneConfig(name="open_clip:strata-tiny-coca")),
}
IMAGE_SIZE = {"vit": 16, "convnext": 32, "clip": 32, "coca": 32}
CASES: dict[str, tuple[dict[str, Any], str]] = {
    **STATE_CASES,
    "joint": ({}, "vit"),
    "replay": ({"memory_size": 8}, "vit"),
    "zeroshot": ({}, "clip"),
    "gmm_zeroshot": ({}, "coca"),
    "rkr@convnext": ({"task_inference": True}, "convnext"),  # residuals on convolutions as well as linears
    "gmm@exemplars": ({"lora_rank": 2, "memory_size": 8}, "coca"),  # the exemplar memory as a part of the method
}
LIBRARY = sorted(name for name, cls in available_methods().items() if cls.__module__.startswith("pipeline."))


def test_every_library_method_has_a_contract_case():
    assert {case.split("@")[0] for case in CASES} == set(LIBRARY)


def make(name: str, params: dict[str, Any], backbone) -> Method:
    return new_method(name, backbone, **params)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_method_learns_two_tasks_and_its_store_restores_it_exactly(case, tmp_path):
    name = case.split("@")[0]
    params, kind = CASES[case]
    backbone = BACKBONES[kind]()
    cls = method_class(name)
    task_aware = "cil" not in cls.scenarios  # the task-incremental methods: scored within a task, given its id
    plan = two_task_plan()
    data = {t.index: task_batches(t, backbone, 8, IMAGE_SIZE[kind]) for t in plan.tasks}
    probe = data[0][0]  # task 0's first rows, scored after every phase
    task_ids = probe["task"] if task_aware else None
    store = MemoryStore(str(tmp_path / "memory"))
    method = make(name, params, backbone)

    def scores(m: Method) -> torch.Tensor:
        candidates = list(plan.tasks[0].classes) if task_aware else list(range(m.task.num_seen_classes))
        with torch.no_grad():
            return m.score(probe["image"], candidates, [plan.class_names[c] for c in candidates], task_ids)

    after = []
    for phase in make_phases(len(plan.tasks), cls.trains_jointly):
        info = phase_task_info(plan, phase)
        method.begin_task(info)
        batches = [b for i in phase.tasks for b in data[i]]
        settings = StepSettings(num_tasks=len(plan.tasks), num_samples=sum(len(b["label"]) for b in batches), global_batch_size=8)
        stats = train_phase(method, lambda batches=batches: iter(batches), settings)
        assert stats.samples_per_task == [sum(len(b["label"]) for b in data[i]) if i in phase.tasks else 0 for i in range(2)]
        record = method.end_task()
        task_stats = json.loads(json.dumps(method.task_stats()))  # JSON as the summary and MLflow take it
        if "masked_off" in task_stats:  # the share of weights a mask method switched off for this task
            assert 0.0 <= task_stats["masked_off"] <= 1.0
        entry = store.append(record, task_index=phase.row, task_id=info.id, method=name, backbone_id=backbone.backbone_id)
        loaded = store.load(entry, backbone_id=backbone.backbone_id)
        assert set(loaded.tensors) == set(record.tensors) and loaded.meta == record.meta
        assert all(torch.equal(loaded.tensors[k], record.tensors[k].cpu()) for k in record.tensors)
        after.append(scores(method))
        stats = reduce_eval_stats(method)  # raises for a stat eval_stat_names does not declare
        assert set(stats) == set(method.eval_stat_names)

    fresh = make(name, params, BACKBONES[kind]() if name == "gmm" else backbone)  # LoRA edits its backbone in place
    fresh.restore(store.load_all(backbone_id=backbone.backbone_id))
    fresh.task = method.task
    assert torch.equal(scores(fresh), after[-1])
    if task_aware:
        assert torch.equal(after[0], after[-1])  # task 0's answers, given its id, are untouched by task 1
    if method.infers_tasks:
        inferred = fresh.infer_tasks(probe["image"])
        assert torch.equal(inferred, method.infer_tasks(probe["image"])) and set(inferred.tolist()) <= {0, 1}
