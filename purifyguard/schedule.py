"""The discrete DDPM noise schedule, read from a diffusers scheduler config."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler
from torch import nn


class NoiseSchedule(nn.Module):
    """abar_t = prod_{s<=t} (1 - beta_s) for the steps t = 0 .. T-1 of a diffusers DDPM schedule.

    Step indices follow diffusers: index 0 is the least noisy step. Purifying at level t*
    noises with abar[t* - 1] and denoises through the indices t* - 1, ..., 0.
    """

    def __init__(self, scheduler_config: dict[str, Any] | DDPMScheduler | None = None) -> None:
        super().__init__()
        if isinstance(scheduler_config, DDPMScheduler):
            scheduler = scheduler_config
        elif scheduler_config is None or isinstance(scheduler_config, dict):
            try:
                scheduler = DDPMScheduler.from_config(dict(scheduler_config or {}))
            except (TypeError, ValueError, NotImplementedError) as error:
                raise ValueError(f"invalid scheduler config {scheduler_config}: {error}") from None
        else:
            raise ValueError(
                "scheduler_config must be a diffusers DDPMScheduler, a dict of its config or None, "
                f"got {type(scheduler_config).__name__}"
            )
        prediction = scheduler.config.prediction_type
        if prediction != "epsilon":
            raise ValueError(f"the denoiser must predict epsilon, its scheduler says {prediction!r}")
        _check_betas(scheduler.betas)
        self.scheduler_config = dict(scheduler.config)
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.double(), persistent=False)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def abar(self, index: int, like: torch.Tensor) -> torch.Tensor:
        """abar at a step index as a scalar of like's dtype; index -1 means clean data (abar = 1)."""
        value = 1.0 if index < 0 else float(self.alphas_cumprod[index])
        return torch.tensor(value, dtype=like.dtype, device=like.device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        """Forward diffusion: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        abar = self.abar(index, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, eps_hat: torch.Tensor, index: int) -> torch.Tensor:
        """x0_hat(x_t) = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)."""
        abar = self.abar(index, x_t)
        return (x_t - (1 - abar).sqrt() * eps_hat) / abar.sqrt()


def _check_betas(betas: torch.Tensor) -> None:
    """A usable noise schedule has every beta_t in (0, 1): beta_t >= 1 erases the signal and
    makes abar_t zero or negative, which saturates or NaNs every purified pixel."""
    bad = ~(torch.isfinite(betas) & (betas > 0) & (betas < 1))
    if bad.any():
        step = int(bad.nonzero()[0])
        raise ValueError(
            f"the noise schedule has beta_{step} = {float(betas[step]):.4g}; every beta_t must lie "
            "in (0, 1) (check beta_start, beta_end and trained_betas of the scheduler config)"
        )
