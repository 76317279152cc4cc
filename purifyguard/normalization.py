"""How a classifier wants its input: channels, resolution, mean and std, never guessed silently.

Where they come from, in order:

- explicit `mean` and `std` (and `input_size`, given to PurifiedModel);
- a torchvision weights enum member (`weights=`): its `transforms()` give mean, std and the crop
  size, as torchvision's own preprocessing for those weights does;
- a timm model's `pretrained_cfg`, through `timm.data.resolve_model_data_config`: the mean, std
  and input size that timm's own transforms (`timm.data.create_transform`) would use for it,
  also for a model created without pretrained weights (timm's convention: a model's config says
  how it wants its input);
- a torchvision model with none of the above is refused: torchvision models do not record the
  weights they were built with, and a model trained on your own data (CIFAR-10 at 32x32, say)
  need not want ImageNet statistics at 224x224;
- any other nn.Module: no normalisation (the identity; `normalization_source` says so, and a
  warning is logged), for classifiers that take [0, 1] images and normalise them themselves.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)


class Normalize(nn.Module):
    """(x - mean) / std per channel; the identity when mean and std are None."""

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        super().__init__()
        self.enabled = mean is not None
        if self.enabled:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        if not self.enabled:
            return "identity"
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def input_channels(model: nn.Module) -> int | None:
    """Channels of the first convolution, or None for a model without one."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def is_timm_model(model: nn.Module) -> bool:
    return hasattr(model, "pretrained_cfg") and type(model).__module__.startswith("timm.")


def is_torchvision_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("torchvision.models")


def resolve_input_config(
    model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    weights: object | None = None,
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None, int | None, str]:
    """(mean, std, resolution or None, where they came from) for a classifier.

    Order: explicit mean/std; a torchvision weights enum; a timm model's pretrained config;
    otherwise no normalisation. A torchvision model without mean/std or weights is refused
    (ValueError naming weights=, mean, std and input_size): it does not record its weights.
    """
    channels = input_channels(model)
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:
        mean, std = _numbers("mean", mean), _numbers("std", std)
        return (_fit(mean, channels, "mean", explicit=True),
                _fit(std, channels, "std", explicit=True), None, "explicit mean/std")
    if weights is not None:
        if not callable(getattr(weights, "transforms", None)):
            raise ValueError(
                "weights must be a torchvision weights enum member such as "
                f"ResNet18_Weights.IMAGENET1K_V1, got {weights!r} ({type(weights).__name__}); "
                "torchvision.models.get_weight('ResNet18_Weights.IMAGENET1K_V1') turns a name "
                "into one"
            )
        transforms = weights.transforms()
        resolution = _first(getattr(transforms, "crop_size", None))
        return (
            _fit(transforms.mean, channels), _fit(transforms.std, channels), resolution,
            f"weights {weights}",
        )
    if is_timm_model(model):
        import timm.data

        data_config = timm.data.resolve_model_data_config(model)
        cfg_channels, *size = data_config["input_size"]
        # A pretrained config describing other channels (in_chans=1 on an RGB recipe) says
        # nothing trustworthy about this model's resolution.
        resolution = size[0] if cfg_channels == channels else None
        source = f"timm pretrained_cfg of {model.pretrained_cfg.get('architecture', 'model')}"
        return (
            _fit(data_config["mean"], channels), _fit(data_config["std"], channels), resolution,
            source,
        )
    if is_torchvision_model(model):
        raise ValueError(torchvision_refusal(model))
    logger.warning(
        "%s is neither a timm nor a torchvision model: no normalisation applied; pass mean= and "
        "std= if it expects normalised input", type(model).__name__,
    )
    return None, None, None, "none (unknown model family)"


def torchvision_refusal(model: nn.Module) -> str:
    """Why a torchvision model without weights, mean or std is refused, and what to pass."""
    name = type(model).__name__
    return (
        f"cannot tell how this torchvision {name} wants its input: torchvision models do not "
        "record the weights they were built with. Pass weights=<the torchvision Weights enum "
        "member you loaded, e.g. torchvision.models.ResNet18_Weights.IMAGENET1K_V1, whose "
        "transforms() say how the model wants its input>, or, for a model trained on your own "
        "data, mean=..., std=... and input_size=... as it was trained (e.g. mean=(0.4914, "
        "0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), input_size=32 for a CIFAR-10 recipe; "
        "mean=(0.0,), std=(1.0,) for a model that takes [0, 1] images as they are)"
    )


def _numbers(name: str, values: object) -> tuple[float, ...]:
    """Explicit mean or std: a non-empty sequence of finite numbers (std also > 0)."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = (values,)
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    if (
        not isinstance(values, Sequence) or isinstance(values, str) or not values
        or any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values)
    ):
        raise ValueError(f"{name} must be a number or a sequence of numbers, got {values!r}")
    values = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must hold finite numbers, got {values}")
    if name == "std" and min(values) <= 0:
        raise ValueError(f"std must be > 0 in every channel (it divides the input), got {values}")
    return values


def _fit(
    values: Sequence[float], channels: int | None, name: str = "mean", explicit: bool = False
) -> tuple[float, ...]:
    """Match per-channel statistics to the model's channels. One value serves every channel;
    the RGB statistics of a pretrained config on a grey model become their average (an explicit
    mean or std must match the channels)."""
    values = tuple(float(v) for v in values)
    if channels is None or len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1 and len(values) == 3 and not explicit:
        return (sum(values) / len(values),)
    raise ValueError(
        f"{name} has {len(values)} values {values} for a {channels}-channel classifier; give one "
        f"value or {channels}"
    )


def _first(size: object) -> int | None:
    if size is None:
        return None
    return int(size[0]) if isinstance(size, (list, tuple)) else int(size)
