"""PGD with Expectation over Transformation, in L-inf and L2 (Madry et al. 2018; Athalye et al. 2018).

Each iteration averages the loss gradient over `eot` independent forward passes of a randomised
model, steps along its sign (L-inf) or its normalised direction (L2), and projects back onto the
eps-ball around the clean image and onto [0, 1]. torchattacks' EOTPGD covers L-inf only; this one
file serves both norms with the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("linf", "l2")
_TINY = 1e-12


def eot_pgd(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float, step_size: float,
    steps: int, eot: int = 1, norm: str = "linf", random_start: bool = True,
    chunk_size: int | None = None, on_step: Callable[[], object] | None = None,
) -> torch.Tensor:
    """Adversarial images within `eps` of `images` (norm "linf" or "l2") that raise the loss.
    chunk_size: see eot_gradient. on_step: called after every iteration (progress)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    clean = images.detach()
    adversarial = clean.clone()
    if random_start:
        adversarial = project(clean, clean + random_delta(clean, eps, norm), eps, norm)
    for _ in range(steps):
        gradient = eot_gradient(model, adversarial, labels, eot, chunk_size)
        adversarial = project(clean, adversarial + step_size * ascent(gradient, norm), eps, norm)
        if on_step is not None:
            on_step()
    return adversarial


def eot_gradient(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eot: int = 1,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The input gradient of the summed cross-entropy, averaged over `eot` forward passes.

    The eot copies of the batch are stacked into one batch of eot x N images (a randomised
    model draws its noise independently for each copy, as eot separate passes would), which runs
    as forward + backward on chunks of chunk_size images; each chunk's graph is freed before the
    next, so memory is that of one chunk. None: chunks of N images, the memory of one pass.
    """
    copies = images.detach().repeat(eot, *([1] * (images.dim() - 1)))
    copy_labels = labels.repeat(eot)
    chunk = len(images) if chunk_size is None else chunk_size
    gradient = torch.empty_like(copies)
    with torch.enable_grad():
        for start in range(0, len(copies), chunk):
            rows = slice(start, start + chunk)
            part = copies[rows].requires_grad_()
            loss = F.cross_entropy(model(part), copy_labels[rows], reduction="sum")
            gradient[rows] = torch.autograd.grad(loss, part)[0]
    return gradient.view(eot, *images.shape).mean(0)


def ascent(gradient: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of unit size in the attack's norm."""
    if norm == "linf":
        return gradient.sign()
    return gradient / (_per_example_l2(gradient) + _TINY)


def random_delta(images: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """A random start: uniform in the L-inf cube, or a random direction at a uniform L2 radius."""
    if norm == "linf":
        return torch.empty_like(images).uniform_(-eps, eps)
    direction = torch.randn_like(images)
    radius = torch.rand(images.shape[0], 1, 1, 1, device=images.device, dtype=images.dtype)
    return direction / (_per_example_l2(direction) + _TINY) * radius * eps


def project(clean: torch.Tensor, candidate: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The nearest point of the eps-ball around `clean`, then clamped to [0, 1].

    Clamping shrinks every coordinate of the perturbation, so it never leaves the ball.
    """
    delta = candidate.detach() - clean
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / (_per_example_l2(delta) + _TINY)).clamp(max=1.0)
    return (clean + delta).clamp(0, 1)


def perturbation_norm(clean: torch.Tensor, adversarial: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example size of adversarial - clean in the attack's norm."""
    delta = (adversarial - clean).flatten(1)
    return delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)


def _per_example_l2(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
