"""LwF, Learning without Forgetting (Li & Hoiem, ECCV 2016; TPAMI 2017): no data is kept.

The model is finetune's head over every seen class on the frozen backbone. From the second task
on, the loss on the current task's batch is

    cross-entropy(head(x), y) + distill_weight * T^2 * KL( softmax(old(x) / T) || softmax(head(x)[:, :K] / T) )

where ``old`` is the head as the previous task left it, over its K classes (all of them in dil,
where the classes are shared), and T the temperature (2 and weight 1, the paper's values). The
KL divergence is the paper's cross-entropy with softened targets minus the targets' entropy, a
constant, and T^2 keeps its gradient's scale independent of T (Hinton et al.). The previous
model is the last record's head, restored from the memory store like any record, so a restarted
worker distils to exactly what the task started from. The backbone stays frozen, as everywhere
in strata: what LwF protects is the head (there are no adapters to distil through).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from pipeline.methods.base import Batch, TaskInfo, register_method
from pipeline.methods.finetune import Finetune, FinetuneConfig


class LwFConfig(FinetuneConfig):
    temperature: float = Field(default=2.0, gt=0, description="softens both models' outputs in the distillation term")
    distill_weight: float = Field(default=1.0, ge=0, description="weight of the distillation term (lambda_o)")


@register_method("lwf")
class LwF(Finetune):
    """Finetune's head plus distillation to the previous head's outputs on the current data."""

    scenarios = frozenset({"cil", "dil", "til"})
    Config = LwFConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.old_weight: torch.Tensor | None = None
        self.old_bias: torch.Tensor | None = None

    def begin_task(self, task: TaskInfo) -> None:
        # The previous model, before the head grows rows for the new classes.
        if self.head.num_classes:
            self.old_weight, self.old_bias = self.head.weight.detach().clone(), self.head.bias.detach().clone()
        super().begin_task(task)

    @torch.no_grad()
    def distillation_targets(self, features: torch.Tensor) -> torch.Tensor | None:
        """The previous model's logits on ``features``; None on the first task."""
        if self.old_weight is None or self.old_bias is None:
            return None
        return F.linear(features, self.old_weight, self.old_bias)

    def training_step(self, batch: Batch) -> torch.Tensor:
        features = self.frozen_features(batch["image"])
        logits = self.head(features)
        loss = F.cross_entropy(logits, batch["label"])
        targets = self.distillation_targets(features)
        if targets is None or self.cfg.distill_weight == 0:
            return loss
        t = self.cfg.temperature
        distill = F.kl_div(
            F.log_softmax(logits[:, : targets.shape[1]] / t, dim=1),
            F.log_softmax(targets / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return loss + self.cfg.distill_weight * t * t * distill
