"""Stage-2 SSIM is torchmetrics' SSIM (values and gradients), in a layout that runs faster on CPUs."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from isstad_plugin.models.isstad.loss import ssim


@pytest.mark.parametrize("shape", [(4, 3, 64, 64), (2, 3, 48, 80), (3, 1, 32, 32)], ids=["square", "wide", "gray"])
def test_ssim_equals_torchmetrics_in_value_and_gradient(shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(shape, generator=generator)
    # a reconstruction-like input: the target plus noise, so SSIM sits well inside (0, 1)
    noisy = (target + 0.1 * torch.randn(shape, generator=generator)).clamp(0, 1)
    ours_in = noisy.clone().requires_grad_(True)
    theirs_in = noisy.clone().requires_grad_(True)
    ours = ssim(ours_in, target, data_range=1.0)
    theirs = structural_similarity_index_measure(theirs_in, target, data_range=1.0)
    assert 0.2 < theirs.item() < 0.95
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-5, atol=1e-9)
    assert ssim(target, target).item() == pytest.approx(1.0, abs=1e-6)
