"""Checks of numeric constructor arguments, so a bad value fails when the model is built, naming the option.

jsonargparse accepts ``--model.stage2_lr .nan`` or ``inf`` for a ``float``; training would then run to its first
NaN loss (or silently not learn). :func:`check_numbers` refuses them up front.

Example:
    >>> check_numbers(positive={"lr": float("nan")})
    Traceback (most recent call last):
    ...
    ValueError: lr must be a finite number > 0, got nan.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from isstad_plugin.errors import input_error


def check_numbers(positive: Mapping[str, float] | None = None, non_negative: Mapping[str, float] | None = None,
                  fractions: Mapping[str, float] | None = None) -> None:
    """Refuse NaN, infinite and out-of-range values.

    Args:
        positive: options that must be finite and > 0.
        non_negative: options that must be finite and >= 0 (0 usually switches something off).
        fractions: options that must lie in [0, 1].

    Raises:
        ValueError: naming the first bad option, its value and the range it needs.
    """
    rules = [(positive, "a finite number > 0", lambda v: v > 0),
             (non_negative, "a finite number >= 0 (0 switches it off)", lambda v: v >= 0),
             (fractions, "in [0, 1]", lambda v: 0 <= v <= 1)]
    for values, wanted, holds in rules:
        for name, value in (values or {}).items():
            if not (isinstance(value, int | float) and math.isfinite(value) and holds(value)):
                msg = f"{name} must be {wanted}, got {value}."
                raise input_error(msg)
