"""AdamW at the device's speed: one fused kernel over all parameters instead of a Python loop per tensor.

torch picks the ``foreach`` implementation by default on CUDA only; on a CPU AdamW runs its single-tensor loop
(a third of a vit_tiny training step's time here). The fused kernel (CPU and CUDA since torch 2.4) computes the
same update (tests/models/isstad/test_optim.py compares them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

FUSED_DEVICES = {"cpu", "cuda"}


def adamw(groups: Iterable[dict[str, Any]], device: torch.device, **kwargs: Any) -> torch.optim.AdamW:  # noqa: ANN401
    """``torch.optim.AdamW`` over ``groups``: fused where torch has the kernel for ``device``, else foreach."""
    speed = {"fused": True} if device.type in FUSED_DEVICES else {"foreach": True}
    return torch.optim.AdamW(groups, **speed, **kwargs)
