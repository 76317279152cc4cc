"""The paper's adversarial guidance (AGDM): keep the input's semantics, not its perturbation.

The distance is measured in the latent space f_phi (pooled, pre-logit features) of an auxiliary
network trained with TRADES. Because that network is robust, f_phi(x_adv) stays close to
f_phi(x_clean), so the guidance pulls the sample toward the input's content without carrying the
adversarial perturbation back in, as pixel guidance would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from purifyguard.schedule import NoiseSchedule


class AdversarialGuidance(nn.Module):
    """L = D(f(x0_hat(x_t)), f(x_in)) + class_weight * (-log p(y_hat | x0_hat)).

    D is the squared L2 distance ("l2") or 1 - cosine similarity ("cosine") of pooled features;
    y_hat = argmax p(x_in) is the guidance network's robust prediction of the input. With
    on="x_t" the network reads x_t / sqrt(abar_t) instead of x0_hat: no backward through the
    denoiser, a noisier signal. The network sees images in [0, 1] at the purifier's resolution.
    """

    def __init__(
        self, network: nn.Module, distance: str = "l2", class_weight: float = 0.0,
        on: str = "x0_hat",
    ) -> None:
        super().__init__()
        for method in ("forward_features", "forward_head", "get_classifier"):
            if not hasattr(network, method):
                raise ValueError(
                    f"the guidance network must be a timm model (it has no {method}()); "
                    f"got {type(network).__name__}"
                )
        self.network = network
        self.distance = distance
        self.class_weight = class_weight
        self.reads_x0_hat = on == "x0_hat"

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled pre-logit features f_phi and logits of images in [0, 1]."""
        features = self.network.forward_head(
            self.network.forward_features(images), pre_logits=True
        )
        return features, self.network.get_classifier()(features)

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
