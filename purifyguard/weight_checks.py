"""Weight checks: loaded weights must fit their config and compute finite numbers.

Run on every network read from a folder: the tensors of a safetensors file must match the names
and shapes of the architecture its config.json names (checked before loading, naming the first
difference), no tensor may hold NaN or Inf, and the loaded purifier's denoiser and guidance
network must give finite outputs on a fixed input (weights that are finite but absurd, such as
random bytes, would purify every image to NaN).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

if TYPE_CHECKING:
    from diffusers import UNet2DModel

    from purifyguard.config import PurifierConfig


class LoadedPurifier(Protocol):
    """What check_outputs_finite calls of a purifier (purifyguard.Purifier has it)."""

    unet: UNet2DModel
    guidance_network: nn.Module | None
    config: PurifierConfig

    @property
    def resolution(self) -> int: ...

    @property
    def channels(self) -> int: ...


def check_weights_finite(module: nn.Module, path: Path) -> None:
    """ValueError naming the first tensor with NaN or Inf values: corrupt weights purify to NaN."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {name} holds NaN or Inf values; the file is corrupt")


@torch.no_grad()
def check_outputs_finite(purifier: LoadedPurifier, folder: Path) -> None:
    """One denoiser call (and one guidance-network call) on a fixed input must give finite
    outputs: weights that are finite but absurd (random bytes) would purify every image to NaN."""
    size, channels = purifier.resolution, purifier.channels
    generator = torch.Generator().manual_seed(0)
    dtype = purifier.unet.dtype
    x = torch.randn(1, channels, size, size, generator=generator).to(dtype)
    step = torch.full((1,), max(purifier.config.t_star, 1) - 1, dtype=torch.long)
    checks = [("denoiser", lambda: purifier.unet(x, step).sample)]
    if purifier.guidance_network is not None:
        checks.append(("guidance network", lambda: purifier.guidance_network((x + 1) / 2)))
    for what, call in checks:
        try:
            output = call()
        except RuntimeError as error:
            raise ValueError(f"{folder}: the {what} fails on a {tuple(x.shape)} input: {error}") \
                from None
        if not torch.isfinite(output).all():
            raise ValueError(
                f"{folder}: the {what} returns NaN or Inf on a normal input; its weights are "
                "corrupt"
            )


def check_weight_shapes(network: nn.Module, weights: Path) -> None:
    """ValueError naming the first tensor whose name or shape differs between the config's
    architecture and the weights file (and the file when it is not readable safetensors)."""
    try:
        with safe_open(str(weights), framework="pt") as file:
            stored = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights} is not a readable safetensors file: {error}") from None
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    if stored != expected:
        key = min(k for k in stored.keys() | expected.keys() if stored.get(k) != expected.get(k))
        raise ValueError(
            f"{weights} does not match the architecture of its config.json: tensor {key} is "
            f"{stored.get(key, 'absent')} in the file, {expected.get(key, 'absent')} in the "
            "architecture"
        )
