"""DIKI — residual attention with distribution-aware calibration (Tang et al., ECCV 2024).

Per task t and chosen layer l of both CLIP encoders: residual keys/values K_r, V_r (H, L_r, d_h),
used by the backbone's residual-attention hook:
    O = [softmax(Q K^T / sqrt(d_h)) V + w * softmax(Q K_r^T / sqrt(d_h)) V_r] W_O + b.
K_r ~ U(-1, 1) and V_r = 0, so an untrained task is exactly the frozen CLIP (zero K_r as well
would block K_r's gradient).

Training task t (task id known, w = 1): image and class-name text ("a photo of a {c}.") both
through task t's residuals; loss = CE over exp(logit_scale) * cosine similarities to the task's
classes. In the same single pass, the frozen image features (L2-normalised) feed task t's
Gaussian (float64 count / sum / outer products, all-reduced). Covariance:
Sigma = (1 - rho) S + rho diag(S) + eps I, rho = ``shrinkage`` ("auto": OAS on the correlation
matrix, see ``gaussian.py``). Beyond the official code, which uses S + eps I: with a few hundred
samples per task in D = 512 (or 384) dimensions S is singular, so held-out samples of the right
task get huge Mahalanobis distances and the gate below falls to ~0.1 where it should be ~1.

Inference: s_t = log N(f(x); mu_t, Sigma_t) for every learned task, t* = argmax_t (per sample;
batch-wise majority as a switch), then the gate w. ``gate: official`` is the official code's
w = sigmoid(s_t* / D - 1) (scale D = feature dimension and offset 1 are config; the official code
hard-codes D = 512). It closes only when an unseen sample's Mahalanobis distance m^2 is tens of
times D: with s/D = C - m^2 / 2D, C = -(log 2 pi + log|Sigma| / D) / 2 ~ 4-5, the gate halves
at m^2 / D ~ 2 (C - 1) ~ 7. On CLIP ViT-B/16's 512-d features and MTIL's unrelated datasets that
holds; on the offline CLIP (whose 384-d features span 192 dimensions, trained toward ConSE
targets) the datasets sit at m^2 / D ~ 2-5 from each other and the gate stays at 0.96 on tasks
not yet learned. ``gate: relative`` (strata's default) measures the distance in units of the
task's own training rows' mean m^2 (``GaussianAccumulator.train_distance``: exact from the same
sums, and counting only the dimensions the features occupy): w = sigmoid(temperature *
(threshold - m^2 / mean m^2_train)), threshold 1.5 and temperature 8: for Gaussian features the
ratio of an in-distribution sample concentrates at 1 +- sqrt(2 / rank) whatever the dimension,
so 1.5 is far outside; real features have heavier tails, and neighbouring domains (PACS) sit
near 1.8 (chosen on training rows held out of the Gaussians, see
configs/methods/diki-single-pass.yaml).
The image uses task t*'s residuals
with weight w; the text side uses each sample's t* with the batch-mean weight, as the official
code does (the paper leaves the text weight open). Before any task is learned, it is zero-shot
CLIP exactly. The frozen forward serves both the Gaussian scores and the zero-shot path.
``score`` sums the gates it applies; ``take_eval_stats`` hands them over as "gate" (sum, count)
so the evaluator can report the mean gate per test set.

Defaults follow the official code: SGD (no momentum, no weight decay) at lr 5.0 with cosine
decay to 5e-3, layers 0-7 of both encoders, L_r = 8. Stored per task: K_r and V_r of every
chosen layer of both towers, the Gaussian mean and the covariance's upper triangle.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from pipeline.backbones.open_clip_family import DEFAULT_TEMPLATE
from pipeline.errors import ConfigError
from pipeline.memory import TaskRecord
from pipeline.methods.base import Batch, Method, MethodParams, ParamGroup, TaskInfo, register_method
from pipeline.methods.gaussian import (
    GaussianAccumulator,
    ShrinkageParam,
    TaskGaussians,
    gate,
    gaussian_record,
    relative_gate,
)
from pipeline.methods.zeroshot import clip_logits, require_clip

OFFICIAL_DEPTH_SHARE = 8 / 12  # lloongx/DIKI's MTIL configs: prompt_depth 8 of ViT-B/16's 12 blocks, both towers


def default_layers(blocks: int) -> list[int]:
    """The official prefix of a tower: its first round(blocks x 8/12) blocks (0-7 of 12)."""
    return list(range(max(1, round(blocks * OFFICIAL_DEPTH_SHARE))))


class DIKIConfig(MethodParams):
    image_layers: list[int] | None = None  # None: the official prefix, default_layers(tower depth)
    text_layers: list[int] | None = None
    residual_length: int = 8  # L_r
    gate: Literal["relative", "official"] = "relative"
    gate_threshold: float = Field(default=1.5, gt=0)  # relative: the gate halves at this multiple of the training rows' mean m^2
    gate_temperature: float = Field(default=8.0, gt=0)  # relative: its slope
    gate_scale: float | None = None  # official: default the feature dimension D
    gate_offset: float = 1.0  # official
    batchwise_task: bool = False
    eps: float = 1e-7
    shrinkage: ShrinkageParam = "auto"  # toward diag(S); "auto": OAS (gaussian.py)
    template: str = DEFAULT_TEMPLATE
    optimizer: Literal["adam", "adamw", "sgd"] = "sgd"
    lr: float = 5.0
    momentum: float = 0.0
    schedule: Literal["constant", "cosine"] = "cosine"
    min_lr: float = 5e-3


@register_method("diki")
class DIKI(Method):
    """Residual attention per task in both CLIP towers; Gaussian task inference gates it."""

    scenarios = frozenset({"dcil", "cil", "dil"})
    Config = DIKIConfig
    zero_shot = True
    eval_stat_names = ("gate",)
    cfg: DIKIConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clip = require_clip(self.backbone, self.name)
        self.hooks = {}
        self.layers: dict[str, list[int]] = {}
        for tower, chosen in (("image", self.cfg.image_layers), ("text", self.cfg.text_layers)):
            available = self.clip.attention_hooks(tower)
            layers = default_layers(len(available)) if chosen is None else chosen
            bad = [layer for layer in layers if not 0 <= layer < len(available)]
            if bad:
                raise ConfigError(f"method.{tower}_layers: layer {bad[0]} is not in the {len(available)}-block {tower} tower")
            self.layers[tower] = layers
            self.hooks[tower] = [available[layer] for layer in layers]
        self.gaussians = TaskGaussians()
        self.train_distances = torch.zeros(0, dtype=torch.float64, device=self.device)  # per task: mean m^2 of its training rows
        self._accumulator: GaussianAccumulator | None = None
        self._trainable: list[torch.nn.Parameter] = []
        self._gate_stats: torch.Tensor | None = None  # float64 (sum of gates, samples) since the last take

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self._trainable = []
        for hooks in self.hooks.values():
            for hook in hooks:
                shape = (hook.num_heads, self.cfg.residual_length, hook.head_dim)
                k = torch.nn.Parameter(torch.empty(shape, device=self.device).uniform_(-1.0, 1.0))
                v = torch.nn.Parameter(torch.zeros(shape, device=self.device))
                hook.residual_k = [*hook.residual_k, k]
                hook.residual_v = [*hook.residual_v, v]
                self._trainable += [k, v]
        self._accumulator = GaussianAccumulator(self.clip.feature_dim, self.device)
        self._local = torch.full((task.num_seen_classes,), -1, dtype=torch.long, device=self.device)
        self._local[list(task.classes)] = torch.arange(len(task.classes), device=self.device)

    def task_buffers(self) -> dict[str, torch.Tensor]:
        return self._accumulator.buffers("gaussian") if self._accumulator is not None else {}

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("residuals", self._trainable, self.cfg.lr)]

    def training_step(self, batch: Batch) -> torch.Tensor:
        assert self.task is not None and self._accumulator is not None
        images = batch["image"]
        with torch.no_grad():
            self._accumulator.update(F.normalize(self.clip.features(images).float(), dim=-1))
        slot = len(self.gaussians)
        names = [self.task.class_names[c] for c in self.task.classes]
        with self.clip.routing(slot):
            logits = clip_logits(
                self.clip, self.clip.features(images), self.clip.encode_text([self.cfg.template.format(n) for n in names])
            )
        return F.cross_entropy(logits, self._local[batch["label"]])

    def end_task(self) -> TaskRecord:
        assert self._accumulator is not None
        self._accumulator.reduce(self.collective)
        mean, cov = self._accumulator.finalize(self.cfg.eps, self.cfg.shrinkage)
        train_distance = self._accumulator.train_distance(cov)
        slot = len(self.gaussians)
        tensors = {
            f"{tower}.{layer}.{kv}": getattr(hook, f"residual_{kv}")[slot].detach().clone()
            for tower, layers in self.layers.items()
            for layer, hook in zip(layers, self.hooks[tower], strict=True)
            for kv in ("k", "v")
        }
        tensors |= gaussian_record(mean, cov) | {"gaussian.train_distance": torch.tensor([train_distance], dtype=torch.float64)}
        record = TaskRecord(tensors)
        for hooks in self.hooks.values():  # drop the trainable copies; the record is the state
            for hook in hooks:
                hook.residual_k, hook.residual_v = hook.residual_k[:slot], hook.residual_v[:slot]
        self.apply_record(record)
        return record

    def apply_record(self, record: TaskRecord) -> None:
        t = record.tensors
        for tower, layers in self.layers.items():
            for layer, hook in zip(layers, self.hooks[tower], strict=True):
                hook.residual_k = [*hook.residual_k, t[f"{tower}.{layer}.k"].to(self.device)]
                hook.residual_v = [*hook.residual_v, t[f"{tower}.{layer}.v"].to(self.device)]
        self.gaussians.add_record(t, self.device)
        self.train_distances = torch.cat([self.train_distances, t["gaussian.train_distance"].to(self.device, torch.float64)])

    def infer_tasks(self, frozen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(task per sample, gate per sample) from the Gaussians of the learned tasks."""
        features = F.normalize(frozen.float(), dim=-1)
        scores, tasks = self.gaussians.log_likelihood(features).max(dim=1)
        if self.cfg.gate == "official":
            weight = gate(scores, self.cfg.gate_scale or self.clip.feature_dim, self.cfg.gate_offset).float()
        else:
            distance = self.gaussians.mahalanobis(features).gather(1, tasks.unsqueeze(1)).squeeze(1)
            weight = relative_gate(
                distance, self.train_distances[tasks], self.cfg.gate_threshold, self.cfg.gate_temperature
            ).float()
        if self.cfg.batchwise_task:
            tasks = torch.full_like(tasks, int(torch.mode(tasks).values))
        return tasks, weight

    @torch.no_grad()
    def score(self, images, candidates, candidate_names, task_ids=None) -> torch.Tensor:
        frozen = self.clip.features(images)
        if not len(self.gaussians):
            return clip_logits(self.clip, frozen, self.clip.class_embeddings(candidate_names, self.cfg.template))
        tasks, weight = self.infer_tasks(frozen)
        stats = torch.stack([weight.double().sum(), torch.tensor(float(len(weight)), dtype=torch.float64, device=weight.device)])
        self._gate_stats = stats if self._gate_stats is None else self._gate_stats + stats
        with self.clip.routing(tasks, gate=weight):
            image = self.clip.features(images)
        prompts = [self.cfg.template.format(n) for n in candidate_names]
        text_gate = weight.mean().expand(len(prompts))
        logits = torch.empty(len(images), len(prompts), device=images.device)
        for t in torch.unique(tasks).tolist():
            with self.clip.routing(int(t), gate=text_gate):
                text = self.clip.encode_text(prompts)
            rows = tasks == t
            logits[rows] = clip_logits(self.clip, image[rows], text)
        return logits

    def take_eval_stats(self) -> dict[str, torch.Tensor]:
        """{"gate": (sum of gates, samples)} scored since the last call; {} if none."""
        stats, self._gate_stats = self._gate_stats, None
        return {} if stats is None else {"gate": stats}
