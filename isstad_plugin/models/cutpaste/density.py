"""Gaussian density estimation (GDE): mean, Ledoit-Wolf-shrunk covariance and Mahalanobis distance.

CutPaste scores an embedding by its Mahalanobis distance to a Gaussian fitted on the embeddings of normal
training images. The fit streams over batches (sums of moments in float64, about the first batch's mean so the
sums stay well conditioned), so millions of patch embeddings never have to be held at once. The result lives
in buffers (``mean`` and a whitening matrix), so it is saved in checkpoints and is part of the exported graph.

The shrinkage is Ledoit & Wolf's (2004) estimate exactly as ``sklearn.covariance.ledoit_wolf_shrinkage``
computes it on centred data ``X`` (``n`` samples, ``p`` features, ``S = X^T X / n``)::

    mu     = trace(S) / p
    delta  = ||S - mu I||_F^2 / p
    beta   = min(delta, (sum_k ||x_k||^4 / n - ||S||_F^2) / (n p))
    shrink = beta / delta                      (0 when beta == 0)
    Sigma  = (1 - shrink) S + shrink mu I

Example:
    >>> density = GaussianDensity(8)
    >>> fit = density.fit(torch.randn(100, 8))
    >>> density(torch.randn(5, 8)).shape
    torch.Size([5])
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class LedoitWolfFit(NamedTuple):
    """A fitted Gaussian, float64: ``mean [D]``, ``covariance [D, D]`` (shrunk), ``shrinkage`` (scalar)."""

    mean: Tensor
    covariance: Tensor
    shrinkage: Tensor


class GaussianDensity(nn.Module):
    """A multivariate Gaussian over ``dim``-dimensional embeddings, scored by Mahalanobis distance.

    Fit with :meth:`fit` (one tensor) or :meth:`reset` / :meth:`update` (per batch) / :meth:`compute`.
    ``forward`` returns ``sqrt((x - mean)^T Sigma^+ (x - mean))`` computed as ``||(x - mean) W||`` with the
    whitening matrix ``W = V diag(lambda^-1/2)`` from the eigendecomposition of ``Sigma`` (directions with
    eigenvalues below the pseudo-inverse cut-off are dropped, as ``scipy.linalg.pinvh`` does).

    Args:
        dim: embedding width.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("whitening", torch.eye(dim))
        self.register_buffer("fitted", torch.tensor(False))
        self.reset()

    # ------------------------------------------------------------------ fitting
    def reset(self) -> None:
        """Drop the accumulated moments (the fitted buffers are kept until :meth:`compute`)."""
        self._count = 0
        self._shift: Tensor | None = None
        self._sums: dict[str, Tensor] = {}

    @torch.no_grad()
    def update(self, embeddings: Tensor) -> None:
        """Accumulate ``[N, D]`` embeddings (float64 sums of ``y``, ``y y^T``, ``|y|^2 y``, ``|y|^4``)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must be [N, {self.dim}], got {tuple(embeddings.shape)}")
        y = embeddings.detach().to(torch.float64)
        if self._shift is None:
            self._shift = y.mean(0)
        y = y - self._shift
        squared_norm = y.pow(2).sum(1)
        batch = {"s1": y.sum(0), "s2": y.T @ y, "s3": squared_norm @ y, "s4": squared_norm.pow(2).sum()}
        for key, value in batch.items():
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self._count += y.shape[0]

    @torch.no_grad()
    def compute(self) -> LedoitWolfFit:
        """Finish the fit: set ``mean`` and ``whitening`` from the accumulated moments and return the fit."""
        if self._count < 2:
            raise ValueError(f"a Gaussian needs at least 2 embeddings, got {self._count}")
        fit = ledoit_wolf_from_moments(self._count, self._shift, **self._sums)
        self.mean.copy_(fit.mean)
        self.whitening.copy_(whitening_matrix(fit.covariance))
        self.fitted.fill_(True)
        return fit

    def fit(self, embeddings: Tensor) -> LedoitWolfFit:
        """Fit on ``[N, D]`` embeddings in one go."""
        self.reset()
        self.update(embeddings)
        fit = self.compute()
        self.reset()
        return fit

    # ------------------------------------------------------------------ scoring
    def forward(self, embeddings: Tensor) -> Tensor:
        """Mahalanobis distance of ``[..., D]`` embeddings; returns ``[...]``."""
        centred = embeddings - self.mean.to(embeddings.dtype)
        return (centred @ self.whitening.to(embeddings.dtype)).pow(2).sum(-1).sqrt()


def ledoit_wolf_from_moments(count: int, shift: Tensor, s1: Tensor, s2: Tensor, s3: Tensor,
                             s4: Tensor) -> LedoitWolfFit:
    """Mean and Ledoit-Wolf covariance from sums over ``y = x - shift``.

    Args:
        count: ``n``.
        shift: ``[D]`` the point the sums are taken about.
        s1: ``sum y`` ``[D]``; s2: ``sum y y^T`` ``[D, D]``; s3: ``sum |y|^2 y`` ``[D]``; s4: ``sum |y|^4``.
    """
    n, p = float(count), s1.shape[0]
    m = s1 / n  # mean of y
    s = s2 / n - torch.outer(m, m)  # maximum-likelihood covariance S
    # sum_k |y_k - m|^4, expanded in the raw sums (a = |y|^2, b = y.m, c = |m|^2)
    c = m @ m
    fourth = (s4 + 4 * (m @ s2 @ m) + n * c**2 - 4 * (m @ s3) + 2 * c * s2.trace() - 4 * c * (m @ s1))
    trace = s.trace()
    mu = trace / p
    frobenius = s.pow(2).sum()
    delta = (frobenius - 2 * mu * trace + p * mu**2) / p
    beta = torch.minimum((fourth / n - frobenius) / (n * p), delta)
    shrinkage = torch.where(beta == 0, torch.zeros_like(beta), beta / torch.where(delta == 0, 1.0, delta))
    covariance = (1 - shrinkage) * s + shrinkage * mu * torch.eye(p, dtype=s.dtype, device=s.device)
    return LedoitWolfFit(shift + m, covariance, shrinkage)


def ledoit_wolf(embeddings: Tensor) -> LedoitWolfFit:
    """Mean and Ledoit-Wolf covariance of ``[N, D]`` embeddings (float64), as ``sklearn.covariance.LedoitWolf``."""
    y = embeddings.to(torch.float64)
    shift = y.mean(0)
    y = y - shift
    squared_norm = y.pow(2).sum(1)
    return ledoit_wolf_from_moments(y.shape[0], shift, y.sum(0), y.T @ y, squared_norm @ y,
                                    squared_norm.pow(2).sum())


def whitening_matrix(covariance: Tensor) -> Tensor:
    """``W [D, D]`` with ``W W^T = pinv(covariance)`` (cut-off as ``scipy.linalg.pinvh``: ``D * eps * max|lambda|``)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.to(torch.float64))
    cutoff = eigenvalues.abs().max() * covariance.shape[0] * torch.finfo(torch.float64).eps
    inverse_sqrt = torch.where(eigenvalues > cutoff, eigenvalues.clamp_min(cutoff).rsqrt(), 0.0)
    return eigenvectors * inverse_sqrt
