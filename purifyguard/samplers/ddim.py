"""DDIM sampling (Song et al., 2021): k steps on a sub-sequence of [0, t*], with eta."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from purifyguard.samplers.registry import Sampler, register_sampler

if TYPE_CHECKING:
    from purifyguard.schedule import NoiseSchedule


def ddim_indices(t_star: int, n_steps: int) -> list[tuple[int, int]]:
    """k evenly spaced step indices from t* - 1 down to 0, each paired with the next one."""
    indices = torch.linspace(t_star - 1, 0, n_steps).round().long().tolist()
    return list(zip(indices, indices[1:] + [-1]))


def ddim_step(
    schedule: NoiseSchedule, x_t: torch.Tensor, eps_hat: torch.Tensor, index: int, prev: int,
    eta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of x_prev given x_t.

    x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)
    sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
    mean = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat
    """
    abar_t = schedule.abar(index, x_t)
    abar_prev = schedule.abar(prev, x_t)
    x0_hat = schedule.predict_x0(x_t, eps_hat, index)
    sigma = eta * ((1 - abar_prev) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_prev).sqrt()
    direction = (1 - abar_prev - sigma**2).clamp(min=0).sqrt()
    mean = abar_prev.sqrt() * x0_hat + direction * eps_hat
    return mean, sigma


@register_sampler("ddim")
class DDIMSampler(Sampler):
    """n_steps steps on a sub-sequence of [0, t*]; noise only where eta > 0."""

    uses_n_steps = True

    def indices(self, t_star: int, n_steps: int) -> list[tuple[int, int]]:
        return ddim_indices(t_star, n_steps)

    def step(self, schedule, x_t, eps_hat, index, prev, eta):
        return ddim_step(schedule, x_t, eps_hat, index, prev, eta)

    def stochastic(self, eta: float) -> bool:
        return eta > 0
