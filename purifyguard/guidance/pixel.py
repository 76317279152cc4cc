"""GDMP-style pixel guidance (Wang et al., 2022): pull x_t toward the input noised to level t."""

from __future__ import annotations

import torch
from torch import nn

from purifyguard.schedule import NoiseSchedule


class PixelGuidance(nn.Module):
    """L(x_t, x_in) = ||x_t - sqrt(abar_t) x0_in||^2 per sample, x0_in = 2 x_in - 1.

    sqrt(abar_t) x0_in is the mean of the input noised to step t, so the gradient
    2 (x_t - sqrt(abar_t) x0_in) is GDMP's guidance without the variance of a fresh noise draw.
    """

    reads_x0_hat = False

    def prepare(self, x_in: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x0_in": 2 * x_in - 1}

    def loss(
        self, x_t: torch.Tensor, x0_hat: torch.Tensor | None, index: int,
        schedule: NoiseSchedule, target: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        abar_t = schedule.abar(index, x_t)
        return (x_t - abar_t.sqrt() * target["x0_in"]).pow(2).flatten(1).sum(1)
