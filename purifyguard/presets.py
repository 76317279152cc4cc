"""The built-in named purifiers, and what ships inside the package: Fashion-MNIST
classifiers, purifiers and 512 test images.

Importing this module fills the registry (purifyguard.registry) with the built-in entries: the
bundled Fashion-MNIST purifiers and the CIFAR-10 recipes from published weights. The package
imports it first, so every lookup sees them; their loaders import the purifier code only when
called.

Each bundled model is a folder in the Hub layout (see hub.py), ready to push to the Hub as it is;
its README.md says how it was trained and what it scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from purifyguard.registry import register_purifier

if TYPE_CHECKING:  # loaded with the models, so that listing them stays light
    import torch
    from torch import nn

    from purifyguard.purifier import Purifier

ASSETS = Path(__file__).parent / "assets"
CLASSIFIERS = {
    "fashion-mnist-resnet18": "standard training",
    "fashion-mnist-resnet18-trades": "TRADES adversarial training, L-inf eps = 0.1",
}


def bundled_classifier(name: str = "fashion-mnist-resnet18") -> nn.Module:
    """A bundled timm classifier (eval mode) taking 1x28x28 images in [0, 1]."""
    from purifyguard.hub import load_guidance_network

    if name not in CLASSIFIERS:
        raise ValueError(f"no bundled classifier {name!r}; bundled: {sorted(CLASSIFIERS)}")
    return load_guidance_network(ASSETS / "classifiers" / name)


def bundled_test_images() -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """The first 512 Fashion-MNIST test images in [0, 1], (512, 1, 28, 28), their labels and the
    class names."""
    from safetensors.torch import load_file

    from purifyguard.data import FASHION_MNIST_CLASSES

    tensors = load_file(ASSETS / "fashion-mnist-test-512.safetensors")
    return tensors["images"].float() / 255, tensors["labels"].long(), FASHION_MNIST_CLASSES


BUNDLED_PURIFIERS = {  # name: (description, default for 1x28x28 classifiers)
    "fashion-mnist-agdm": (
        ("adversarially guided purification (AGDM) with the bundled Fashion-MNIST denoiser and "
         "TRADES guidance network"), True,
    ),
    "fashion-mnist-ddpm": (
        "unguided DDPM purification (DiffPure-style) with the bundled Fashion-MNIST denoiser",
        False,
    ),
}


def _bundled_loader(name: str):
    def load() -> Purifier:
        from purifyguard.purifier import Purifier

        return Purifier.from_pretrained(ASSETS / "purifiers" / name)

    return load


for _name, (_description, _default) in BUNDLED_PURIFIERS.items():
    register_purifier(_name, channels=1, resolution=28, description=_description,
                      default=_default)(_bundled_loader(_name))


@register_purifier(
    "cifar10-ddpm", channels=3, resolution=32, default=True,
    description="Unguided DDPM purification at t*=100 with google/ddpm-cifar10-32 (downloaded "
    "from the Hub on first use)",
)
def _cifar10_ddpm() -> Purifier:
    from purifyguard.purifier import Purifier

    return Purifier.from_diffusers(
        "google/ddpm-cifar10-32", t_star=100, training_data="CIFAR-10 (training split)"
    )


def _cifar10_recipe(name: str, description: str) -> None:
    """Register a recipe of purifyguard.cifar10 (loaded, with its imports, only when used)."""

    def load() -> Purifier:
        from purifyguard.cifar10 import load_cifar10_purifier

        return load_cifar10_purifier(name)

    register_purifier(name, channels=3, resolution=32, description=description)(load)


_cifar10_recipe(
    "cifar10-agdm",
    "Adversarially guided purification (AGDM) at t*=100, 10 DDIM steps: google/ddpm-cifar10-32 "
    "guided by RobustBench's TRADES WideResNet-34-10 (Zhang2019Theoretically, L-inf); both "
    "downloaded on first use, robustbench needed (docs/cifar10.md)",
)
_cifar10_recipe(
    "cifar10-agdm-l2",
    "cifar10-agdm for L2 at t*=75: guided by RobustBench's TRADES WideResNet-28-10 "
    "(Rebuffi2021Fixing_28_10_cutmix_ddpm, L2); both downloaded on first use (docs/cifar10.md)",
)
