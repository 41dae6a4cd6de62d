"""Replay: experience replay from a fixed budget of stored images chosen by herding, and iCaRL.

The model is finetune's head over every seen class on the frozen backbone, trained on each
batch of the current task mixed with ``replay_ratio`` times as many exemplars drawn from the
memory. By default (``distill: false``) the loss is cross-entropy over the union: experience
replay (ER) with iCaRL's herded memory. ``distill: true`` is iCaRL's loss (Rebuffi et al.,
CVPR 2017, Alg. 3): sigmoid binary cross-entropy over every seen class, whose targets are the
one-hot label for the classes new in this task and the previous model's sigmoid outputs for the
earlier ones (the distillation term), on batch and exemplars alike. ``classifier: nme`` predicts
with iCaRL's nearest mean of exemplars; with both switches on, the method is iCaRL. On strata's
frozen backbone the exemplar means are of frozen features, so an NME prediction does not depend
on the head at all: what distillation protects there is only the head's own predictions.
The memory -- at most ``memory_size`` encoded images, herded in one pass, identical on every
rank -- is ``ExemplarMemory`` (``pipeline/methods/exemplars.py``); a task's record holds its new
exemplars and the head; the previous model is the last record's head.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from pipeline.memory import TaskRecord
from pipeline.methods.base import Batch, TaskInfo, register_method
from pipeline.methods.exemplars import ExemplarMemory
from pipeline.methods.finetune import Finetune, FinetuneConfig


class ReplayConfig(FinetuneConfig):
    memory_size: int = Field(default=2000, ge=1, description="stored images in all (iCaRL's K)")
    replay_ratio: float = Field(default=1.0, gt=0, description="exemplars mixed into each batch, per sample of the batch")
    classifier: Literal["head", "nme"] = "head"
    distill: bool = Field(
        default=False, description="iCaRL's loss: sigmoid BCE with the previous model's outputs as earlier classes' targets"
    )
    herding_pool: float = Field(default=10.0, ge=1, description="herding candidates per exemplar slot")
    seed: int = 0


@register_method("replay")
class Replay(Finetune):
    """Experience replay from a herded exemplar memory; with distill and nme, iCaRL."""

    scenarios = frozenset({"cil", "dil", "til"})
    Config = ReplayConfig
    cfg: ReplayConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        self.exemplars = ExemplarMemory(
            self.name, cfg.memory_size, self.backbone.feature_dim, self.device, herding_pool=cfg.herding_pool, seed=cfg.seed
        )
        self.parts = [self.exemplars]
        self.old_head: tuple[torch.Tensor, torch.Tensor] | None = None

    def begin_task(self, task: TaskInfo) -> None:
        if self.head.num_classes:  # the previous model, before the head grows
            self.old_head = (self.head.weight.detach().clone(), self.head.bias.detach().clone())
        super().begin_task(task)

    def memory_features(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen features and labels of the live exemplars decoded at ``size``."""
        return self.exemplars.decoded(size, lambda images: self.frozen_features(self.backbone.normalize(images)))

    def training_step(self, batch: Batch) -> torch.Tensor:
        features = self.frozen_features(batch["image"])
        self.exemplars.observe(features, batch)
        labels = batch["label"]
        mem_features, mem_labels = self.memory_features(batch["image"].shape[-1])
        if len(mem_labels):
            take = self.exemplars.draw(batch, self.cfg.replay_ratio, self.task.index if self.task else 0, len(mem_labels))
            features = torch.cat([features.float(), mem_features[take]])
            labels = torch.cat([labels, mem_labels[take]])
        logits = self.head(features.float())
        if not self.cfg.distill:
            return F.cross_entropy(logits, labels)
        return F.binary_cross_entropy_with_logits(logits, self.icarl_targets(features.float(), labels, logits.shape[1]))

    @torch.no_grad()
    def icarl_targets(self, features: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
        """One-hot labels, with the columns of the earlier classes that this task does not train
        (all of them in cil; none in dil, where every task has every class) replaced by the
        previous model's sigmoid outputs."""
        targets = F.one_hot(labels, classes).float()
        if self.old_head is not None and self.task is not None:
            earlier = torch.zeros(classes, dtype=torch.bool, device=targets.device)
            earlier[: self.old_head[0].shape[0]] = True
            earlier[list(self.task.classes)] = False
            targets[:, earlier] = torch.sigmoid(F.linear(features, *self.old_head))[:, earlier[: self.old_head[0].shape[0]]]
        return targets

    def end_task(self) -> TaskRecord:
        record = super().end_task()
        record.tensors.update(self.parts_record())
        return record

    @torch.no_grad()
    def predict(self, images: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.classifier == "head":
            return super().predict(images, task_ids)
        mem_features, mem_labels = self.memory_features(images.shape[-1])
        classes = self.head.num_classes
        sums = torch.zeros(classes, mem_features.shape[1], device=self.device).index_add_(
            0, mem_labels, F.normalize(mem_features, dim=1)
        )
        counts = torch.bincount(mem_labels, minlength=classes)
        logits = F.normalize(self.frozen_features(images).float(), dim=1) @ F.normalize(sums, dim=1).T
        return logits.masked_fill(counts == 0, float("-inf"))
