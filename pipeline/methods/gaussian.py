"""One-pass Gaussians of frozen features: accumulate, reduce across workers, score.

Shared by DIKI (task inference and its gate) and by any method that routes samples to tasks.
Count, sum and sum of outer products are accumulated in float64 in the training pass, summed
across workers, and turned into a mean and an unbiased covariance regularised by eps * I and
an optional shrinkage toward (tr(S) / D) * I. A record stores the mean and the upper triangle.
"""

from __future__ import annotations

import torch
from torch.distributions import MultivariateNormal

from pipeline.methods.base import Collective


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

    def reduce(self, collective: Collective) -> None:
        for t in (self.count, self.sum, self.outer):
            collective.all_reduce_(t)

    def finalize(self, eps: float, shrinkage: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, covariance) in float64."""
        n = float(self.count[0])
        mean = self.sum / n
        cov = (self.outer - n * torch.outer(mean, mean)) / max(n - 1.0, 1.0)
        dim = cov.shape[0]
        eye = torch.eye(dim, dtype=cov.dtype, device=cov.device)
        if shrinkage:
            cov = (1 - shrinkage) * cov + shrinkage * (torch.trace(cov) / dim) * eye
        return mean, cov + eps * eye


def pack_upper(cov: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.triu_indices(cov.shape[0], cov.shape[0], device=cov.device)
    return cov[rows, cols]


def unpack_upper(packed: torch.Tensor, dim: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(dim, dim, device=packed.device)
    cov = torch.zeros(dim, dim, dtype=packed.dtype, device=packed.device)
    cov[rows, cols] = packed
    return cov + cov.T - torch.diag(cov.diagonal())


def upper_size(dim: int) -> int:
    return dim * (dim + 1) // 2


class TaskGaussians:
    """Per-task Gaussians; ``log_likelihood(x)`` is (B, tasks)."""

    def __init__(self) -> None:
        self.distributions: list[MultivariateNormal] = []

    def __len__(self) -> int:
        return len(self.distributions)

    def add(self, mean: torch.Tensor, cov: torch.Tensor) -> None:
        self.distributions.append(MultivariateNormal(mean.double(), scale_tril=torch.linalg.cholesky(cov.double())))

    def log_likelihood(self, features: torch.Tensor) -> torch.Tensor:
        x = features.double()
        return torch.stack([d.log_prob(x) for d in self.distributions], dim=1)


def gate(score: torch.Tensor, scale: float, offset: float) -> torch.Tensor:
    """DIKI's calibration weight: sigmoid(score / scale - offset)."""
    return torch.sigmoid(score / scale - offset)

