"""Ancestral DDPM sampling (Ho et al., 2020): every step t*, t* - 1, ..., 1."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from purifyguard.samplers.registry import Sampler, register_sampler

if TYPE_CHECKING:
    from purifyguard.schedule import NoiseSchedule


def ddpm_indices(t_star: int) -> list[tuple[int, int]]:
    return [(index, index - 1) for index in range(t_star - 1, -1, -1)]


def ddpm_step(
    schedule: NoiseSchedule, x_t: torch.Tensor, eps_hat: torch.Tensor, index: int, prev: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and standard deviation of x_{t-1} given x_t.

    mu = (x_t - beta_t / sqrt(1 - abar_t) * eps_hat) / sqrt(alpha_t)
    sigma^2 = beta_t * (1 - abar_{t-1}) / (1 - abar_t)        (the "fixed small" variance)
    """
    abar_t = schedule.abar(index, x_t)
    abar_prev = schedule.abar(prev, x_t)
    alpha_t = abar_t / abar_prev
    beta_t = 1 - alpha_t
    mean = (x_t - beta_t / (1 - abar_t).sqrt() * eps_hat) / alpha_t.sqrt()
    variance = beta_t * (1 - abar_prev) / (1 - abar_t)
    return mean, variance.sqrt()


@register_sampler("ddpm")
class DDPMSampler(Sampler):
    """Every step below t*, each adding noise (eta does not apply)."""

    def indices(self, t_star: int, n_steps: int) -> list[tuple[int, int]]:
        return ddpm_indices(t_star)

    def step(self, schedule, x_t, eps_hat, index, prev, eta):
        return ddpm_step(schedule, x_t, eps_hat, index, prev)

    def stochastic(self, eta: float) -> bool:
        return True
