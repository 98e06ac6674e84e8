"""ISSTAD losses: MAE masked-patch MSE (stage 1) and the pixel-level stage-2 objective."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def masked_patch_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE loss: per-patch MSE averaged over hidden patches only.

    Args:
        prediction: ``[B, L, p*p*3]`` predicted patches.
        target: ``[B, L, p*p*3]`` raw (normalised, not per-patch normalised) patches.
        mask: ``[B, L]``, 1 for hidden patches.
    """
    per_patch = (prediction - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def gaussian_window(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torchmetrics' normalised 2-D Gaussian SSIM window ``[k, k]``, ``k = 2 * int(3.5 * sigma + 0.5) + 1``.

    Computed as torchmetrics computes it: kornia's ``get_gaussian_kernel2d`` differs by ~2e-9, which moves SSIM
    gradients off torchmetrics' beyond what tests/models/isstad/test_loss.py allows.
    """
    size = int(3.5 * sigma + 0.5) * 2 + 1
    distance = torch.arange((1 - size) / 2, (1 + size) / 2, 1.0, dtype=dtype, device=device)
    gauss = torch.exp(-((distance / sigma) ** 2) / 2)
    gauss = gauss / gauss.sum()
    return torch.outer(gauss, gauss)


def ssim(preds: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM of ``[B, C, H, W]`` images: torchmetrics' ``structural_similarity_index_measure`` (Gaussian
    window, sigma 1.5, reflect padding, mean over the full image), equal within float32 rounding; always
    computed in float32, also under autocast (where torchmetrics would mix precisions).

    Same arithmetic, other layout: the 5 local-statistics maps of every image and channel are the channels of
    one image, filtered by one depthwise convolution. oneDNN runs that about 4x faster on a CPU than torchmetrics'
    ``[5 B, C, H, W]`` batch with 3 channels, where SSIM took half of a 224 px stage-2 step
    (``docs/benchmarks/stage2-profile.md``).
    """
    with torch.autocast(preds.device.type, enabled=False):
        return _ssim_fp32(preds.float(), target.float(), data_range, sigma)


def _ssim_fp32(preds: torch.Tensor, target: torch.Tensor, data_range: float, sigma: float) -> torch.Tensor:
    batch, channels, height, width = preds.shape
    window = gaussian_window(sigma, preds.dtype, preds.device)
    pad = (window.shape[-1] - 1) // 2
    preds = F.pad(preds, (pad, pad, pad, pad), mode="reflect")
    target = F.pad(target, (pad, pad, pad, pad), mode="reflect")
    maps = torch.cat((preds, target, preds * preds, target * target, preds * target))  # [5 B, C, H', W']
    n = maps.shape[0] * channels
    local = F.conv2d(maps.reshape(1, n, *maps.shape[-2:]), window.expand(n, 1, *window.shape), groups=n)
    mu_p, mu_t, p_sq, t_sq, p_t = local.reshape(5, batch, channels, height, width).unbind(0)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_pp, mu_tt, mu_pt = mu_p.pow(2), mu_t.pow(2), mu_p * mu_t
    sigma_pp = torch.clamp(p_sq - mu_pp, min=0.0)
    sigma_tt = torch.clamp(t_sq - mu_tt, min=0.0)
    sigma_pt = p_t - mu_pt
    index = ((2 * mu_pt + c1) * (2 * sigma_pt + c2)) / ((mu_pp + mu_tt + c1) * (sigma_pp + sigma_tt + c2))
    return index.reshape(batch, -1).mean(-1).mean()


class Stage2LossTerms(NamedTuple):
    """The stage-2 loss and its parts (each a scalar tensor)."""

    total: torch.Tensor
    cross_entropy: torch.Tensor
    mse: torch.Tensor
    ssim: torch.Tensor


class Stage2Loss(nn.Module):
    """Weighted CE over every decoder block + ``mse_weight`` MSE + ``ssim_weight`` (1 - SSIM).

    Args:
        class_weights: CE weights ``(normal, anomalous)``; the method uses ``(3.0, 1.0)``.
        mse_weight: Weight of the reconstruction MSE (normalised space).
        ssim_weight: Weight of ``1 - SSIM`` computed on the [0, 1] images.
    """

    def __init__(
        self,
        class_weights: tuple[float, float] = (3.0, 1.0),
        mse_weight: float = 0.5,
        ssim_weight: float = 0.1,
    ) -> None:
        super().__init__()
        if len(class_weights) != 2 or min(class_weights) < 0:
            msg = f"ce_class_weights must be two non-negative numbers (normal, anomalous), got {class_weights}."
            raise ValueError(msg)
        self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32), persistent=False)
        self.mse_weight = mse_weight
        self.ssim_weight = ssim_weight

    def forward(
        self,
        block_logits: torch.Tensor,
        anomaly_mask: torch.Tensor,
        reconstruction: torch.Tensor,
        target: torch.Tensor,
        reconstruction_01: torch.Tensor,
        target_01: torch.Tensor,
    ) -> Stage2LossTerms:
        """Compute the loss.

        Args:
            block_logits: ``[D, B, 2, H, W]`` per-block pixel-status logits.
            anomaly_mask: ``[B, 1, H, W]`` pixel label (1 = corrupted).
            reconstruction: ``[B, 3, H, W]`` reconstruction, normalised space.
            target: ``[B, 3, H, W]`` reconstruction target, normalised space.
            reconstruction_01: reconstruction mapped back to [0, 1] for SSIM.
            target_01: target in [0, 1] for SSIM.
        """
        depth, batch = block_logits.shape[:2]
        labels = anomaly_mask.squeeze(1).long().unsqueeze(0).expand(depth, -1, -1, -1)
        # Every block has the same labels, so the weighted mean over all blocks equals the mean of the
        # per-block weighted means.
        cross_entropy = F.cross_entropy(
            block_logits.flatten(0, 1).float(),
            labels.flatten(0, 1),
            weight=self.class_weights,
        )
        mse = F.mse_loss(reconstruction, target)
        similarity = ssim(reconstruction_01.float(), target_01.float(), data_range=1.0)
        total = cross_entropy + self.mse_weight * mse + self.ssim_weight * (1 - similarity)
        return Stage2LossTerms(total, cross_entropy, mse, similarity)


def non_finite_loss(what: str, value: float, step: int, epoch: int, stage: int) -> FloatingPointError:
    """The error that stops training on a NaN or infinite loss: what, where, and the likely causes."""
    return FloatingPointError(
        f"ISSTAD: the {what} is {value} at global step {step} (epoch {epoch}, stage {stage}). Likely causes: a "
        "learning rate too high for this batch size (lower stage1_base_lr / stage2_lr), images with NaN/inf values, "
        "or fp16 overflow (use bf16-mixed or 32-true precision)."
    )


def check_finite(loss: torch.Tensor, what: str, module: Any) -> None:  # noqa: ANN401
    """Stop training on a NaN or infinite ``loss``, naming it (``what``), the ``module``'s step and likely causes."""
    if not torch.isfinite(loss):
        raise non_finite_loss(what, loss.item(), module.global_step, module.current_epoch, module.stage)


class FiniteLossGuard:
    """:func:`check_finite` without a host-device synchronisation per step on an accelerator.

    On the CPU every step is checked at once (it costs nothing). On a GPU, reading a loss value stalls the host until
    the step finished, so the next step cannot be queued behind it; the guard instead keeps the first non-finite
    step (and its loss) on the device and reads it every ``interval`` steps and on each epoch's last batch, then
    stops training naming that step, as :func:`check_finite` does.
    """

    def __init__(self, interval: int = 50, deferred: bool | None = None) -> None:
        self.interval = interval
        self.deferred = deferred  # None: on accelerators only
        self._first: torch.Tensor | None = None  # [step, loss, stage] of the first non-finite loss; step -1: none
        self._what: dict[int, str] = {}

    def check(self, loss: torch.Tensor, what: str, module: Any) -> None:  # noqa: ANN401
        if not (self.deferred if self.deferred is not None else loss.device.type != "cpu"):
            check_finite(loss, what, module)
            return
        value = loss.detach().float()
        here = torch.stack([torch.full_like(value, module.global_step), value, torch.full_like(value, module.stage)])
        if self._first is None or self._first.device != value.device:
            self._first = torch.tensor([-1.0, 0.0, 0.0], device=value.device)
        unseen = (~torch.isfinite(value)) & (self._first[0] < 0)
        self._first = torch.where(unseen, here, self._first)
        self._what[module.stage] = what
        trainer = getattr(module, "_trainer", None)
        if module.global_step % self.interval == 0 or getattr(trainer, "is_last_batch", True):
            step, bad, stage = self._first.tolist()
            if step >= 0:
                raise non_finite_loss(self._what[int(stage)], bad, int(step), module.current_epoch, int(stage))
