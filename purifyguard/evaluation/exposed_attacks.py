"""Attacks from what the defence exposes (docs/evaluation.md, "Attacks from what the defence
exposes"; issue 22, item 2).

A guided purifier carries its guidance network, a robust classifier of the purifier's input:
an attacker who has the defence has that network too, and may craft on it alone, with no
gradient through the purifier at all (access "transfer"):

- transfer:source=guidance: PGD on the guidance network's cross-entropy (GuidanceClassifier:
  the defended model's input handling, then the network as AdversarialGuidance reads it).
- feature: PGD on its representation (feature_pgd): the features f_phi that the guidance
  compares, pulled toward the nearest other class's centroid.
- init=transfer-guidance | feature (apgd-eot and pgd): the full-gradient attack starts from the
  cheap attack's examples instead of a random point (attacks.run_attack passes them to the
  attack's run as start=, which eot_pgd and apgd_eot take).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from purifyguard.evaluation.pgd import NORMS, ascent, project, random_delta
from purifyguard.evaluation.smooth_substitute import SmoothSubstituteModel
from purifyguard.guidance.adversarial import AdversarialGuidance

# What a transfer attack crafts on: the undefended classifier, or the purifier's guidance network.
SOURCES = ("undefended", "guidance")
# The cheap attacks a full-gradient attack may start from: init name -> (kind, spec settings).
INITS = {"transfer-guidance": ("transfer", {"source": "guidance"}), "feature": ("feature", {})}


def guidance_of(model: nn.Module, what: str) -> tuple[nn.Module, AdversarialGuidance]:
    """(defence, its purifier's AdversarialGuidance); a SmoothSubstituteModel stands for its
    real model. A ValueError naming `what` (the attack or option) when there is none."""
    real = model.real if isinstance(model, SmoothSubstituteModel) else model
    purifier = getattr(real, "purifier", None)
    guidance = getattr(purifier, "guidance", None)
    if isinstance(guidance, AdversarialGuidance):
        return real, guidance
    if purifier is None:
        reason = f"the model ({type(real).__name__}) has no purifier"
    else:
        mode = getattr(getattr(purifier, "config", None), "guidance", None)
        reason = f"its purifier's guidance ({mode!r}) uses no network"
    raise ValueError(f"{what} crafts on the defence's guidance network, but {reason}; it needs "
                     "a PurifiedModel whose purifier has guidance='adversarial'")


class GuidanceClassifier(nn.Module):
    """A defence's guidance network as a classifier of the defence's inputs ([0, 1] images at
    the classifier's size): the defended model's input handling (channels and size converted
    to the purifier's, as before purification), then the network as the guidance reads it
    (AdversarialGuidance.features_and_logits: pre-logit features or guidance_layer's output).

    forward(x): its logits; features_and_logits(x); distance(a, b): the guidance's own D per
    example ("l2": squared L2, "cosine": 1 - cosine similarity).
    """

    def __init__(self, model: nn.Module, what: str = "this attack") -> None:
        super().__init__()
        defence, self.guidance = guidance_of(model, what)
        to_inside = getattr(defence, "_to_purifier_space", None)
        check = getattr(defence, "_check_input", None)
        self._to_inside, self._check = to_inside, check

    def _inside(self, x: torch.Tensor) -> torch.Tensor:
        """x as the purifier (and its guidance) receives it. The defence's input check runs for
        its messages only: its clamp to [0, 1] would zero the gradient of pixels at 0 or 1."""
        if callable(self._check):
            self._check(x)
        return self._to_inside(x) if callable(self._to_inside) else x

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.guidance.features_and_logits(self._inside(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """D over the last dimension (broadcasting), as the guidance measures it."""
        if self.guidance.distance == "l2":
            return (a - b).pow(2).sum(-1)
        return 1 - F.cosine_similarity(a, b, dim=-1)


def feature_targets(model: GuidanceClassifier, features: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, the centroid of the nearest other class (by the guidance's distance) among
    the batch's clean features grouped by label (cosine: the mean of unit vectors), and whether
    it has one (False when the batch holds its class only)."""
    points = F.normalize(features, dim=1) if model.guidance.distance == "cosine" else features
    classes = labels.unique()
    centroids = torch.stack([points[labels == c].mean(0) for c in classes])
    distances = model.distance(features[:, None, :], centroids[None, :, :])
    distances = distances.masked_fill(labels[:, None] == classes[None, :], float("inf"))
    nearest = distances.min(1)
    return centroids[nearest.indices], torch.isfinite(nearest.values)


def feature_pgd(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
    step_size: float, steps: int, norm: str = "linf", random_start: bool = True,
    on_step: Callable[[], object] | None = None,
) -> torch.Tensor:
    """PGD (L-inf or L2, as pgd.eot_pgd) on the guidance network's representation: each
    example's features are pulled toward the centroid of the nearest other class of the clean
    batch (feature_targets), i.e. the ascent is on -D(f(x_adv), centroid); in a batch of one
    class the examples are pushed away from their own clean features (+D(f(x_adv), f(x)), whose
    gradient vanishes at x: that needs the random start).
    Each example's answer is its best iterate by that objective (the last one included: one
    more forward pass). `model`: a GuidanceClassifier (attacked_model gives one for the feature kind)."""
    if not isinstance(model, GuidanceClassifier):
        raise ValueError(f"the feature attack crafts on a GuidanceClassifier (attacked_model "
                         f"gives one for a guided defence), got {type(model).__name__}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    clean = images.detach()
    with torch.no_grad():
        clean_features = model.features_and_logits(clean)[0]
    targets, toward = feature_targets(model, clean_features, labels)

    def objective(features: torch.Tensor) -> torch.Tensor:
        return torch.where(toward, -model.distance(features, targets),
                           model.distance(features, clean_features))

    adversarial = clean.clone()
    if random_start:
        adversarial = project(clean, clean + random_delta(clean, eps, norm), eps, norm)
    best, best_loss = adversarial.clone(), torch.full_like(toward, -torch.inf, dtype=clean.dtype)
    for _ in range(steps):
        with torch.enable_grad():
            point = adversarial.clone().requires_grad_()
            loss = objective(model.features_and_logits(point)[0])
            gradient = torch.autograd.grad(loss.sum(), point)[0]
        better = loss.detach() > best_loss
        best[better], best_loss[better] = adversarial[better], loss.detach()[better]
        adversarial = project(clean, adversarial + step_size * ascent(gradient, norm), eps, norm)
        if on_step is not None:
            on_step()
    with torch.no_grad():
        better = objective(model.features_and_logits(adversarial)[0]) > best_loss
    best[better] = adversarial[better]
    return best

