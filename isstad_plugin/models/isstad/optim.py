"""AdamW at the device's speed: one fused kernel over all parameters instead of a Python loop per tensor.

torch picks the ``foreach`` implementation by default on CUDA only; on a CPU AdamW runs its single-tensor loop
(31 % of a vit_tiny training profile, issue #15). The fused kernel (CPU and CUDA since torch 2.4) computes the
same update (tests/models/isstad/test_optim.py compares them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

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
    on biases and other 1-D parameters (norms, tokens of one row), as timm's ``param_groups_weight_decay``;
    empty groups are left out. ``options`` (e.g. ``lr``) go into both groups."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad and include(param):
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0, **options}, {"params": decay, "weight_decay": weight_decay,
                                                                       **options}]
    return [group for group in groups if group["params"]]
