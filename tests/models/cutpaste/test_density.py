"""Gaussian density estimation against NumPy and scikit-learn: mean, Ledoit-Wolf covariance, Mahalanobis distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import pinvh
from sklearn.covariance import LedoitWolf, ledoit_wolf_shrinkage

from isstad_plugin.models.cutpaste.density import GaussianDensity, ledoit_wolf, whitening_matrix


def data(n: int, p: int, offset: float = 0.0, seed: int = 0) -> np.ndarray:
    """Correlated, anisotropic Gaussian samples (float64) around ``offset``."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(p, p)) * np.linspace(0.2, 3.0, p)
    return rng.normal(size=(n, p)) @ mixing + offset + rng.normal(size=p)


@pytest.mark.parametrize(("n", "p", "offset"), [(500, 16, 0.0), (40, 64, 0.0), (300, 32, 100.0)],
                         ids=["n>p", "n<p", "offset"])
def test_ledoit_wolf_equals_sklearn(n: int, p: int, offset: float) -> None:
    x = data(n, p, offset)
    fit = ledoit_wolf(torch.from_numpy(x))
    reference = LedoitWolf().fit(x)
    np.testing.assert_allclose(fit.mean.numpy(), x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fit.shrinkage.item(), reference.shrinkage_, rtol=1e-9)
    np.testing.assert_allclose(fit.shrinkage.item(), ledoit_wolf_shrinkage(x), rtol=1e-9)
    np.testing.assert_allclose(fit.covariance.numpy(), reference.covariance_, rtol=1e-9, atol=1e-12)


def test_streaming_fit_equals_one_shot_and_sklearn_distances() -> None:
    x = data(1000, 24, offset=5.0).astype(np.float32)
    density = GaussianDensity(24)
    density.reset()
    for chunk in np.array_split(x, 7):  # uneven batches, as from a dataloader
        density.update(torch.from_numpy(chunk))
    fit = density.compute()
    reference = LedoitWolf().fit(x.astype(np.float64))
    np.testing.assert_allclose(density.mean.numpy(), x.astype(np.float64).mean(0), rtol=1e-5)
    np.testing.assert_allclose(fit.covariance.numpy(), reference.covariance_, rtol=1e-7, atol=1e-9)
    queries = data(50, 24, offset=5.0, seed=1).astype(np.float32)
    ours = density(torch.from_numpy(queries)).numpy()
    expected = np.sqrt(reference.mahalanobis(queries.astype(np.float64)))  # sklearn returns squared distances
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    one_shot = GaussianDensity(24)
    one_shot.fit(torch.from_numpy(x))
    np.testing.assert_allclose(one_shot(torch.from_numpy(queries)).numpy(), ours, rtol=1e-5)


def test_mahalanobis_matches_numpy_formula_on_a_batch_of_maps() -> None:
    x = data(400, 8)
    density = GaussianDensity(8)
    fit = density.fit(torch.from_numpy(x))
    queries = data(2 * 3 * 5, 8, seed=2).reshape(2, 3, 5, 8)
    precision = np.linalg.inv(fit.covariance.numpy())
    diff = queries - fit.mean.numpy()
    expected = np.sqrt(np.einsum("...i,ij,...j->...", diff, precision, diff))
    ours = density(torch.from_numpy(queries).float())
    assert ours.shape == (2, 3, 5)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5)


def test_whitening_is_a_square_root_of_the_pseudo_inverse() -> None:
    x = data(10, 6)  # rank-deficient empirical covariance, no shrinkage
    covariance = np.cov(x, rowvar=False, bias=True)
    w = whitening_matrix(torch.from_numpy(covariance)).numpy()
    np.testing.assert_allclose(w @ w.T, pinvh(covariance), rtol=1e-6, atol=1e-8)


def test_fit_lives_in_the_state_dict() -> None:
    density = GaussianDensity(4)
    assert not density.fitted
    density.fit(torch.randn(50, 4))
    state = density.state_dict()
    assert set(state) == {"mean", "whitening", "fitted"}
    restored = GaussianDensity(4)
    restored.load_state_dict(state)
    query = torch.randn(3, 4)
    assert bool(restored.fitted)
    torch.testing.assert_close(restored(query), density(query))


def test_errors() -> None:
    density = GaussianDensity(4)
    with pytest.raises(ValueError, match=r"embeddings must be \[N, 4\]"):
        density.update(torch.randn(3, 5))
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        density.fit(torch.randn(1, 4))
