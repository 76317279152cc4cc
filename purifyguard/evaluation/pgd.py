"""PGD with Expectation over Transformation, in L-inf and L2 (Madry et al. 2018; Athalye et al. 2018).

Each iteration averages the loss gradient over `eot` independent forward passes of a randomised
model, steps along its sign (L-inf) or its normalised direction (L2), and projects back onto the
eps-ball around the clean image and onto [0, 1]. A deterministic model (two passes over one image
agree) gets one draw per iteration whatever `eot` says: the others would repeat its gradient.
torchattacks' EOTPGD covers L-inf only; this one
file serves both norms with the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from purifyguard.evaluation.losses import Loss, cross_entropy
from purifyguard.evaluation.trace import AttackTrace

NORMS = ("linf", "l2")
_TINY = 1e-12


def eot_pgd(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float, step_size: float,
    steps: int, eot: int = 1, norm: str = "linf", random_start: bool = True,
    chunk_size: int | None = None, on_step: Callable[[], object] | None = None,
    trace: AttackTrace | None = None, start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adversarial images within `eps` of `images` (norm "linf" or "l2") that raise the loss.
    chunk_size: see eot_gradient. on_step: called after every iteration (progress).
    trace: records which crafting draws classify each iterate correctly (convergence curve).
    start: adversarial images (within the ball) to begin at instead of the random start (or,
    without random_start, the clean images); None: those, drawn as always."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    clean = images.detach()
    adversarial = clean.clone()
    if start is not None:
        adversarial = starting_point(clean, start, eps, norm)
    elif random_start:
        adversarial = project(clean, clean + random_delta(clean, eps, norm), eps, norm)
    if eot > 1 and not probe_model(model, clean[:1])[1]:
        eot = 1  # a deterministic model: every draw would give the same gradient
    for _ in range(steps):
        draws = eot_draws(model, adversarial, labels, eot, chunk_size)
        if trace is not None:
            trace.record(draws.correct)
        adversarial = project(clean, adversarial + step_size * ascent(draws.mean_gradient(), norm),
                              eps, norm)
        if on_step is not None:
            on_step()
    return adversarial


@torch.no_grad()
def probe_model(model: nn.Module, image: torch.Tensor) -> tuple[int, bool]:
    """The number of classes, and whether two passes over the same image disagree (a
    randomised defence): two forward passes of one image. On a deterministic model EOT draws
    all give the same gradient, so the attacks take one."""
    first, second = model(image), model(image)
    return int(first.shape[-1]), not torch.equal(first, second)


@dataclass
class EotDraws:
    """What `eot` forward + backward passes at one point give, one row per draw.

    gradients: (eot, N, C, H, W) input gradients of the per-example loss; losses and correct:
    (eot, N), the loss and whether the draw classifies the example correctly.
    """

    gradients: torch.Tensor
    losses: torch.Tensor
    correct: torch.Tensor

    def mean_gradient(self) -> torch.Tensor:
        """Plain EOT: the average over the draws."""
        return self.gradients.mean(0)


def eot_draws(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eot: int = 1,
    chunk_size: int | None = None, loss: Loss = cross_entropy,
) -> EotDraws:
    """Per-draw input gradients, losses and right/wrong answers at `images`.

    The eot copies of the batch are stacked into one batch of eot x N images (a randomised
    model draws its noise independently for each copy, as eot separate passes would), which runs
    as forward + backward on chunks of chunk_size images; each chunk's graph is freed before the
    next, so memory is that of one chunk. None: chunks of N images, the memory of one pass.
    loss: per-example loss of (logits, labels) (losses.py), cross-entropy by default.
    """
    copies = images.detach().repeat(eot, *([1] * (images.dim() - 1)))
    copy_labels = labels.repeat(eot)
    chunk = len(images) if chunk_size is None else chunk_size
    gradient = torch.empty_like(copies)
    losses = torch.empty(len(copies), device=images.device)
    correct = torch.empty(len(copies), dtype=torch.bool, device=images.device)
    with torch.enable_grad():
        for start in range(0, len(copies), chunk):
            rows = slice(start, start + chunk)
            part = copies[rows].requires_grad_()
            logits = model(part)
            per_example = loss(logits, copy_labels[rows])
            gradient[rows] = torch.autograd.grad(per_example.sum(), part)[0]
            losses[rows] = per_example.detach().float()
            correct[rows] = logits.detach().argmax(-1) == copy_labels[rows]
    return EotDraws(gradient.view(eot, *images.shape), losses.view(eot, -1),
                    correct.view(eot, -1))


def eot_gradient(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eot: int = 1,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The input gradient of the summed cross-entropy, averaged over `eot` forward passes
    (eot_draws, then the plain average)."""
    return eot_draws(model, images, labels, eot, chunk_size).mean_gradient()


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


def starting_point(clean: torch.Tensor, start: torch.Tensor, eps: float, norm: str
                   ) -> torch.Tensor:
    """`start` (adversarial images of clean's shape) as an attack's first iterate: projected
    onto the ball as a random start is, so a point already inside it stays where it is (up to
    rounding). A ValueError when the shapes differ. Draws no random numbers."""
    if start.shape != clean.shape:
        raise ValueError(f"start must have the images' shape {tuple(clean.shape)}, got "
                         f"{tuple(start.shape)}")
    return project(clean, clean + (start.detach().to(clean) - clean), eps, norm)


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
