"""ISSTAD's optimisers and learning-rate schedules, per stage, and AdamW at the device's speed.

:func:`stage_optimizer` builds what ``Isstad.configure_optimizers`` returns: stage 1 is MAE's recipe (AdamW, the
rate scaled by the effective batch, per-step linear warm-up then half-cycle cosine), stage 2 the paper's (AdamW,
per-epoch cosine annealing; frozen parameters left out, trained encoder blocks at their own rate).

:func:`adamw` runs one fused kernel over all parameters instead of a Python loop per tensor.

torch picks the ``foreach`` implementation by default on CUDA only; on a CPU AdamW runs its single-tensor loop
(31 % of a vit_tiny training profile). The fused kernel (CPU and CUDA since torch 2.4) computes the
same update (tests/models/isstad/test_optim.py compares them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from .stages import StagePlan, warmup_cosine_factor

FUSED_DEVICES = {"cpu", "cuda"}


def adamw(
    groups: Iterable[dict[str, Any]], device: torch.device, fused: bool = True, **kwargs: Any,  # noqa: ANN401
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``groups``: fused where torch has the kernel for ``device`` (and ``fused``),
    else foreach (the same update, one kernel per operation over all tensors)."""
    speed = {"fused": True} if fused and device.type in FUSED_DEVICES else {"foreach": True}
    return torch.optim.AdamW(groups, **speed, **kwargs)


def weight_decay_groups(
    model: nn.Module, weight_decay: float, include: Callable[[nn.Parameter], bool], **options: Any,  # noqa: ANN401
) -> list[dict[str, Any]]:
    """Trainable parameters of ``model`` that ``include`` accepts, as AdamW groups: weight decay on weights, none
    on biases, other 1-D parameters (norms, tokens of one row) and those the model's ``no_weight_decay()`` names,
    as timm's ``param_groups_weight_decay``; empty groups are left out. ``options`` (e.g. ``lr``) go into both."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad and include(param):
            (no_decay if param.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0, **options}, {"params": decay, "weight_decay": weight_decay,
                                                                       **options}]
    return [group for group in groups if group["params"]]


def stage_optimizer(network: nn.Module, encoder_parameters: Iterable[nn.Parameter], stage: int, plan: StagePlan,
                    hparams: Any, trainer: Trainer, device: torch.device) -> dict[str, Any]:  # noqa: ANN401
    """AdamW and its schedule for ``stage`` of ``plan`` (stage 1 per step, stage 2 per epoch), as Lightning's
    ``configure_optimizers`` returns them; ``hparams`` are ``Isstad``'s."""
    hp = hparams
    fused = not (isinstance(trainer.precision_plugin, MixedPrecision) and trainer.gradient_clip_val)
    if stage == 1:
        steps_per_epoch = _steps_per_epoch(trainer)
        lr = hp.stage1_base_lr * _effective_batch_size(trainer) / 256
        groups = weight_decay_groups(network, hp.stage1_weight_decay, lambda _: True)
        optimizer = adamw(groups, device, fused, lr=lr, betas=tuple(hp.stage1_betas))
        warmup = plan.stage1_warmup_epochs * steps_per_epoch
        total = plan.stage1_epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
    encoder = {id(p) for p in encoder_parameters}
    groups = [  # frozen parameters are skipped; trained encoder blocks get their own learning rate
        *weight_decay_groups(network, hp.stage2_weight_decay, lambda p: id(p) not in encoder),
        *weight_decay_groups(network, hp.stage2_weight_decay, lambda p: id(p) in encoder,
                             lr=hp.stage2_lr * hp.stage2_encoder_lr_scale),
    ]
    optimizer = adamw(groups, device, fused, lr=hp.stage2_lr, betas=tuple(hp.stage2_betas))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=plan.stage2_cosine_epochs,
                                                           eta_min=hp.stage2_min_lr)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def _steps_per_epoch(trainer: Trainer) -> int:
    if not trainer.max_epochs or trainer.max_epochs < 1:
        return 1
    return max(1, trainer.estimated_stepping_batches // trainer.max_epochs)


def _effective_batch_size(trainer: Trainer) -> int:
    """The datamodule's training batch (32 when unknown) times accumulation times processes."""
    batch_size = getattr(trainer.datamodule, "train_batch_size", None) or 32
    return batch_size * trainer.accumulate_grad_batches * trainer.world_size
