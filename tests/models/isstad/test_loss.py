"""Stage-2 SSIM is torchmetrics' SSIM (values and gradients), in a layout that runs faster on CPUs."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from isstad_plugin.models.isstad.loss import _ssim_fp32, ssim


@pytest.mark.parametrize("shape", [(4, 3, 64, 64), (2, 3, 48, 80), (3, 1, 32, 32)], ids=["square", "wide", "gray"])
def test_ssim_equals_torchmetrics_in_value_and_gradient(shape: tuple[int, ...]) -> None:
    """The same arithmetic, checked in float64 (where summation order cannot hide a difference, on any CPU), and the
    float32 loss within float32 rounding of torchmetrics' (the two sum in another order: the CPU's vector width and
    oneDNN's kernel choice move the last bits)."""
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(shape, generator=generator, dtype=torch.float64)
    # a reconstruction-like input: the target plus noise, so SSIM sits well inside (0, 1)
    noisy = (target + 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    for dtype, value_tolerance, gradient_tolerance in ((torch.float64, 1e-12, 1e-12), (torch.float32, 1e-6, 1e-5)):
        ours_in = noisy.to(dtype).clone().requires_grad_(True)
        theirs_in = noisy.to(dtype).clone().requires_grad_(True)
        ours = ssim(ours_in, target.to(dtype), data_range=1.0) if dtype == torch.float32 else \
            _ssim_fp32(ours_in, target, data_range=1.0, sigma=1.5)  # ssim() itself always computes in float32
        theirs = structural_similarity_index_measure(theirs_in, target.to(dtype), data_range=1.0)
        assert ours.dtype == theirs.dtype == dtype
        assert 0.2 < theirs.item() < 0.95
        torch.testing.assert_close(ours, theirs, rtol=value_tolerance, atol=value_tolerance)
        ours.backward()
        theirs.backward()
        scale = theirs_in.grad.abs().max().item()
        torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=gradient_tolerance,
                                   atol=gradient_tolerance * scale)
    assert ssim(target.float(), target.float()).item() == pytest.approx(1.0, abs=1e-6)


def test_a_deferred_finite_check_names_the_first_bad_step_without_reading_every_loss() -> None:
    """On a GPU the loss is not read every step (that stalls the host); the first non-finite step is kept on the
    device and reported at the next read, every ``interval`` steps."""
    from types import SimpleNamespace

    from isstad_plugin.models.isstad.loss import FiniteLossGuard

    guard = FiniteLossGuard(interval=3, deferred=True)
    module = SimpleNamespace(global_step=0, current_epoch=0, stage=2, _trainer=SimpleNamespace(is_last_batch=False))
    losses = [1.0, 0.9, float("nan"), float("inf"), 0.8]
    for step, value in enumerate(losses[:-1]):
        module.global_step = step + 1
        if module.global_step % 3 == 0:
            with pytest.raises(FloatingPointError, match=r"stage-2 loss is nan at global step 3 \(epoch 0, stage 2\)"):
                guard.check(torch.tensor(value), "stage-2 loss", module)
            break
        guard.check(torch.tensor(value), "stage-2 loss", module)
    else:
        pytest.fail("the guard never read the loss")
    clean = FiniteLossGuard(interval=3, deferred=True)
    module.global_step, module._trainer.is_last_batch = 1, True  # the epoch's last batch is always read
    clean.check(torch.tensor(0.5), "stage-2 loss", module)
