"""One-pass Gaussians of frozen features: accumulate, reduce across workers, score.

Shared by DIKI (task inference and its gate) and by any method that routes samples to tasks.
Count, sum and sum of outer products are accumulated in float64 in the training pass, summed
across workers, and turned into a mean and an unbiased covariance S, shrunk toward its own
diagonal and regularised by eps * I:
    Sigma = (1 - rho) S + rho diag(S) + eps I.
Why: a task has a few hundred samples in a D = 384..768 space, so S is singular or nearly so;
with eps alone, held-out samples of the *right* task get huge Mahalanobis distances (its small
eigenvalues are underestimated), which drives DIKI's gate toward 0. The diagonal target keeps
every feature's variance and only damps the correlations, so it does not mix scales.

rho is a float in [0, 1] or "auto": the OAS intensity (Chen et al. 2010, sklearn's formula) of
the correlation matrix R = diag(S)^-1/2 S diag(S)^-1/2 toward I; shrinking R toward I and
rescaling is the same as shrinking S toward diag(S). Everything is float64 and derived from
the all-reduced sums only, so every worker gets the identical Gaussian.
A record stores the mean and the upper triangle.

``train_distance`` is the mean squared Mahalanobis distance of the task's own training rows
under the finished Gaussian, exact from the same sums: (n - 1) / n * tr(Sigma^-1 S). It is the
natural unit of "how far is a sample from this task": ~ the rank of the features for a plain
estimate (whatever the nominal dimension: features confined to a subspace count only its
dimensions), less with shrinkage. DIKI's relative gate measures distances in it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch.distributions import MultivariateNormal

from pipeline.methods.base import Collective

Shrinkage = float | Literal["auto"]
# The same, validated, for method configs.
ShrinkageParam = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | Literal["auto"]


class GaussianAccumulator:
    def __init__(self, dim: int, device: torch.device) -> None:
        self.count = torch.zeros(1, dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        x = features.detach().double()
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.outer += x.T @ x

    def buffers(self, prefix: str) -> dict[str, torch.Tensor]:
        """The accumulator's partial sums, for ``Method.task_buffers``."""
        return {f"sum.{prefix}.count": self.count, f"sum.{prefix}.sum": self.sum, f"sum.{prefix}.outer": self.outer}

    def reduce(self, collective: Collective) -> None:
        for t in (self.count, self.sum, self.outer):
            collective.all_reduce_(t)

    def finalize(self, eps: float, shrinkage: Shrinkage = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, (1 - rho) S + rho diag(S) + eps I) in float64; rho = ``shrinkage``, or OAS for "auto"."""
        n = float(self.count[0])
        mean = self.sum / n
        scatter = self.outer - n * torch.outer(mean, mean)
        cov = scatter / max(n - 1.0, 1.0)
        rho = oas_intensity(scatter / n, n) if shrinkage == "auto" else float(shrinkage)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1] or 'auto', got {shrinkage!r}")
        if rho:
            cov = (1.0 - rho) * cov + rho * torch.diag(cov.diagonal())
        return mean, cov + eps * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)

    def train_distance(self, cov: torch.Tensor) -> float:
        """Mean squared Mahalanobis distance of the accumulated rows under (mean, ``cov``):
        (n - 1) / n * tr(cov^-1 S), S the unbiased covariance of the rows."""
        n = float(self.count[0])
        mean = self.sum / n
        scatter = self.outer - n * torch.outer(mean, mean)
        solved = torch.cholesky_solve(scatter, torch.linalg.cholesky(cov.double()))
        return float(torch.trace(solved)) / n


def oas_intensity(cov_biased: torch.Tensor, n: float) -> float:
    """OAS shrinkage intensity of the correlation matrix of ``cov_biased`` (the divide-by-n
    covariance of ``n`` samples) toward I, exactly as ``sklearn.covariance.oas`` computes it
    on standardised data. Zero-variance features are standardised by 1 (they stay zero)."""
    cov = cov_biased.double()
    p = cov.shape[0]
    var = cov.diagonal()
    # "Zero" is relative: a constant feature's variance from outer - n mean mean^T is rounding
    # noise (maybe negative), and dividing by it would blow up its correlations.
    constant = var <= 1e-12 * var.abs().max()
    inv_std = torch.where(constant, torch.ones_like(var), var).rsqrt()
    corr = cov * inv_std[:, None] * inv_std[None, :]
    mu = float(torch.trace(corr)) / p
    alpha = float((corr**2).mean())
    num = alpha + mu**2
    den = (n + 1.0) * (alpha - mu**2 / p)
    return 1.0 if den == 0 else min(num / den, 1.0)


def pack_upper(cov: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.triu_indices(cov.shape[0], cov.shape[0], device=cov.device)
    return cov[rows, cols]


def unpack_upper(packed: torch.Tensor, dim: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(dim, dim, device=packed.device)
    cov = torch.zeros(dim, dim, dtype=packed.dtype, device=packed.device)
    cov[rows, cols] = packed
    return cov + cov.T - torch.diag(cov.diagonal())


def gaussian_record(mean: torch.Tensor, cov: torch.Tensor) -> dict[str, torch.Tensor]:
    """A task's Gaussian as record tensors: its mean and its covariance's upper triangle (float32)."""
    return {"gaussian.mean": mean.float(), "gaussian.cov_upper": pack_upper(cov).float()}


class TaskGaussians:
    """Per-task Gaussians; ``log_likelihood(x)`` and ``mahalanobis(x)`` are (B, tasks)."""

    def __init__(self) -> None:
        self.distributions: list[MultivariateNormal] = []

    def __len__(self) -> int:
        return len(self.distributions)

    def add(self, mean: torch.Tensor, cov: torch.Tensor) -> None:
        self.distributions.append(MultivariateNormal(mean.double(), scale_tril=torch.linalg.cholesky(cov.double())))

    def add_record(self, tensors: Mapping[str, torch.Tensor], device: torch.device) -> None:
        """Add the Gaussian ``gaussian_record`` wrote into a task's record."""
        mean = tensors["gaussian.mean"].to(device)
        self.add(mean, unpack_upper(tensors["gaussian.cov_upper"].to(device).double(), mean.shape[0]))

    def log_likelihood(self, features: torch.Tensor) -> torch.Tensor:
        x = features.double()
        return torch.stack([d.log_prob(x) for d in self.distributions], dim=1)

    def mahalanobis(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance to every task's mean."""
        x = features.double()
        out = []
        for d in self.distributions:
            solved = torch.linalg.solve_triangular(d.scale_tril, (x - d.loc).T, upper=False)
            out.append((solved**2).sum(dim=0))
        return torch.stack(out, dim=1)


def gate(score: torch.Tensor, scale: float, offset: float) -> torch.Tensor:
    """DIKI's official calibration weight: sigmoid(score / scale - offset)."""
    return torch.sigmoid(score / scale - offset)


def relative_gate(distance: torch.Tensor, train_distance: torch.Tensor, threshold: float, temperature: float) -> torch.Tensor:
    """sigmoid(temperature * (threshold - distance / train_distance)): 1 for a sample as close as
    the task's own training rows, 1/2 at ``threshold`` times their mean squared distance."""
    return torch.sigmoid(temperature * (threshold - distance / train_distance))
