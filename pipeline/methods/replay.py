"""Replay, iCaRL-style (Rebuffi et al., CVPR 2017): a fixed budget of stored images, chosen by herding.

The model is finetune's head over every seen class on the frozen backbone, trained on each
batch of the current task mixed with ``replay_ratio`` times as many exemplars drawn from the
memory (cross-entropy over the union); ``classifier: nme`` predicts instead with iCaRL's nearest mean of exemplars.

Memory. At most ``memory_size`` images in all, as the original encoded bytes. Exemplars are
grouped by (task, class) -- a class of a domain-incremental stream keeps exemplars of every
domain -- and each group keeps the first ``memory_size // groups`` images of its herding order,
so shrinking the memory for new classes drops each group's tail and never needs an image back.
A task's record holds its new groups (bytes, offsets, labels, sample ids, in herding order) and
the head; ``restore`` rebuilds the same memory from the records, on every rank and after a restart.

Herding in one pass (a departure: iCaRL herds over every image of a class, which one pass over a
stream cannot hold). Candidates are a class's rows whose ``sample_hash(id, seed)`` falls below
``herding_pool x quota / rows of the class``: about ``herding_pool`` candidates per exemplar slot,
fixed by the sample ids alone. Each candidate's frozen feature lands in its own slot of a ``sum.``
buffer (one rank sees each row, the others hold zeros), beside the class sums of every row; at the
end of the task these are all-reduced, so every rank herds -- towards the mean of all the class's
rows -- over the same tensors and selects the same exemplars, whatever the split of the data.
Their bytes are then read back from the task's training source (never a test or validation row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from pipeline.data.ray_data import decode_image
from pipeline.data.stream import read_encoded, sample_hash, task_rows
from pipeline.memory import TaskRecord
from pipeline.methods.base import Batch, TaskInfo, register_method
from pipeline.methods.finetune import Finetune, FinetuneConfig


class ReplayConfig(FinetuneConfig):
    memory_size: int = Field(default=2000, ge=1, description="stored images in all (iCaRL's K)")
    replay_ratio: float = Field(default=1.0, gt=0, description="exemplars mixed into each batch, per sample of the batch")
    classifier: Literal["head", "nme"] = "head"
    herding_pool: float = Field(default=10.0, ge=1, description="herding candidates per exemplar slot")
    seed: int = 0


@dataclass(frozen=True)
class Group:
    """One (task, class)'s exemplars, in herding order."""

    label: int
    images: tuple[bytes, ...]
    sample_ids: tuple[int, ...]


def herding(features: torch.Tensor, mean: torch.Tensor, m: int) -> list[int]:
    """iCaRL's herding: indices of ``features`` (L2-normalised rows) whose running mean stays
    closest to ``mean``, picked one at a time, ``min(m, len(features))`` of them."""
    chosen: list[int] = []
    total = torch.zeros_like(mean)
    free = torch.ones(len(features), dtype=torch.bool)
    for k in range(1, min(m, len(features)) + 1):
        distance = ((mean - (total + features) / k) ** 2).sum(dim=1).masked_fill(~free, float("inf"))
        i = int(torch.argmin(distance))
        chosen.append(i)
        free[i] = False
        total = total + features[i]
    return chosen


def _pack(groups: Sequence[Group]) -> dict[str, torch.Tensor]:
    images = [img for g in groups for img in g.images]
    offsets = np.cumsum([0, *(len(img) for img in images)])
    return {
        "exemplars.data": torch.frombuffer(bytearray(b"".join(images)), dtype=torch.uint8) if images else torch.zeros(0, dtype=torch.uint8),
        "exemplars.offsets": torch.from_numpy(offsets.astype(np.int64)),
        "exemplars.labels": torch.tensor([g.label for g in groups for _ in g.images], dtype=torch.int64),
        "exemplars.sample_ids": torch.tensor([i for g in groups for i in g.sample_ids], dtype=torch.int64),
    }


def _unpack(tensors: dict[str, torch.Tensor]) -> list[Group]:
    data, offsets = tensors["exemplars.data"].numpy().tobytes(), tensors["exemplars.offsets"].tolist()
    labels, ids = tensors["exemplars.labels"].tolist(), tensors["exemplars.sample_ids"].tolist()
    groups: dict[int, list[tuple[bytes, int]]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append((data[offsets[i] : offsets[i + 1]], ids[i]))
    return [Group(label, tuple(b for b, _ in rows), tuple(s for _, s in rows)) for label, rows in groups.items()]


@register_method("replay")
class Replay(Finetune):
    """Finetune's head trained on each batch plus replayed exemplars, selected by herding."""

    scenarios = frozenset({"cil", "dil", "til"})
    Config = ReplayConfig
    cfg: ReplayConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.groups: list[Group] = []
        self._memory: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (image side, features, labels)
        self._stats: dict[str, float] = {}

    def quota(self, num_groups: int) -> int:
        return self.cfg.memory_size // max(num_groups, 1)

    def memory(self) -> list[tuple[int, bytes, int]]:
        """The live exemplars (label, encoded image, sample id): each group's first ``quota``."""
        q = self.quota(len(self.groups))
        return [(g.label, img, sid) for g in self.groups for img, sid in zip(g.images[:q], g.sample_ids[:q], strict=True)]

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        if len(task.plans) != 1:
            raise ValueError(f"replay: task {task.id!r} needs its one training split's plan to store exemplars")
        ids, labels = task_rows(task.plans[0])
        quota = self.quota(len(self.groups) + len(np.unique(labels)))
        counts = np.bincount(labels, minlength=task.num_seen_classes)
        keep = sample_hash(ids, self.cfg.seed) < self.cfg.herding_pool * quota / np.maximum(counts[labels], 1)
        self._cand_ids, self._cand_labels = torch.from_numpy(ids[keep]), torch.from_numpy(labels[keep])
        dim = self.backbone.feature_dim
        self._cand_features = torch.zeros(len(self._cand_ids), dim, device=self.device)
        self._cand_seen = torch.zeros(len(self._cand_ids), dtype=torch.int64, device=self.device)
        self._class_sums = torch.zeros(task.num_seen_classes, dim, dtype=torch.float64, device=self.device)
        self._class_counts = torch.zeros(task.num_seen_classes, dtype=torch.int64, device=self.device)

    def task_buffers(self) -> dict[str, torch.Tensor]:
        return {
            "sum.cand_features": self._cand_features, "sum.cand_seen": self._cand_seen,
            "sum.class_sums": self._class_sums, "sum.class_counts": self._class_counts,
        }  # fmt: skip

    def _observe(self, features: torch.Tensor, batch: Batch) -> None:
        """Class sums of every row and the features of the herding candidates among them."""
        normed = F.normalize(features.float(), dim=1)
        self._class_sums.index_add_(0, batch["label"], normed.double())
        self._class_counts.index_add_(0, batch["label"], torch.ones_like(batch["label"]))
        ids = batch["sample_id"].to(self._cand_ids.device)
        slot = torch.searchsorted(self._cand_ids, ids).clamp(max=max(len(self._cand_ids) - 1, 0))
        hit = (self._cand_ids[slot] == ids) if len(self._cand_ids) else torch.zeros_like(ids, dtype=torch.bool)
        self._cand_features[slot[hit].to(self.device)] = normed[hit.to(normed.device)]
        self._cand_seen[slot[hit].to(self.device)] += 1

    @torch.no_grad()
    def memory_features(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen features and labels of the live exemplars decoded at ``size`` (cached: the
        backbone is frozen, so they change only with the memory)."""
        if self._memory is None or self._memory[0] != size:
            rows = self.memory()
            feats = torch.zeros(len(rows), self.backbone.feature_dim, device=self.device)
            for start in range(0, len(rows), 64):
                part = rows[start : start + 64]
                images = torch.from_numpy(np.stack([decode_image(img, size, f"exemplar {sid}") for _, img, sid in part])).to(self.device)
                feats[start : start + len(part)] = self.frozen_features(self.backbone.normalize(images)).float()
            self._memory = (size, feats, torch.tensor([label for label, _, _ in rows], dtype=torch.int64, device=self.device))
        return self._memory[1], self._memory[2]

    def training_step(self, batch: Batch) -> torch.Tensor:
        features = self.frozen_features(batch["image"])
        self._observe(features, batch)
        labels = batch["label"]
        mem_features, mem_labels = self.memory_features(batch["image"].shape[-1])
        if len(mem_labels):
            # Drawn by the batch's own sample ids: the same on a resumed run, distinct per rank.
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + int(batch["sample_id"].sum()) * 7919 + (self.task.index if self.task else 0))
            take = torch.randperm(len(mem_labels), generator=g)[: max(1, round(self.cfg.replay_ratio * len(labels)))].to(self.device)
            features = torch.cat([features.float(), mem_features[take]])
            labels = torch.cat([labels, mem_labels[take]])
        return F.cross_entropy(self.head(features.float()), labels)

    def end_task(self) -> TaskRecord:
        assert self.task is not None
        for tensor in self.task_buffers().values():
            self.collective.all_reduce_(tensor)
        seen = self._cand_seen.cpu() > 0
        labels_present = torch.nonzero(self._class_counts.cpu()).flatten().tolist()
        quota = self.quota(len(self.groups) + len(labels_present))
        features, cand_labels, cand_ids = self._cand_features.cpu()[seen], self._cand_labels[seen], self._cand_ids[seen]
        new: list[tuple[int, list[int]]] = []
        for label in labels_present:
            mine = torch.nonzero(cand_labels == label).flatten()
            mean = (self._class_sums[label] / self._class_counts[label]).float().cpu()
            order = herding(features[mine], mean, quota)
            new.append((label, cand_ids[mine[order]].tolist()))
        split = self.task.plans[0].train
        images, _ = read_encoded(split, np.array([i for _, ids in new for i in ids], dtype=np.int64))
        groups, at = [], 0
        for label, ids in new:
            if ids:
                groups.append(Group(label, tuple(images[at : at + len(ids)]), tuple(ids)))
            at += len(ids)
        self._stats = {"exemplars_stored": float(sum(len(g.images) for g in groups)), "herding_candidates": float(len(cand_ids))}
        record = super().end_task()
        record.tensors.update(_pack(groups))
        self._add(groups)
        return record

    def _add(self, groups: Sequence[Group]) -> None:
        self.groups.extend(groups)
        self._memory = None

    def task_stats(self) -> dict[str, Any]:
        return {**self._stats, "exemplars_live": float(len(self.memory()))}

    def restore(self, records: Sequence[TaskRecord]) -> None:
        super().restore(records)
        self.groups = []
        for record in records:
            self._add(_unpack(record.tensors))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.classifier == "head":
            return super().predict(images, task_ids)
        mem_features, mem_labels = self.memory_features(images.shape[-1])
        classes = self.head.num_classes
        sums = torch.zeros(classes, mem_features.shape[1], device=self.device).index_add_(0, mem_labels, F.normalize(mem_features, dim=1))
        counts = torch.bincount(mem_labels, minlength=classes)
        logits = F.normalize(self.frozen_features(images).float(), dim=1) @ F.normalize(sums, dim=1).T
        return logits.masked_fill(counts == 0, float("-inf"))
