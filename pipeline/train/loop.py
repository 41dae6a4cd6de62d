"""One training phase on one worker: a single pass (or ``passes``) over this worker's shard.

The method's ``pass_plan`` may turn passes into statistics passes (no gradient, no optimizer
step) or add one: RanPAC's first-task adaptation trains its adapter in one pass and reads the
adapted features in the next.

Data parallelism over the adapter parameters only, with shards of unequal length (every sample
is seen exactly once, so shards differ by up to a batch). Each step every rank all-reduces its
batch size; while any rank still has data, all ranks step together. A rank's loss is scaled by
``local_batch / global_batch`` and gradients are summed across ranks, which gives exactly the
gradient of the mean loss over the global batch -- also for short and empty last batches,
where DDP's per-rank averaging would mis-weight samples (and ``equal=False`` shards would hang
it). Every rank then applies the identical update, so adapters stay bit-identical.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.errors import DivergedError
from pipeline.methods import Batch, Collective, Method
from pipeline.train.checkpoint import PhaseState

log = logging.getLogger("strata")


@dataclass
class PhaseStats:
    samples_per_task: list[int]
    mean_loss: float | None
    steps: int


def flat_all_reduce_grads(params: list[nn.Parameter], collective: Collective, loss_finite: bool = True) -> bool:
    """Sum gradients across ranks in one flat buffer; a rank without a batch contributes zeros.

    Returns whether the summed gradients and every rank's loss are finite -- the same answer on
    every rank, since it is read from the reduced buffer (a rank's NaN loss rides along as NaN)."""
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]
    flag = torch.full((1,), 0.0 if loss_finite else math.nan, dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([*grads, flag])
    if collective.world_size > 1:
        collective.all_reduce_(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
    return bool(torch.isfinite(flat).all())


def broadcast_parameters(params: list[nn.Parameter], collective: Collective) -> None:
    """Make every rank start the task from rank 0's adapter values."""
    for p in params:
        with torch.no_grad():
            collective.broadcast_(p.data)


@dataclass(frozen=True)
class CheckpointPolicy:
    """When a phase checkpoints inside itself, and how: ``save`` reports the state (a collective:
    every rank calls it at the same step). Steps, seconds (rank 0's clock, agreed through the
    step's all-reduce), or both; 0 turns a criterion off."""

    save: Callable[[PhaseState], None]
    every_steps: int = 0
    every_s: float = 0.0
    source_rows: dict[int, int] = field(default_factory=dict)  # bitmap size per stream task of the phase

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0 or self.every_s > 0


@dataclass(frozen=True)
class StepSettings:
    """How one phase steps: everything ``train_phase`` needs besides the method and its data."""

    num_tasks: int  # stream tasks of the phase (``samples_per_task`` has one entry each)
    num_samples: int  # training rows of the phase, over all ranks (sizes the schedule)
    global_batch_size: int
    passes: int = 1  # the run's train.passes; the method's pass_plan has the last word
    amp: bool = False
    log_every: int = 100
    label: str = "phase"
    phase_index: int = 0


@dataclass
class _Tally:
    """What a phase has counted on this rank; a resumed phase's totals continue on rank 0 only,
    so that the closing all-reduces count each row once."""

    samples: torch.Tensor  # rows per stream task of the phase
    loss_sum: torch.Tensor
    loss_rows: torch.Tensor  # rows of the passes that step, behind loss_sum
    consumed: dict[int, torch.Tensor]  # by stream task: which sample ids entered a step (checkpoints only)
    steps: int = 0  # optimizer steps (batches, for a method without parameters)
    done: int = 0  # samples trained over all ranks, for on_step

    @classmethod
    def start(cls, num_tasks: int, device: torch.device, source_rows: dict[int, int]) -> _Tally:
        return cls(
            samples=torch.zeros(num_tasks, dtype=torch.int64, device=device),
            loss_sum=torch.zeros(1, dtype=torch.float64, device=device),
            loss_rows=torch.zeros(1, dtype=torch.int64, device=device),
            consumed={task: torch.zeros(rows, dtype=torch.bool) for task, rows in source_rows.items()},
        )

    def resume(self, state: PhaseState, lead: bool) -> None:
        self.steps, self.done = state.steps, sum(state.samples)
        if lead:
            self.samples += torch.tensor(state.samples, dtype=torch.int64, device=self.samples.device)
            self.loss_rows += sum(state.samples)
            self.loss_sum += state.loss_sum
            for task, bits in state.consumed.items():
                self.consumed[task] = bits.clone()

    def count(self, batch: Batch, track_rows: bool) -> None:
        self.samples += torch.bincount(batch["task"], minlength=len(self.samples))
        if track_rows:
            for task in torch.unique(batch["task"]).tolist():
                self.consumed[task][batch["sample_id"][batch["task"] == task].cpu()] = True

    def mean_loss(self) -> float:  # a host sync: only when a line or an event wants it
        return float(self.loss_sum[0]) / max(int(self.loss_rows[0]), 1)


@dataclass
class _Optimization:
    """The phase's optimizer over the method's parameters: the summed gradient, the finiteness
    check, clipping, the step and the schedule."""

    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    grad_clip: float | None

    def load(self, state: PhaseState) -> None:
        if state.optimizer is not None:
            self.optimizer.load_state_dict(state.optimizer)
        if self.scheduler is not None and state.scheduler is not None:
            self.scheduler.load_state_dict(state.scheduler)

    def step(self, collective: Collective, loss_finite: bool, where: str) -> None:
        if not flat_all_reduce_grads(self.params, collective, loss_finite):
            raise DivergedError(
                f"{where}: the loss or its gradient is not finite (nan/inf); "
                "lower the learning rate (train.lr or the method's lr groups) or set method.grad_clip"
            )
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()


def train_phase(
    method: Method,
    make_batches: Callable[[], Iterable[Batch]],
    settings: StepSettings,
    *,
    checkpoints: CheckpointPolicy | None = None,
    resume: PhaseState | None = None,
    on_step: Callable[[int, Callable[[], float | None]], None] | None = None,
) -> PhaseStats:
    """Train one phase; with ``checkpoints``, report its state every so often, and with
    ``resume``, go on from such a state (the batches then hold only the rows it has not seen).
    Rank 0 calls ``on_step(samples, mean_loss)`` after every step: the samples trained so far
    over all ranks (estimated as its own times the world size where the ranks do not step
    together), and a function giving the running mean loss of its own batches (None for a
    method without one)."""
    phase = _Phase(method, settings, checkpoints if checkpoints is not None and checkpoints.enabled else None, on_step)
    if resume is not None:
        phase.resume(resume)
    return phase.run(make_batches)


class _Phase:
    """One phase on one rank: its passes, steps, checkpoints and tallies."""

    def __init__(
        self,
        method: Method,
        settings: StepSettings,
        policy: CheckpointPolicy | None,
        on_step: Callable[[int, Callable[[], float | None]], None] | None,
    ) -> None:
        self.method, self.settings, self.policy, self.on_step = method, settings, policy, on_step
        self.collective = method.collective
        self.params = method.trainable_parameters()
        self.lockstep = (
            bool(self.params) or policy is not None
        )  # a checkpoint is a collective: every rank must reach it at the same step
        self.lead = self.collective.rank == 0
        self.plan = method.pass_plan(settings.passes)
        self.tally = _Tally.start(settings.num_tasks, method.device, policy.source_rows if policy else {})
        self.opt: _Optimization | None = None
        if self.params and any(self.plan):
            total_steps = sum(self.plan) * math.ceil(settings.num_samples / settings.global_batch_size)
            built = method.build_optimizer(total_steps, settings.global_batch_size)
            self.opt = _Optimization(self.params, *built, method.cfg.grad_clip)
        on_cuda = settings.amp and method.device.type == "cuda"
        self.autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
        self.last_save = time.monotonic()

    def resume(self, state: PhaseState) -> None:
        self.tally.resume(state, self.lead)
        self.method.load_task_state(state.method)
        if self.opt is not None:
            self.opt.load(state)
        if state.rng is not None and state.rng.shape[0] == self.collective.world_size:
            torch.set_rng_state(state.rng[self.collective.rank].to(torch.uint8).cpu())

    def mean_loss(self) -> float | None:
        return self.tally.mean_loss() if self.params else None

    def save_due(self) -> bool:  # rank 0's clock, agreed through the step's all-reduce
        every = self.policy.every_s if self.policy is not None else 0
        return every > 0 and self.lead and time.monotonic() - self.last_save >= every

    def run(self, make_batches: Callable[[], Iterable[Batch]]) -> PhaseStats:
        for pass_index, trains in enumerate(self.plan):
            self.method.begin_pass(pass_index)
            stepping = self.opt is not None and trains
            for batch, global_n, time_due in _agreed_batches(
                make_batches(), self.collective, self.method.device, self.lockstep, self.save_due
            ):
                self.step(batch, global_n, stepping)
                self.after_step(stepping, time_due)
        tally = self.tally
        for tensor in (tally.samples, tally.loss_sum, tally.loss_rows):
            self.collective.all_reduce_(tensor)
        trained = int(tally.loss_rows[0])
        return PhaseStats(
            samples_per_task=[int(s) for s in tally.samples.tolist()],
            mean_loss=float(tally.loss_sum[0]) / trained if self.params and trained else None,
            steps=tally.steps,
        )

    def step(self, batch: Batch | None, global_n: int, stepping: bool) -> None:
        local = 0 if batch is None else len(batch["label"])
        self.tally.done += global_n if self.lockstep else local * self.collective.world_size
        loss_finite = True
        if batch is not None:
            self.tally.count(batch, self.policy is not None)
            loss_finite = _forward(self.method, batch, stepping, self.autocast, self.tally, local / global_n)
        if stepping:
            assert self.opt is not None
            self.opt.step(self.collective, loss_finite, f"{self.settings.label}, step {self.tally.steps + 1}")
        if stepping or not self.params:
            self.tally.steps += 1

    def after_step(self, stepping: bool, time_due: bool) -> None:
        """The log line, the progress callback and a checkpoint when one is due."""
        steps, policy = self.tally.steps, self.policy
        if self.lead and stepping and steps % self.settings.log_every == 0:
            log.info("%s | step %d | loss %.4f", self.settings.label, steps, self.tally.mean_loss())
        if self.lead and self.on_step is not None:
            self.on_step(self.tally.done, self.mean_loss)
        if policy is not None and ((policy.every_steps and steps % policy.every_steps == 0) or time_due):
            policy.save(_phase_state(self.method, self.settings.phase_index, self.tally, self.opt))
            self.last_save = time.monotonic()


def _agreed_batches(
    batches: Iterable[Batch], collective: Collective, device: torch.device, lockstep: bool, save_due: Callable[[], bool]
) -> Iterator[tuple[Batch | None, int, bool]]:
    """(this rank's batch or None, the global batch size, whether a timed checkpoint is due) per
    step. In lockstep every rank agrees on both through one all-reduce, and the phase goes on
    while any rank has data; otherwise each rank stops at its own end."""
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        local = 0 if batch is None else len(batch["label"])
        if not lockstep:
            if batch is None:
                return
            yield batch, local, False
            continue
        reduced = collective.all_reduce_(torch.tensor([local, int(save_due())], device=device))
        if int(reduced[0]) == 0:
            return
        yield batch, int(reduced[0]), bool(reduced[1])


def _forward(method: Method, batch: Batch, stepping: bool, autocast: Any, tally: _Tally, share: float) -> bool:
    """The method's step on this rank's batch -- with gradients (the loss scaled by this rank's
    share of the global batch) when the pass steps -- and whether its loss is finite."""
    if not stepping:
        with torch.no_grad():
            method.training_step(batch)
        return True
    with autocast:
        loss = method.training_step(batch)
    if loss is None:
        return True
    (loss * share).backward()
    value = float(loss.detach())
    tally.loss_sum += value * len(batch["label"])
    tally.loss_rows += len(batch["label"])
    return math.isfinite(value)


def _phase_state(method: Method, phase_index: int, tally: _Tally, opt: _Optimization | None) -> PhaseState:
    """The phase's state reduced over ranks (a collective), identical on every rank."""
    collective = method.collective
    device = method.device
    merged: dict[int, torch.Tensor] = {}
    for task, bits in tally.consumed.items():
        counts = collective.all_reduce_(bits.to(device, torch.uint8))
        if counts.numel() and int(counts.max()) > 1:
            raise RuntimeError(f"sample ids of task {task} entered a step on two ranks: the data split is not exactly-once")
        merged[task] = (counts > 0).cpu()
    rng = torch.get_rng_state()
    ranks = torch.zeros(collective.world_size, rng.numel(), dtype=torch.int32, device=device)
    ranks[collective.rank] = rng.to(device, torch.int32)
    return PhaseState(
        phase_index=phase_index,
        steps=tally.steps,
        samples=[int(v) for v in collective.all_reduce_(tally.samples.clone()).tolist()],
        loss_sum=float(collective.all_reduce_(tally.loss_sum.clone())[0]),
        consumed=merged,
        method=method.task_state(),
        optimizer=copy.deepcopy(opt.optimizer.state_dict()) if opt is not None else None,  # its tensors are live otherwise
        scheduler=copy.deepcopy(opt.scheduler.state_dict()) if opt is not None and opt.scheduler is not None else None,
        rng=collective.all_reduce_(ranks).cpu(),
    )
