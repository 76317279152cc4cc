"""Checks that turn bad images into a ValueError naming the problem, before any network sees them."""

from __future__ import annotations

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
