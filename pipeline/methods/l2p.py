"""L2P — Learning to Prompt (Wang et al., CVPR 2022): a prompt pool with key-query matching.

Per step:
1. query q(x) = pre-logits [CLS] feature of the frozen, unprompted backbone (one extra forward,
   computed once and used for selection, the key loss and the selection counts);
2. match score cos(q, k_m) for the M keys; take the top-N prompts per sample, or (switch
   ``batchwise_selection``, which the official code always uses, in training and evaluation)
   the N ids chosen most often in the batch for every sample;
3. the chosen prompts (N * L_p tokens) are inserted at the input through the backbone's prompt
   hook; the head reads the mean of the outputs at the prompt positions;
4. loss = CE (logits of classes outside the current task masked) - lambda * mean cos(q, k_sel).
   The official code sums the cosine over the N selected keys and averages over the batch
   (lambda * N in effect); strata follows the paper (Eq. 5): the mean over both.

Diversified selection (paper Eq. 4; never shipped by the official code), option ``diversify``:
while training task t > 0, prompt m's distance 1 - cos(q, k_m) is multiplied by
h_m = (c_m + 1) / (sum_j c_j + M), where c_m counts how often m was selected during tasks
0..t-1 (all-reduced over workers). Rarely used prompts get small distances and are picked;
the +1 smoothing keeps the similarity meaningful among never-used prompts. Evaluation uses
plain cosine.

Initialisation follows the official JAX code (google-research/l2p): prompts and keys U(0, 0.01)
and every new head row at zero (kernel and bias). With the current-task logit mask, the part of a
task's rows that its classes share gets no gradient, so a random row init would leave each task
a random logit offset against the others for good (what kept L2P 18 points below NCM on
cil-cifar10 while its tasks were learned well). Keys this small move fast relative to their norm,
so the selected keys turn toward the queries within a task.

The official code's cosine-head switches are options (off there and here): ``norm_pre_logits``
(the pooled feature at unit norm), ``weight_norm`` (every head row rescaled to unit norm before
each step) and ``temperature`` (logits divided by it). They do not untie a 2-class task's rows.

Stored per task (the whole pool, versioned): prompts (M, L_p, d), keys (M, d), the head over
all seen classes; the cumulative selection counts travel in the record's JSON metadata.
``task_stats`` gives, per task, the selection histogram and the mean cos(query, selected key)
over the task's training samples (both summed over workers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline.memory import TaskRecord
from pipeline.methods.base import Batch, Method, MethodParams, ParamGroup, TaskInfo, register_method
from pipeline.methods.heads import GrowingLinear, HeadInit


class L2PConfig(MethodParams):
    pool_size: int = 10  # M
    top_n: int = 5  # N
    prompt_length: int = 5  # L_p
    key_loss_weight: float = 0.1  # lambda
    batchwise_selection: bool = True
    diversify: bool = False
    init_range: tuple[float, float] = (0.0, 0.01)  # prompts: JAX official (the PyTorch port uses (-1, 1))
    key_init_range: tuple[float, float] = (0.0, 0.01)  # keys: JAX official (the PyTorch port uses (-1, 1))
    head_init: HeadInit = "zeros"  # JAX official: new head rows at zero
    # The official code's cosine-head switches (all off in its configs): the pooled feature at unit
    # norm (models/vit.py norm_pre_logits), every head row rescaled to unit norm before each step
    # (train_continual.py weight_norm), and the logits divided by a temperature.
    norm_pre_logits: bool = False
    weight_norm: bool = False
    temperature: float = Field(1.0, gt=0)
    position: Literal["prepend", "after_cls"] = "prepend"
    prompt_pos_embed: bool = False
    lr: float = 0.03  # official, at lr_reference_batch
    lr_reference_batch: int | None = 256  # official: lr x global batch / 256
    grad_clip: float | None = 1.0


def select_prompts(
    query: torch.Tensor,
    keys: torch.Tensor,
    top_n: int,
    *,
    batchwise: bool,
    penalty: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prompt ids (B, N): top-N by cosine, frequency-penalised distances if ``penalty`` is given,
    and the batch's N most frequent ids for every sample if ``batchwise`` (ties: lower id)."""
    cosine = F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T  # (B, M)
    score = cosine if penalty is None else -(1.0 - cosine) * penalty
    idx = score.topk(top_n, dim=1).indices
    if batchwise:
        counts = torch.bincount(idx.flatten(), minlength=keys.shape[0])
        major = torch.argsort(-counts, stable=True)[:top_n]
        idx = major.unsqueeze(0).expand(query.shape[0], -1)
    return idx


def frequency_penalty(counts: torch.Tensor) -> torch.Tensor:
    """h_m = (c_m + 1) / (sum_j c_j + M): the diversified-selection weight of each prompt."""
    counts = counts.double()
    return ((counts + 1) / (counts.sum() + len(counts))).float()


@register_method("l2p")
class L2P(Method):
    """Prompt pool with key-query matching; prompts at the input, head on prompt outputs."""

    scenarios = frozenset({"cil", "dil"})
    Config = L2PConfig
    cfg: L2PConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg, width = self.cfg, self.backbone.token_dim
        low, high = cfg.init_range
        # Prompts live in token space; keys in the query's (the pooled feature's) space.
        self.prompts = nn.Parameter(torch.empty(cfg.pool_size, cfg.prompt_length, width, device=self.device).uniform_(low, high))
        self.keys = nn.Parameter(
            torch.empty(cfg.pool_size, self.backbone.feature_dim, device=self.device).uniform_(*cfg.key_init_range)
        )
        self.head = GrowingLinear(width, cfg.head_init).to(self.device)
        self.counts = torch.zeros(cfg.pool_size, dtype=torch.int64, device=self.device)  # earlier tasks
        self._task_counts = torch.zeros_like(self.counts)
        self._task_cos = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum of cos(q, k_sel), pairs)
        self.last_stats: dict[str, Any] = {}
        self.backbone.prompt_hook(cfg.position, pos_embed=cfg.prompt_pos_embed)

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self.head.grow(task.num_seen_classes)
        self._task_counts = torch.zeros_like(self.counts)
        self._task_cos = torch.zeros_like(self._task_cos)

    def task_buffers(self) -> dict[str, torch.Tensor]:
        return {"sum.selection": self._task_counts, "sum.key_cos": self._task_cos}

    def param_groups(self) -> list[ParamGroup]:
        return [
            ParamGroup("prompts", [self.prompts, self.keys], self.cfg.lr),
            ParamGroup("head", list(self.head.parameters()), self.cfg.head_lr or self.cfg.lr),
        ]

    def _forward(self, images: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, query, selected ids)."""
        cfg = self.cfg
        query = self.frozen_features(images)
        use_penalty = training and cfg.diversify and bool(self.counts.any())
        idx = select_prompts(
            query, self.keys.detach(), cfg.top_n, batchwise=cfg.batchwise_selection,
            penalty=frequency_penalty(self.counts) if use_penalty else None,
        )  # fmt: skip
        prompts = self.prompts[idx].flatten(1, 2)  # (B, N * L_p, d)
        with self.backbone.routing(None, prompts=prompts):
            tokens = self.backbone.tokens(images)
        start = 0 if cfg.position == "prepend" else 1
        pooled = tokens[:, start : start + prompts.shape[1]].mean(dim=1)
        if cfg.norm_pre_logits:
            pooled = pooled / (pooled.norm(dim=-1, keepdim=True) + 1e-10)
        return self.head(pooled) / cfg.temperature, query, idx

    def training_step(self, batch: Batch) -> torch.Tensor:
        assert self.task is not None
        if self.cfg.weight_norm:
            with torch.no_grad():
                weight = self.head.weight
                weight.div_(weight.norm(dim=1, keepdim=True) + 1e-10)
        logits, query, idx = self._forward(batch["image"], training=True)
        outside = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
        outside[list(self.task.classes)] = False
        ce = F.cross_entropy(logits.masked_fill(outside, float("-inf")), batch["label"])
        cosine = (F.normalize(self.keys[idx], dim=-1) * F.normalize(query, dim=-1).unsqueeze(1)).sum(-1)
        self._task_counts += torch.bincount(idx.flatten(), minlength=self.cfg.pool_size)
        self._task_cos += torch.tensor([float(cosine.detach().sum()), cosine.numel()], dtype=torch.float64, device=self.device)
        return ce - self.cfg.key_loss_weight * cosine.mean()

    def end_task(self) -> TaskRecord:
        task_counts = self.collective.all_reduce_(self._task_counts.clone())
        cos_sum, pairs = self.collective.all_reduce_(self._task_cos.clone()).tolist()
        self.last_stats = {"prompt_selection": task_counts.tolist(), "key_cosine": cos_sum / pairs if pairs else None}
        counts = self.counts + task_counts
        record = TaskRecord(
            {
                "prompts": self.prompts.detach().clone(),
                "keys": self.keys.detach().clone(),
                "head.weight": self.head.weight.detach().clone(),
                "head.bias": self.head.bias.detach().clone(),
            },
            meta={"selection_counts": counts.tolist()},
        )
        self.restore([record])
        return record

    def task_stats(self) -> dict[str, Any]:
        """The task just ended, over all workers: how often each prompt was selected, and the mean
        cos(query, selected key) over its training samples (None if it saw none)."""
        return dict(self.last_stats)

    def restore(self, records: Sequence[TaskRecord]) -> None:
        if not records:
            return
        last = records[-1]
        with torch.no_grad():
            self.prompts.copy_(last.tensors["prompts"])
            self.keys.copy_(last.tensors["keys"])
        self.head.load(last.tensors["head.weight"], last.tensors["head.bias"])
        self.counts = torch.tensor(last.meta["selection_counts"], dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self._forward(images, training=False)[0]
