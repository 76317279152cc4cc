"""Gradient grafting: an EOT gradient through a purifier for the price of one backward pass.

After DiffHammer (Wang et al., NeurIPS 2024). Plain EOT differentiates every draw through the
whole purification: `eot` forward passes that keep a graph and `eot` backward passes through the
denoiser. Grafting splits the defended model into its purification p and its classifier f:

- one draw keeps its graph: p_0(x) with the graph of the reverse process;
- the other eot - 1 draws purify without a graph (the cost of a plain forward pass);
- for every draw j, the classifier alone gives the gradient g_j of the loss at its purified
  image p_j(x) (a backward through the classifier only, cheap next to the denoiser);
- the g_j are combined into one output gradient G (the EOT average, or the EM weighting of
  em_weighting.py) and grafted onto the graph of draw 0: the input gradient is J_0^T G, one
  backward pass through the purification.

So each iteration costs one full gradient evaluation plus eot - 1 forward passes, instead of
eot full gradient evaluations; the price is that the purification's Jacobian comes from one
draw instead of their average. The draw with the graph is the first one, whichever weighting is
used (DiffHammer backpropagates through the draw its EM step picks; picking one here would need
a second pass with that draw's noise). The defended model must be a PurifiedModel (it needs
`purify` and `classify`).
"""

from __future__ import annotations

import torch
from torch import nn

from purifyguard.evaluation.em_weighting import combine_draws
from purifyguard.evaluation.losses import Loss, cross_entropy
from purifyguard.evaluation.pgd import EotDraws


def check_graftable(model: nn.Module) -> None:
    """ValueError unless `model` can be split into purification and classifier."""
    if not (callable(getattr(model, "purify", None)) and callable(getattr(model, "classify", None))):
        raise ValueError(
            f"graft=True needs a PurifiedModel (a model with purify and classify), got "
            f"{type(model).__name__}"
        )
    if getattr(model, "n_samples", 1) != 1:
        raise ValueError(
            f"graft=True grafts one purification per draw; the model averages "
            f"n_samples={model.n_samples} purifications per forward pass: use n_samples=1"
        )


def grafted_draws(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eot: int = 1,
    chunk_size: int | None = None, loss: Loss = cross_entropy, weighting: str = "mean",
) -> tuple[torch.Tensor, EotDraws]:
    """(input gradient, the draws) at `images`, by grafting (see the module docstring).

    The draws' `gradients` are the loss gradients at the purified images (output space), their
    losses and right/wrong answers those of each purification. chunk_size: images per pass (the
    graph of one chunk is freed before the next); None: the whole batch at once.
    """
    chunk = len(images) if chunk_size is None else chunk_size
    input_gradient = torch.empty_like(images)
    output_gradients = torch.empty((eot, *images.shape), dtype=images.dtype, device=images.device)
    losses = torch.empty((eot, len(images)), device=images.device)
    correct = torch.empty((eot, len(images)), dtype=torch.bool, device=images.device)
    with torch.enable_grad():
        for start in range(0, len(images), chunk):
            rows = slice(start, start + chunk)
            point = images[rows].detach().requires_grad_()
            grafted = model.purify(point)
            for draw in range(eot):
                if draw == 0:
                    purified = grafted.detach()
                else:
                    with torch.no_grad():
                        purified = model.purify(point.detach())
                purified.requires_grad_()
                logits = model.classify(purified)
                per_example = loss(logits, labels[rows])
                output_gradients[draw, rows] = torch.autograd.grad(per_example.sum(), purified)[0]
                losses[draw, rows] = per_example.detach().float()
                correct[draw, rows] = logits.detach().argmax(-1) == labels[rows]
            draws = EotDraws(output_gradients[:, rows], losses[:, rows], correct[:, rows])
            combined = combine_draws(draws, weighting)
            input_gradient[rows] = torch.autograd.grad(grafted, point, grad_outputs=combined)[0]
    return input_gradient, EotDraws(output_gradients, losses, correct)
