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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

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


def train_phase(
    method: Method,
    make_batches: Callable[[], Iterable[Batch]],
    *,
    passes: int,
    num_tasks: int,
    num_samples: int,
    global_batch_size: int,
    amp: bool,
    log_every: int,
    label: str,
    phase_index: int = 0,
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
    collective = method.collective
    device = method.device
    params = method.trainable_parameters()
    grad_clip = method.cfg.grad_clip
    policy = checkpoints if checkpoints is not None and checkpoints.enabled else None
    lockstep = bool(params) or policy is not None  # a checkpoint is a collective: every rank must reach it at the same step
    lead = collective.rank == 0
    plan = method.pass_plan(passes)
    samples = torch.zeros(num_tasks, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    loss_rows = torch.zeros(1, dtype=torch.int64, device=device)  # rows of the passes that step
    consumed = {task: torch.zeros(rows, dtype=torch.bool) for task, rows in (policy.source_rows if policy else {}).items()}
    steps = 0
    done = 0  # samples trained over all ranks, for on_step
    optimizer = scheduler = None
    if params and any(plan):
        optimizer, scheduler = method.build_optimizer(sum(plan) * math.ceil(num_samples / global_batch_size), global_batch_size)
    if resume is not None:
        # Partial sums (samples, loss, consumed rows, the method's statistics) continue on rank 0
        # only, so that the closing all-reduces count each row once.
        steps = resume.steps
        done = sum(resume.samples)
        if lead:
            samples += torch.tensor(resume.samples, dtype=torch.int64, device=device)
            loss_rows += sum(resume.samples)
            loss_sum += resume.loss_sum
            for task, bits in resume.consumed.items():
                consumed[task] = bits.clone()
        method.load_task_state(resume.method)
        if optimizer is not None and resume.optimizer is not None:
            optimizer.load_state_dict(resume.optimizer)
        if scheduler is not None and resume.scheduler is not None:
            scheduler.load_state_dict(resume.scheduler)
        if resume.rng is not None and resume.rng.shape[0] == collective.world_size:
            torch.set_rng_state(resume.rng[collective.rank].to(torch.uint8).cpu())
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else contextlib.nullcontext()
    )

    def mean_loss() -> float | None:  # a host sync: only when a line or an event wants it
        return float(loss_sum[0]) / max(int(loss_rows[0]), 1) if params else None

    last_save = time.monotonic()
    for pass_index, trains in enumerate(plan):
        method.begin_pass(pass_index)
        stepping = bool(params) and trains
        iterator = iter(make_batches())
        while True:
            batch = next(iterator, None)
            local = 0 if batch is None else len(batch["label"])
            time_due = False
            if lockstep:
                wants = int(policy is not None and policy.every_s > 0 and lead and time.monotonic() - last_save >= policy.every_s)
                reduced = collective.all_reduce_(torch.tensor([local, wants], device=device))
                global_n, time_due = int(reduced[0]), bool(reduced[1])
                if global_n == 0:
                    break
            elif batch is None:
                break
            done += global_n if lockstep else local * collective.world_size
            loss_finite = True
            if batch is not None:
                samples += torch.bincount(batch["task"], minlength=num_tasks)
                if policy is not None:
                    for task in torch.unique(batch["task"]).tolist():
                        consumed[task][batch["sample_id"][batch["task"] == task].cpu()] = True
                if stepping:
                    with autocast:
                        loss = method.training_step(batch)
                    if loss is not None:
                        (loss * (local / global_n)).backward()
                        loss_finite = math.isfinite(float(loss.detach()))
                        loss_sum += float(loss.detach()) * local
                        loss_rows += local
                else:
                    with torch.no_grad():
                        method.training_step(batch)
            if stepping:
                assert optimizer is not None
                if not flat_all_reduce_grads(params, collective, loss_finite):
                    raise DivergedError(
                        f"{label}, step {steps + 1}: the loss or its gradient is not finite (nan/inf); "
                        "lower the learning rate (train.lr or the method's lr groups) or set method.grad_clip"
                    )
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None:
                    scheduler.step()
            if stepping or not params:  # optimizer steps (batches, for a method without parameters)
                steps += 1
            if lead and stepping and steps % log_every == 0:
                log.info("%s | step %d | loss %.4f", label, steps, mean_loss())
            if lead and on_step is not None:
                on_step(done, mean_loss)
            if policy is not None and ((policy.every_steps and steps % policy.every_steps == 0) or time_due):
                policy.save(_phase_state(method, phase_index, steps, samples, loss_sum, consumed, optimizer, scheduler))
                last_save = time.monotonic()
    collective.all_reduce_(samples)
    collective.all_reduce_(loss_sum)
    collective.all_reduce_(loss_rows)
    trained = int(loss_rows[0])
    return PhaseStats(
        samples_per_task=[int(s) for s in samples.tolist()],
        mean_loss=float(loss_sum[0]) / trained if params and trained else None,
        steps=steps,
    )


def _phase_state(
    method: Method,
    phase_index: int,
    steps: int,
    samples: torch.Tensor,
    loss_sum: torch.Tensor,
    consumed: dict[int, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
) -> PhaseState:
    """The phase's state reduced over ranks (a collective), identical on every rank."""
    collective = method.collective
    device = method.device
    merged: dict[int, torch.Tensor] = {}
    for task, bits in consumed.items():
        counts = collective.all_reduce_(bits.to(device, torch.uint8))
        if counts.numel() and int(counts.max()) > 1:
            raise RuntimeError(f"sample ids of task {task} entered a step on two ranks: the data split is not exactly-once")
        merged[task] = (counts > 0).cpu()
    rng = torch.get_rng_state()
    ranks = torch.zeros(collective.world_size, rng.numel(), dtype=torch.int32, device=device)
    ranks[collective.rank] = rng.to(device, torch.int32)
    return PhaseState(
        phase_index=phase_index,
        steps=steps,
        samples=[int(v) for v in collective.all_reduce_(samples.clone()).tolist()],
        loss_sum=float(collective.all_reduce_(loss_sum.clone())[0]),
        consumed=merged,
        method=method.task_state(),
        optimizer=copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None,  # its tensors are live otherwise
        scheduler=copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None,
        rng=collective.all_reduce_(ranks).cpu(),
    )
