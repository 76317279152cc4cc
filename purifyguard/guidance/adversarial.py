"""The paper's adversarial guidance (AGDM): keep the input's semantics, not its perturbation.

The distance is measured in the latent space f_phi (pooled, pre-logit features) of an auxiliary
network trained with TRADES. Because that network is robust, f_phi(x_adv) stays close to
f_phi(x_clean), so the guidance pulls the sample toward the input's content without carrying the
adversarial perturbation back in, as pixel guidance would.

The guidance network may be any nn.Module classifier of images in [0, 1]:
- a timm model: f_phi = forward_head(forward_features(x), pre_logits=True), logits from its
  classifier (the path of the bundled purifiers);
- any other network (a torchvision model, a RobustBench WideResNet, ...): f_phi is the input of its
  last nn.Linear layer, read by a forward pre-hook, and the logits are its output;
- with a layer name (PurifierConfig.guidance_layer, or layer= here), f_phi is that layer's output,
  read by a forward hook, flattened per sample; the logits are the network's output.
The hooks are registered for one forward call and removed after it, so the network is left as it
was, and the features stay in the autograd graph (double backward works through them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from purifyguard.schedule import NoiseSchedule

TIMM_METHODS = ("forward_features", "forward_head", "get_classifier")


class AdversarialGuidance(nn.Module):
    """L = D(f(x0_hat(x_t)), f(x_in)) + class_weight * (-log p(y_hat | x0_hat)).

    D is the squared L2 distance ("l2") or 1 - cosine similarity ("cosine") of pooled features;
    y_hat = argmax p(x_in) is the guidance network's robust prediction of the input. With
    on="x_t" the network reads x_t / sqrt(abar_t) instead of x0_hat: no backward through the
    denoiser, a noisier signal. The network sees images in [0, 1] at the purifier's resolution.
    layer: None for the pre-logit features (see the module docstring), or the name of the layer
    whose output is the feature space.
    """

    def __init__(
        self, network: nn.Module, distance: str = "l2", class_weight: float = 0.0,
        on: str = "x0_hat", layer: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise ValueError(f"the guidance network must be an nn.Module, got {type(network).__name__}")
        self.network = network
        self.distance = distance
        self.class_weight = class_weight
        self.reads_x0_hat = on == "x0_hat"
        self.layer = layer
        # The module whose input (a pre-hook) or output (a hook) holds the features; a name, not
        # the module, so that it is not registered a second time under this module.
        if layer is not None:
            _submodule(network, layer)
            self.feature_source, self.reads_layer_input = layer, False
        elif all(hasattr(network, method) for method in TIMM_METHODS):
            self.feature_source, self.reads_layer_input = None, False
        else:
            self.feature_source, self.reads_layer_input = _last_linear(network), True

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features f_phi (N, D) and logits of images in [0, 1], in the images' dtype (the
        network runs in its own)."""
        dtype = next((p.dtype for p in self.network.parameters()), images.dtype)
        features, logits = self._features_and_logits(images.to(dtype))
        return features.to(images.dtype), logits.to(images.dtype)

    def _features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.feature_source is None:  # a timm model, read as it always was
            features = self.network.forward_head(
                self.network.forward_features(images), pre_logits=True
            )
            return features, self.network.get_classifier()(features)
        with self._captured() as captured:
            output = self.network(images)
        if not captured:
            raise ValueError(
                f"the guidance network {type(self.network).__name__} never called its layer "
                f"{self.feature_source!r} in forward(); name the layer whose output are the "
                "features with guidance_layer="
            )
        features = captured[-1]
        if not isinstance(features, torch.Tensor):
            raise ValueError(
                f"layer {self.feature_source!r} of the guidance network returns "
                f"{type(features).__name__}, not a tensor; name another guidance_layer"
            )
        return features.flatten(1), _logits(output)

    @contextmanager
    def _captured(self) -> Iterator[list[torch.Tensor]]:
        captured: list[torch.Tensor] = []
        module = self.network.get_submodule(self.feature_source)
        if self.reads_layer_input:
            handle = module.register_forward_pre_hook(lambda _, inputs: captured.append(inputs[0]))
        else:
            handle = module.register_forward_hook(lambda _, __, output: captured.append(output))
        try:
            yield captured
        finally:
            handle.remove()

    def prepare(self, x_in: torch.Tensor) -> dict[str, torch.Tensor]:
        features, logits = self.features_and_logits(x_in)
        return {"features": features, "label": logits.argmax(1)}

    def loss(
        self, x_t: torch.Tensor, x0_hat: torch.Tensor | None, index: int,
        schedule: NoiseSchedule, target: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        if self.reads_x0_hat:
            sample = x0_hat
        else:
            sample = x_t / schedule.abar(index, x_t).sqrt()
        features, logits = self.features_and_logits((sample + 1) / 2)
        if self.distance == "l2":
            loss = (features - target["features"]).pow(2).sum(1)
        else:
            loss = 1 - F.cosine_similarity(features, target["features"], dim=1)
        if self.class_weight > 0:
            loss = loss + self.class_weight * F.cross_entropy(
                logits, target["label"], reduction="none"
            )
        return loss


def _submodule(network: nn.Module, name: str) -> nn.Module:
    try:
        return network.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in network.named_children()]
        raise ValueError(
            f"guidance_layer {name!r} is not a layer of the guidance network "
            f"{type(network).__name__} (its top-level layers: {names}; nested layers are named "
            "with dots, e.g. 'layer4.1')"
        ) from None


def _last_linear(network: nn.Module) -> str:
    """The name of the network's last nn.Linear (in registration order): its classifier head."""
    linears = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(
            f"the guidance network {type(network).__name__} has no nn.Linear layer to read "
            "pre-logit features from; name the layer whose output are the features with "
            "guidance_layer=<name> (a timm model needs neither)"
        )
    if linears[-1] == "":  # the network is itself one nn.Linear
        raise ValueError("the guidance network is a single nn.Linear: it has no features to read")
    return linears[-1]


def _logits(output: object) -> torch.Tensor:
    """The logits of a network's output: a tensor, or an object with .logits (transformers)."""
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            f"the guidance network returns {type(output).__name__}; it must return logits (a "
            "tensor, or an output with .logits)"
        )
    return logits
