"""The checks every entry point runs on its arguments before work starts: each raises a ValueError
that names the argument, the value it got and what was expected."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

RANGE_TOLERANCE = 1e-3


def check_images(x: torch.Tensor, what: str = "images") -> torch.Tensor:
    """Validate a batch of images in [0, 1] shaped (N, C, H, W); clamp tiny range overshoots."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{what} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}"
            + (" (add a batch dimension with x.unsqueeze(0))" if x.dim() == 3 else "")
        )
    if not x.is_floating_point():
        raise ValueError(f"{what} must be floating point in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty, shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or Inf values")
    low, high = x.min().item(), x.max().item()
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"{what} must lie in [0, 1] (tolerance {RANGE_TOLERANCE}), got values in "
            f"[{low:.4g}, {high:.4g}]; pass unnormalised images, the model normalises itself"
        )
    return x.clamp(0, 1)


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """value as an int; ValueError unless it is an integer (not a bool) >= minimum."""
    expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def check_optional_int(name: str, value: Any, minimum: int | None = None) -> int | None:
    return None if value is None else check_int(name, value, minimum)


def check_number(name: str, value: Any, *, positive: bool = False,
                 non_negative: bool = False) -> float:
    """value as a finite float; ValueError for bools, strings, NaN, inf or the wrong sign."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    if non_negative and value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
