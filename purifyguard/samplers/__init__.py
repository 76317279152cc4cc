"""Reverse-process samplers: which steps to visit, and one step's mean and noise scale.

A sampler step maps x_t (at step index `index`) to the mean and standard deviation of x_prev
(at `prev`, where -1 is clean data). Guidance shifts the mean; the purifier adds std * noise.
"""

from purifyguard.samplers.ddim import ddim_indices, ddim_step
from purifyguard.samplers.ddpm import ddpm_indices, ddpm_step


def reverse_indices(sampler: str, t_star: int, n_steps: int | None) -> list[tuple[int, int]]:
    """(index, prev) pairs from t* - 1 down to clean data."""
    if sampler == "ddpm":
        return ddpm_indices(t_star)
    return ddim_indices(t_star, n_steps)


__all__ = ["ddim_indices", "ddim_step", "ddpm_indices", "ddpm_step", "reverse_indices"]
