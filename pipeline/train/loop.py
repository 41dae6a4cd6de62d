"""One training phase on one worker: a single pass (or ``passes``) over this worker's shard.

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
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import DivergedError
from pipeline.methods import Batch, Collective, Method

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
) -> PhaseStats:
    collective = method.collective
    device = method.device
    params = method.trainable_parameters()
    grad_clip = method.cfg.grad_clip
    samples = torch.zeros(num_tasks, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    steps = 0
    optimizer = scheduler = None
    if params:
        optimizer, scheduler = method.build_optimizer(passes * math.ceil(num_samples / global_batch_size), global_batch_size)
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else contextlib.nullcontext()
    )
    for _ in range(passes):
        iterator = iter(make_batches())
        while True:
            batch = next(iterator, None)
            local = 0 if batch is None else len(batch["label"])
            if params:
                global_n = int(collective.all_reduce_(torch.tensor([local], device=device))[0])
                if global_n == 0:
                    break
            elif batch is None:
                break
            loss_finite = True
            if batch is not None:
                samples += torch.bincount(batch["task"], minlength=num_tasks)
                if params:
                    with autocast:
                        loss = method.training_step(batch)
                    if loss is not None:
                        (loss * (local / global_n)).backward()
                        loss_finite = math.isfinite(float(loss.detach()))
                        loss_sum += float(loss.detach()) * local
                else:
                    with torch.no_grad():
                        method.training_step(batch)
            if params:
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
            steps += 1
            if collective.rank == 0 and params and steps % log_every == 0:
                log.info("%s | step %d | loss %.4f", label, steps, float(loss_sum[0]) / max(int(samples.sum()), 1))
    collective.all_reduce_(samples)
    collective.all_reduce_(loss_sum)
    seen = int(samples.sum())
    return PhaseStats(
        samples_per_task=[int(s) for s in samples.tolist()],
        mean_loss=float(loss_sum[0]) / seen if params and seen else None,
        steps=steps,
    )
