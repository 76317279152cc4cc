"""The settings of a purifier, in one object that validates, saves and loads itself."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from purifyguard.files import read_json, write_json
from purifyguard.samplers import get_sampler, sampler_names
from purifyguard.validation import check_bool, check_int

CONFIG_VERSION = 1

SAMPLERS = ("ddpm", "ddim")  # the built-in samplers; others join with register_sampler
GUIDANCE_MODES = ("none", "pixel", "adversarial")
GRADIENT_MODES = ("full", "bpda", "surrogate")
SCALE_SCHEDULES = ("variance", "constant")
GUIDANCE_INPUTS = ("x0_hat", "x_t")
DISTANCES = ("l2", "cosine")


@dataclass
class PurifierConfig:
    """How a purifier noises, denoises and guides.

    Every field has a default; `replace(**changes)` returns a validated copy, and
    `validate()` names the first setting of the wrong type or out of range.

    Attributes:
        t_star: Purification level, an integer diffusion step in [0, T] (T the schedule's
            steps); the input is noised to t_star and denoised back. t_star = 0 is the identity.
        sampler: The reverse process: "ddpm" (t_star ancestral steps), "ddim" (n_steps steps on
            a sub-sequence, with eta), or any name registered with
            purifyguard.samplers.register_sampler.
        n_steps: Steps of "ddim" (and of any sampler that sets uses_n_steps); None means
            min(10, t_star). Checked under "ddpm" too, so a later switch to "ddim" is valid.
        eta: DDIM's noise in [0, 1]: 0 is deterministic after the forward noising, 1 is
            DDPM-like.
        guidance: "none" (unguided, DiffPure-style), "pixel" (toward the input in pixel space,
            GDMP-style) or "adversarial" (toward the input's latent representation in the
            guidance network, AGDM).
        guidance_scale: s in  mean <- mean - s_t * grad L  (a finite number >= 0; 0 turns the
            guidance off), with s_t as scale_schedule says.
        scale_schedule: How s_t follows s: "variance" gives s_t = s * (1 - abar_t / abar_prev)
            (beta_t for one DDPM step), "constant" gives s_t = s.
        guidance_on: Where the adversarial guidance reads the sample: "x0_hat" (the denoiser's
            estimate of clean data) or "x_t" itself.
        distance: D in the guidance network's latent space: squared "l2" or "cosine".
        class_weight: lambda of the optional class term  -lambda * log p(y_hat | x0_hat)
            (>= 0; 0 leaves it out).
        gradient_mode: What an attacker's backward sees: "full" (through every step, the
            guidance term included), "bpda" (the identity) or "surrogate" (the cheaper process
            below).
        surrogate_sampler: The sampler a "surrogate" backward runs.
        surrogate_steps: Its steps (>= 1).
        checkpointing: Recompute each reverse step in the backward instead of storing it (less
            memory for full gradients, more time).
        fixed_noise: Draw the same noise on every call (seeded with noise_seed), for
            deterministic evaluation; a seed or generator given to purify still wins.
        noise_seed: The seed of fixed_noise, an integer in [0, 2**63).
        resolution: The denoiser's image size; read off the denoiser when the purifier is
            built. PurifiedModel resizes to it and back.
        channels: The denoiser's image channels; read off the denoiser like resolution.
            PurifiedModel converts 1 <-> 3 channels to it and back.
        training_data: What the denoiser was trained on, for the model card (None: not
            recorded).
        extra: JSON values saved with the purifier, such as the training record that the model
            card shows.
        guidance_layer: Where the adversarial guidance reads the guidance network's features:
            None for the pre-logit features (timm's forward_head(pre_logits=True), or the input
            of the last nn.Linear of any other network), or the name of a layer
            (network.get_submodule), whose output is read.
    """

    t_star: int = 100
    sampler: str = "ddpm"
    n_steps: int | None = None
    eta: float = 0.0
    guidance: str = "none"
    guidance_scale: float = 0.0
    scale_schedule: str = "variance"
    guidance_on: str = "x0_hat"
    distance: str = "l2"
    class_weight: float = 0.0
    gradient_mode: str = "full"
    surrogate_sampler: str = "ddim"
    surrogate_steps: int = 5
    checkpointing: bool = False
    fixed_noise: bool = False
    noise_seed: int = 0
    resolution: int | None = None
    channels: int | None = None
    training_data: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    guidance_layer: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def nfe(self) -> int:
        """Denoiser evaluations of one purification."""
        if self.t_star == 0:
            return 0
        return get_sampler(self.sampler).n_evaluations(self.t_star, self.ddim_steps)

    @property
    def ddim_steps(self) -> int:
        """k, the DDIM steps: n_steps, or min(10, t*) when it is not set."""
        return min(10, self.t_star) if self.n_steps is None else self.n_steps

    def validate(self, num_train_timesteps: int | None = None) -> None:
        """Raise ValueError naming the first setting of the wrong type or out of range."""
        for name, kind in _FIELD_TYPES.items():
            _check_type(name, getattr(self, name), kind)
        _check_choice("sampler", self.sampler, sampler_names())
        _check_choice("guidance", self.guidance, GUIDANCE_MODES)
        _check_choice("gradient_mode", self.gradient_mode, GRADIENT_MODES)
        _check_choice("scale_schedule", self.scale_schedule, SCALE_SCHEDULES)
        _check_choice("guidance_on", self.guidance_on, GUIDANCE_INPUTS)
        _check_choice("distance", self.distance, DISTANCES)
        _check_choice("surrogate_sampler", self.surrogate_sampler, sampler_names())
        if self.t_star < 0:
            raise ValueError(f"t_star must be a non-negative integer step, got {self.t_star!r}")
        if num_train_timesteps is not None and self.t_star > num_train_timesteps:
            raise ValueError(
                f"t_star={self.t_star} is out of range: the schedule has "
                f"{num_train_timesteps} steps, so t_star must lie in [0, {num_train_timesteps}]"
            )
        if self.n_steps is not None or get_sampler(self.sampler).uses_n_steps:
            # Checked under ddpm too: a value that a later switch to ddim would use must be valid.
            _check_steps("n_steps", self.ddim_steps, self.t_star)
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {self.eta!r}")
        for name in ("guidance_scale", "class_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.guidance_layer is not None and not self.guidance_layer.strip():
            raise ValueError(
                "guidance_layer must name a layer of the guidance network (e.g. 'layer4') or be "
                f"None, got {self.guidance_layer!r}"
            )
        if self.surrogate_steps < 1:
            raise ValueError(f"surrogate_steps must be >= 1, got {self.surrogate_steps!r}")
        if self.gradient_mode == "surrogate":
            surrogate_nfe = get_sampler(self.surrogate_sampler).n_evaluations(
                self.t_star, self.surrogate_steps)
            _check_steps("surrogate_steps", surrogate_nfe, self.t_star)
        if not 0 <= self.noise_seed < 2**63:
            raise ValueError(f"noise_seed must be an integer in [0, 2**63), got {self.noise_seed!r}")
        for name in ("resolution", "channels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        try:
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"extra must hold JSON values only (it is saved with the purifier): {error}"
            ) from None

    def replace(self, **changes: Any) -> PurifierConfig:
        """A copy with some settings changed (validated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown purifier settings: {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values, with the config version (as purifier_config.json holds
        them)."""
        values = dataclasses.asdict(self)
        if values["guidance_layer"] is None:  # so that purifyguard versions before it read it
            del values["guidance_layer"]
        return {"config_version": CONFIG_VERSION, **values}

    @classmethod
    def from_dict(
        cls, values: dict[str, Any], source: str | Path = "purifier config"
    ) -> PurifierConfig:
        """The config of a saved dict; ValueError naming the source and the bad setting."""
        if not isinstance(values, dict):
            raise ValueError(f"{source} must be a mapping of settings, got {type(values).__name__}")
        values = dict(values)
        version = values.pop("config_version", None)
        if version != CONFIG_VERSION:
            raise ValueError(
                f"{source}: purifier config version {version!r} is not supported by this "
                f"purifyguard (it reads version {CONFIG_VERSION}); upgrade purifyguard or "
                "re-export the purifier"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{source} has unknown keys: {sorted(unknown)}")
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    def save(self, path: str | Path) -> None:
        """Write to_dict() to a JSON file."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> PurifierConfig:
        """Read a JSON file that save() wrote (checked by from_dict)."""
        return cls.from_dict(read_json(path, "purifier config"), path)


# The type of each setting; "?" allows None. Ints and numbers refuse bools and strings, and
# booleans refuse the strings "false" and "no" (which Python would take as true).
_FIELD_TYPES = {
    "t_star": "int", "sampler": "str", "n_steps": "int?", "eta": "number", "guidance": "str",
    "guidance_scale": "number", "scale_schedule": "str", "guidance_on": "str", "distance": "str",
    "class_weight": "number", "gradient_mode": "str", "surrogate_sampler": "str",
    "surrogate_steps": "int", "checkpointing": "bool", "fixed_noise": "bool", "noise_seed": "int",
    "resolution": "int?", "channels": "int?", "training_data": "str?", "extra": "dict",
    "guidance_layer": "str?",
}


def _check_type(name: str, value: Any, kind: str) -> None:
    if value is None and kind.endswith("?"):
        return
    kind = kind.rstrip("?")
    if kind == "int":
        check_int(name, value)
    elif kind == "number":
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    elif kind == "bool":
        check_bool(name, value)
    elif not isinstance(value, {"str": str, "dict": dict}[kind]):
        expected = "a string" if kind == "str" else "a mapping"
        raise ValueError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_steps(name: str, steps: int | None, t_star: int) -> None:
    if steps < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {steps!r}")
    if steps > t_star:
        raise ValueError(f"{name}={steps} exceeds t_star={t_star}: k steps must satisfy k <= t*")
    if t_star > 0 and steps == 0:
        raise ValueError(f"{name} must be >= 1 when t_star > 0")
