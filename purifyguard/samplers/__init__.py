"""Reverse-process samplers, registered by name (purifyguard.samplers.registry).

Importing the package registers the built-ins, DDPM and DDIM, one file each next to its equation.
"""

from purifyguard.samplers.ddim import DDIMSampler, ddim_indices, ddim_step
from purifyguard.samplers.ddpm import DDPMSampler, ddpm_indices, ddpm_step
from purifyguard.samplers.registry import (
    Sampler,
    get_sampler,
    register_sampler,
    sampler_names,
    unregister_sampler,
)


def reverse_indices(sampler: str, t_star: int, n_steps: int | None) -> list[tuple[int, int]]:
    """(index, prev) pairs from t* - 1 down to clean data."""
    return get_sampler(sampler).indices(t_star, t_star if n_steps is None else n_steps)


__all__ = [
    "DDIMSampler", "DDPMSampler", "Sampler", "ddim_indices", "ddim_step", "ddpm_indices",
    "ddpm_step", "get_sampler", "register_sampler", "reverse_indices", "sampler_names",
    "unregister_sampler",
]
