"""The sampler registry: a reverse process by name, as timm's models are.

A sampler says which steps to visit from t* down to clean data and maps x_t (at step index
`index`) to the mean and standard deviation of x_prev (at `prev`, where -1 is clean data).
Guidance shifts the mean; the purifier adds std * noise. To add one, subclass `Sampler` in a file
of its own and decorate it with `register_sampler("name")`; `PurifierConfig(sampler="name")`
then runs it (docs/architecture.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from purifyguard.schedule import NoiseSchedule


class Sampler(ABC):
    """One reverse process. `uses_n_steps`: whether the config's n_steps sets how many steps it
    visits (DDIM) or it visits every step below t* (DDPM)."""

    name: str = ""
    uses_n_steps: bool = False

    @abstractmethod
    def indices(self, t_star: int, n_steps: int) -> list[tuple[int, int]]:
        """(index, prev) pairs from t* - 1 down to clean data (prev = -1)."""

    @abstractmethod
    def step(
        self, schedule: NoiseSchedule, x_t: torch.Tensor, eps_hat: torch.Tensor, index: int,
        prev: int, eta: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of x_prev given x_t and the denoiser's eps_hat."""

    @abstractmethod
    def stochastic(self, eta: float) -> bool:
        """Whether the step adds noise (std > 0) at this eta."""

    def n_evaluations(self, t_star: int, n_steps: int) -> int:
        """Denoiser evaluations of one purification."""
        return n_steps if self.uses_n_steps else t_star


_SAMPLERS: dict[str, Sampler] = {}


def register_sampler(name: str) -> Callable[[type[Sampler]], type[Sampler]]:
    """Class decorator: register a Sampler subclass under `name` (one instance is kept)."""
    if not isinstance(name, str) or not name.strip() or name != name.strip().lower():
        raise ValueError(f"sampler name must be a non-empty lower-case string, got {name!r}")

    def decorate(cls: type[Sampler]) -> type[Sampler]:
        if not (isinstance(cls, type) and issubclass(cls, Sampler)):
            raise ValueError(f"register_sampler({name!r}) decorates a Sampler subclass, got {cls!r}")
        if name in _SAMPLERS and type(_SAMPLERS[name]) is not cls:
            raise ValueError(f"a sampler is already registered as {name!r}: {_SAMPLERS[name]!r}")
        cls.name = name
        _SAMPLERS[name] = cls()
        return cls

    return decorate


def sampler_names() -> tuple[str, ...]:
    """The registered samplers' names, built-ins first."""
    return tuple(_SAMPLERS)


def get_sampler(name: str) -> Sampler:
    if name not in _SAMPLERS:
        raise ValueError(f"sampler must be one of {list(_SAMPLERS)}, got {name!r}")
    return _SAMPLERS[name]


def unregister_sampler(name: str) -> None:
    """Remove a registered sampler (tests and interactive sessions)."""
    _SAMPLERS.pop(name, None)
