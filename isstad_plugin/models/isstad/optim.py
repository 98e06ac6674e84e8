"""AdamW at the device's speed: one fused kernel over all parameters instead of a Python loop per tensor.

torch picks the ``foreach`` implementation by default on CUDA only; on a CPU AdamW runs its single-tensor loop
(31 % of a vit_tiny training profile, issue #15). The fused kernel (CPU and CUDA since torch 2.4) computes the
same update (tests/models/isstad/test_optim.py compares them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

FUSED_DEVICES = {"cpu", "cuda"}


def adamw(
    groups: Iterable[dict[str, Any]], device: torch.device, fused: bool = True, **kwargs: Any,  # noqa: ANN401
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``groups``: fused where torch has the kernel for ``device`` (and ``fused``),
    else foreach (the same update, one kernel per operation over all tensors)."""
    speed = {"fused": True} if fused and device.type in FUSED_DEVICES else {"foreach": True}
    return torch.optim.AdamW(groups, **speed, **kwargs)
