"""Shared fixtures: a tiny attention-bearing UNet, a tiny timm guidance network, a small batch.

Keep this file small; add new fixtures by appending.
"""

from __future__ import annotations

import pytest
import timm
import torch
from diffusers import UNet2DModel

from purifyguard import Purifier
from purifyguard.data import fashion_mnist

# One thread: the CPU is small and shared, and two threads under contention run many times slower.
torch.set_num_threads(1)


def make_unet(seed: int = 0) -> UNet2DModel:
    """A ~0.2M-parameter 1x28x28 denoiser with attention blocks (the double-backward pitfall,
    docs/method.md section 3)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()


def make_guidance_network(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "resnet10t", channels=(8, 16, 32, 64), num_classes=10, in_chans=1
    ).eval()


@pytest.fixture(scope="session")
def unet() -> UNet2DModel:
    return make_unet()


@pytest.fixture(scope="session")
def guidance_network() -> torch.nn.Module:
    return make_guidance_network()


@pytest.fixture
def make_purifier(unet, guidance_network):
    """Purifier factory sharing the session's networks: make_purifier(t_star=5, sampler="ddim", ...)."""

    def make(**settings) -> Purifier:
        settings.setdefault("t_star", 5)
        return Purifier(unet, guidance_network=guidance_network, **settings)

    return make


@pytest.fixture
def images() -> torch.Tensor:
    """Four 1x28x28 images in [0, 1] with some structure (a bright square on noise)."""
    generator = torch.Generator().manual_seed(1234)
    x = 0.3 * torch.rand(4, 1, 28, 28, generator=generator)
    x[:, :, 8:20, 8:20] += 0.6
    return x.clamp(0, 1)


@pytest.fixture
def fashion_mnist_here() -> None:
    """Skips the test that asks for it where Fashion-MNIST is not installed (CI installs it)."""
    try:
        fashion_mnist(download=False)
    except FileNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed here: {error}")
