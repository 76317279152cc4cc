"""Guidance losses L(x_t, x_in): the reverse step's mean moves by -s_t * grad_{x_t} L.

| mode          | L                                              | reproduces          |
|---------------|------------------------------------------------|---------------------|
| "none"        | 0                                              | DiffPure-style      |
| "pixel"       | ||x_t - sqrt(abar_t) x_in||^2                  | GDMP-style          |
| "adversarial" | D(f(x0_hat(x_t)), f(x_in)) - lambda log p(y_hat | x0_hat) | AGDM (the paper) |
"""

from __future__ import annotations

from torch import nn

from purifyguard.config import PurifierConfig
from purifyguard.guidance.adversarial import AdversarialGuidance
from purifyguard.guidance.pixel import PixelGuidance


def build_guidance(config: PurifierConfig, guidance_network: nn.Module | None) -> nn.Module | None:
    """The guidance loss module for a config, or None for mode "none"."""
    if config.guidance == "none":
        return None
    if config.guidance == "pixel":
        return PixelGuidance()
    if guidance_network is None:
        raise ValueError(
            "guidance='adversarial' needs a guidance network: pass guidance_network=<a classifier "
            "trained with TRADES: a timm model, or any nn.Module whose features are the input of "
            "its last nn.Linear or the output of guidance_layer> (see purifyguard train guidance)"
        )
    return AdversarialGuidance(
        guidance_network,
        distance=config.distance,
        class_weight=config.class_weight,
        on=config.guidance_on,
        layer=config.guidance_layer,
    )


__all__ = ["AdversarialGuidance", "PixelGuidance", "build_guidance"]
