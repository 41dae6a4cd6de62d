"""GMM, generative multimodal models as class-incremental learners (Cao et al., CVPR 2024).

No classifier grows with the classes. A frozen captioning model (an open_clip CoCa) answers the
prompt ``prompt`` about an image, and it is taught, task after task, to answer with
``answer_template`` filled with the image's class name: teacher-forced cross-entropy on the
answer's tokens and the end token only (the start and the prompt are context, not targets). The
only trained parameters are a projection of the image tokens the decoder reads,
tokens + W tokens + b with W, b zero-initialised (so the untrained model is exactly the frozen
one; the paper trains only MiniGPT-4's image-to-decoder projection), and optionally LoRA deltas
on the decoder's attention (``lora_rank`` > 0; off by default).

Prediction: greedy generation (at most ``max_new_tokens``), the class span after the template's
prefix, and the candidate class whose name, embedded by the model's text encoder in
``match_template``, is nearest by cosine to the span embedded the same way; a span that equals a
candidate's name exactly wins outright. Any candidate set can be scored, so future tasks are
evaluated zero-shot (transfer), as for DIKI. The evaluator reports, per test set, the fraction of
generations that were exactly a candidate's name and the fraction matched only by similarity.
The record of a task is the projection (and LoRA deltas) after it; the last record restores.

Exemplars (``memory_size`` > 0; off by default, so the record is the adapter alone): the
official code's conventional class-incremental runs fine-tune each task on its data plus a
2,000-image exemplar memory (DoubleClass/GMM builds task i from ``20_20_order3_2000exp/task{i}.json``).
Here that memory is ``ExemplarMemory`` (herded in one pass on the mean of the decoder's image
tokens, identical on every rank), replayed ``replay_ratio`` per sample into each batch with its
own answer; its encoded images join the task's record and ``memory_bytes``. Without it, a
decoder small enough to have no prior of its own answers every image with the newest task's names
(bench/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline.backbones.captioner import Captioner
from pipeline.memory import TaskRecord
from pipeline.methods.base import Batch, Method, MethodParams, ParamGroup, register_method
from pipeline.methods.exemplars import ExemplarMemory
from pipeline.methods.zeroshot import require_clip

IGNORE = -100


class GMMConfig(MethodParams):
    lr: float = 1e-3
    prompt: str = "what is this photo of?"
    answer_template: str = Field(default="this is a photo of a {}.", pattern=r"\{\}")
    match_template: str = Field(default="a photo of a {}.", pattern=r"\{\}")
    max_new_tokens: int = Field(default=16, ge=1)
    lora_rank: int = Field(default=0, ge=0, description="0: no LoRA on the decoder's attention")
    lora_alpha: float = Field(default=16.0, gt=0)
    memory_size: int = Field(default=0, ge=0, description="exemplar images in all (0: none, the record is the adapter)")
    replay_ratio: float = Field(default=1.0, gt=0, description="exemplars mixed into each batch, per sample of the batch")
    herding_pool: float = Field(default=10.0, ge=1, description="herding candidates per exemplar slot")
    seed: int = 0


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def answer_span(answer: str, template: str) -> str:
    """The class part of a generated ``answer`` to ``template`` ("this is a photo of a {}."):
    what lies between the template's prefix and suffix, each removed where present."""
    text = normalise(answer).replace(" .", ".").replace(" ,", ",")
    prefix, suffix = (normalise(part) for part in template.split("{}", 1))
    if prefix and text.startswith(prefix):
        text = text[len(prefix) :]
    if suffix and text.endswith(suffix):
        text = text[: -len(suffix)]
    return text.strip()


def match_scores(
    spans: Sequence[str], names: Sequence[str], span_embeddings: torch.Tensor, name_embeddings: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, C) and the exact-match mask (B, C): cosine of the (normalised) embeddings, plus 2
    where a span is exactly a name, which no cosine can outscore."""
    wanted = [normalise(n) for n in names]
    exact = torch.tensor([[normalise(s) == n for n in wanted] for s in spans], dtype=torch.bool, device=span_embeddings.device)
    cosine = F.normalize(span_embeddings, dim=-1) @ F.normalize(name_embeddings, dim=-1).T
    return cosine + 2.0 * exact, exact


@register_method("gmm")
class GMM(Method):
    """A frozen captioner taught to answer with the class name; nearest seen class name by text embedding."""

    scenarios = frozenset({"cil", "dil", "dcil"})
    Config = GMMConfig
    zero_shot = True
    eval_stat_names = ("exact_match", "similarity_match")
    record_holds_state = True  # the adapter after the last task (exemplars come from every record)
    cfg: GMMConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clip = require_clip(self.backbone, self.name)
        self.captioner = Captioner(self.clip, self.name)
        width = int(self.captioner.model.text_decoder.width)
        self.proj = nn.Linear(width, width).to(self.device)
        nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)
        self.lora = self.captioner.add_lora(self.cfg.lora_rank, self.cfg.lora_alpha) if self.cfg.lora_rank else []
        self.prefix = self.captioner.encode(self.cfg.prompt)
        self._answers: dict[str, list[int]] = {}
        self._states: dict[str, torch.Tensor] = {}
        self._stats: dict[str, torch.Tensor] = {}
        cfg = self.cfg
        self.exemplars = (
            ExemplarMemory(self.name, cfg.memory_size, width, self.device, herding_pool=cfg.herding_pool, seed=cfg.seed)
            if cfg.memory_size and self.consumes_data
            else None
        )
        self.parts = [self.exemplars] if self.exemplars is not None else []

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("projection", list(self.proj.parameters()), self.cfg.lr), ParamGroup("lora", self.lora, self.cfg.lr)]

    def _state(self) -> dict[str, torch.Tensor]:
        tensors = {"proj.weight": self.proj.weight, "proj.bias": self.proj.bias}
        tensors |= {f"lora.{i}": p for i, p in enumerate(self.lora)}
        return tensors

    def decoder_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.adapt(self.captioner.image_tokens(images))

    def adapt(self, tokens: torch.Tensor) -> torch.Tensor:
        """The trained projection of the frozen image tokens: tokens + W tokens + b."""
        return tokens + self.proj(tokens)

    def sequences(self, labels: torch.Tensor, class_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forcing inputs (B, L) ``[start] prompt answer [end] pad...`` and their targets
        (B, L - 1): the next token where it belongs to the answer or is the end token, else IGNORE."""
        rows, answer_starts = [], []
        for label in labels.tolist():
            name = class_names[label]
            if name not in self._answers:
                self._answers[name] = self.captioner.encode(self.cfg.answer_template.format(name))
            rows.append([self.captioner.sot, *self.prefix, *self._answers[name], self.captioner.eot])
            answer_starts.append(1 + len(self.prefix))
        length = max(len(r) for r in rows)
        if length > self.captioner.context_length:
            raise ValueError(
                f"{self.name}: prompt plus answer is {length} tokens, over the decoder's context of {self.captioner.context_length}"
            )
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        targets = torch.full((len(rows), length - 1), IGNORE, dtype=torch.long)
        for i, (row, start) in enumerate(zip(rows, answer_starts, strict=True)):
            ids[i, : len(row)] = torch.tensor(row)
            targets[i, start - 1 : len(row) - 1] = torch.tensor(row[start:])
        return ids.to(self.device), targets.to(self.device)

    def text_states(self, labels: torch.Tensor, class_names: Sequence[str], length: int) -> torch.Tensor:
        """The frozen text tower's states of each label's teacher-forcing input, padded to ``length``.
        They depend on the class name alone, so each is computed once; a causal tower gives a
        row's positions the same states alone as beside longer rows (padding is never attended)."""
        rows = []
        for label in labels.tolist():
            name = class_names[label]
            if name not in self._states:
                ids = torch.tensor([[self.captioner.sot, *self.prefix, *self._answers[name]]], device=self.device)
                self._states[name] = self.captioner.text_states(ids)[0]
            rows.append(self._states[name])
        out = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    def training_step(self, batch: Batch) -> torch.Tensor:
        assert self.task is not None
        tokens, labels = self.captioner.image_tokens(batch["image"]), batch["label"]
        if self.exemplars is not None:
            self.exemplars.observe(tokens.mean(dim=1), batch)
            normalize, image_tokens = self.backbone.normalize, self.captioner.image_tokens
            mem_tokens, mem_labels = self.exemplars.decoded(
                batch["image"].shape[-1], lambda images: image_tokens(normalize(images))
            )
            if len(mem_labels):
                take = self.exemplars.draw(batch, self.cfg.replay_ratio, self.task.index, len(mem_labels))
                tokens, labels = torch.cat([tokens, mem_tokens[take].to(tokens.dtype)]), torch.cat([labels, mem_labels[take]])
        ids, targets = self.sequences(labels, self.task.class_names)
        hidden = self.captioner.hidden(self.adapt(tokens), self.text_states(labels, self.task.class_names, ids.shape[1] - 1))
        wanted = targets != IGNORE  # only the answer's positions go through the vocabulary projection
        return F.cross_entropy(self.captioner.project(hidden[wanted]).float(), targets[wanted])

    def end_task(self) -> TaskRecord:
        assert self.task is not None
        return TaskRecord({k: v.detach().clone() for k, v in self._state().items()} | self.parts_record())

    def apply_record(self, record: TaskRecord) -> None:
        with torch.no_grad():
            for key, tensor in self._state().items():
                tensor.copy_(record.tensors[key].to(tensor.device))

    @torch.no_grad()
    def generate(self, images: torch.Tensor) -> list[str]:
        """The decoded answers to the prompt, one per image."""
        answers = self.captioner.generate(self.decoder_tokens(images), self.prefix, self.cfg.max_new_tokens)
        return [self.captioner.decode(ids) for ids in answers]

    @torch.no_grad()
    def score(self, images, candidates, candidate_names, task_ids=None) -> torch.Tensor:
        spans = [answer_span(a, self.cfg.answer_template) for a in self.generate(images)]
        span_embeddings = self.clip.encode_text([self.cfg.match_template.format(s) for s in spans])
        names = list(candidate_names)
        logits, exact = match_scores(spans, names, span_embeddings, self.clip.class_embeddings(names, self.cfg.match_template))
        hit = exact.any(dim=1).double()
        n = torch.tensor(float(len(spans)), dtype=torch.float64, device=hit.device)
        for key, value in (("exact_match", hit.sum()), ("similarity_match", (1 - hit).sum())):
            stats = torch.stack([value, n])
            self._stats[key] = self._stats[key] + stats if key in self._stats else stats
        return logits

    def take_eval_stats(self) -> dict[str, torch.Tensor]:
        """{"exact_match", "similarity_match": (generations of that kind, generations)} since the last call."""
        stats, self._stats = self._stats, {}
        return stats


@register_method("gmm_zeroshot")
class GMMZeroShot(GMM):
    """GMM's frozen captioner, never trained: the generative zero-shot reference row for GMM."""

    scenarios = frozenset({"cil", "dil", "dcil", "til"})
    consumes_data = False

    def param_groups(self) -> list[ParamGroup]:
        return []

    def training_step(self, batch: Batch) -> None:
        return None

    def end_task(self) -> TaskRecord:
        return TaskRecord({})

    def restore(self, records: Sequence[TaskRecord]) -> None:
        return None  # nothing is learned: the captioner as built is the model after any number of tasks
