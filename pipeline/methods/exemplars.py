"""An exemplar memory chosen by herding in one pass (iCaRL), for the methods that replay stored images.

At most ``size`` images in all, as the original encoded bytes. Exemplars are grouped by
(task, class) -- a class of a domain-incremental stream keeps exemplars of every domain -- and
each group keeps the first ``size // groups`` images of its herding order, so shrinking the
memory for new classes drops each group's tail and never needs an image back. A task adds its
new groups (bytes, offsets, labels, sample ids, in herding order) to its record; ``restore``
rebuilds the same memory from the records, on every rank and after a restart.

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.ray_data import decode_image
from pipeline.data.stream import read_encoded, sample_hash, task_rows
from pipeline.memory import TaskRecord
from pipeline.methods.base import Batch, Collective, TaskInfo


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


def pack(groups: Sequence[Group]) -> dict[str, torch.Tensor]:
    images = [img for g in groups for img in g.images]
    offsets = np.cumsum([0, *(len(img) for img in images)])
    return {
        "exemplars.data": torch.frombuffer(bytearray(b"".join(images)), dtype=torch.uint8)
        if images
        else torch.zeros(0, dtype=torch.uint8),
        "exemplars.offsets": torch.from_numpy(offsets.astype(np.int64)),
        "exemplars.labels": torch.tensor([g.label for g in groups for _ in g.images], dtype=torch.int64),
        "exemplars.sample_ids": torch.tensor([i for g in groups for i in g.sample_ids], dtype=torch.int64),
    }


def unpack(tensors: dict[str, torch.Tensor]) -> list[Group]:
    data, offsets = tensors["exemplars.data"].numpy().tobytes(), tensors["exemplars.offsets"].tolist()
    labels, ids = tensors["exemplars.labels"].tolist(), tensors["exemplars.sample_ids"].tolist()
    groups: dict[int, list[tuple[bytes, int]]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append((data[offsets[i] : offsets[i + 1]], ids[i]))
    return [Group(label, tuple(b for b, _ in rows), tuple(s for _, s in rows)) for label, rows in groups.items()]


class ExemplarMemory:
    """The memory and its herding of one method: ``begin_task``, ``observe`` every training batch's
    frozen features, ``end_task`` (collective) to select, ``restore`` from the records."""

    def __init__(
        self, owner: str, size: int, feature_dim: int, device: torch.device, *, herding_pool: float = 10.0, seed: int = 0
    ) -> None:
        self.owner, self.size, self.feature_dim, self.device = owner, size, feature_dim, device
        self.herding_pool, self.seed = herding_pool, seed
        self.groups: list[Group] = []
        self._decoded: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (image side, encoded exemplars, labels)
        self.stats: dict[str, float] = {}

    def quota(self, num_groups: int) -> int:
        return self.size // max(num_groups, 1)

    def live(self) -> list[tuple[int, bytes, int]]:
        """The live exemplars (label, encoded image, sample id): each group's first ``quota``."""
        q = self.quota(len(self.groups))
        return [(g.label, img, sid) for g in self.groups for img, sid in zip(g.images[:q], g.sample_ids[:q], strict=True)]

    def begin_task(self, task: TaskInfo) -> None:
        if len(task.plans) != 1:
            raise ValueError(f"{self.owner}: task {task.id!r} needs its one training split's plan to store exemplars")
        ids, labels = task_rows(task.plans[0])
        quota = self.quota(len(self.groups) + len(np.unique(labels)))
        counts = np.bincount(labels, minlength=task.num_seen_classes)
        keep = sample_hash(ids, self.seed) < self.herding_pool * quota / np.maximum(counts[labels], 1)
        self._cand_ids, self._cand_labels = torch.from_numpy(ids[keep]), torch.from_numpy(labels[keep])
        self._cand_features = torch.zeros(len(self._cand_ids), self.feature_dim, device=self.device)
        self._cand_seen = torch.zeros(len(self._cand_ids), dtype=torch.int64, device=self.device)
        self._class_sums = torch.zeros(task.num_seen_classes, self.feature_dim, dtype=torch.float64, device=self.device)
        self._class_counts = torch.zeros(task.num_seen_classes, dtype=torch.int64, device=self.device)

    def buffers(self) -> dict[str, torch.Tensor]:
        return {
            "sum.cand_features": self._cand_features, "sum.cand_seen": self._cand_seen,
            "sum.class_sums": self._class_sums, "sum.class_counts": self._class_counts,
        }  # fmt: skip

    def observe(self, features: torch.Tensor, batch: Batch) -> None:
        """Class sums of every row and the features of the herding candidates among them."""
        normed = F.normalize(features.detach().float(), dim=1)
        self._class_sums.index_add_(0, batch["label"], normed.double())
        self._class_counts.index_add_(0, batch["label"], torch.ones_like(batch["label"]))
        ids = batch["sample_id"].to(self._cand_ids.device)
        slot = torch.searchsorted(self._cand_ids, ids).clamp(max=max(len(self._cand_ids) - 1, 0))
        hit = (self._cand_ids[slot] == ids) if len(self._cand_ids) else torch.zeros_like(ids, dtype=torch.bool)
        self._cand_features[slot[hit].to(self.device)] = normed[hit.to(normed.device)]
        self._cand_seen[slot[hit].to(self.device)] += 1

    @torch.no_grad()
    def decoded(self, side: int, encode: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode`` (uint8 images (B, 3, side, side) -> a frozen tensor per image) of the live
        exemplars, and their labels; cached, since it changes only with the memory."""
        if self._decoded is None or self._decoded[0] != side:
            rows = self.live()
            parts = []
            for start in range(0, len(rows), 64):
                part = rows[start : start + 64]
                images = torch.from_numpy(np.stack([decode_image(img, side, f"exemplar {sid}") for _, img, sid in part])).to(
                    self.device
                )
                parts.append(encode(images).float())
            encoded = torch.cat(parts) if parts else torch.zeros(0, self.feature_dim, device=self.device)
            self._decoded = (side, encoded, torch.tensor([label for label, _, _ in rows], dtype=torch.int64, device=self.device))
        return self._decoded[1], self._decoded[2]

    def draw(self, batch: Batch, ratio: float, task_index: int, count: int) -> torch.Tensor:
        """Indices into ``count`` live exemplars of ``ratio x batch`` to replay beside ``batch``:
        drawn by the batch's own sample ids, so the same on a resumed run and distinct per rank."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(batch["sample_id"].sum()) * 7919 + task_index)
        return torch.randperm(count, generator=g)[: max(1, round(ratio * len(batch["label"])))].to(self.device)

    def end_task(self, task: TaskInfo, collective: Collective) -> TaskRecord:
        """All-reduce the task's buffers, herd each class present, read the chosen images' bytes;
        the new groups join the memory and the returned record (which holds only them)."""
        for tensor in self.buffers().values():
            collective.all_reduce_(tensor)
        seen = self._cand_seen.cpu() > 0
        labels_present = torch.nonzero(self._class_counts.cpu()).flatten().tolist()
        quota = self.quota(len(self.groups) + len(labels_present))
        features, cand_labels, cand_ids = self._cand_features.cpu()[seen], self._cand_labels[seen], self._cand_ids[seen]
        new: list[tuple[int, list[int]]] = []
        for label in labels_present:
            mine = torch.nonzero(cand_labels == label).flatten()
            mean = (self._class_sums[label] / self._class_counts[label]).float().cpu()
            new.append((label, cand_ids[mine[herding(features[mine], mean, quota)]].tolist()))
        images, _ = read_encoded(task.plans[0].train, np.array([i for _, ids in new for i in ids], dtype=np.int64))
        groups, at = [], 0
        for label, ids in new:
            if ids:
                groups.append(Group(label, tuple(images[at : at + len(ids)]), tuple(ids)))
            at += len(ids)
        self.stats = {"exemplars_stored": float(sum(len(g.images) for g in groups)), "herding_candidates": float(len(cand_ids))}
        self._add(groups)
        self.stats["exemplars_live"] = float(len(self.live()))
        return TaskRecord(pack(groups))

    def _add(self, groups: Sequence[Group]) -> None:
        self.groups.extend(groups)
        self._decoded = None

    def restore(self, records: Sequence[TaskRecord]) -> None:
        self.groups = []
        for record in records:
            self._add(unpack(record.tensors))
