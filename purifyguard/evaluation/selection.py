"""Choosing, per example, the adversarial candidate the defence gets wrong most often under
FRESH purifications: noise drawn for the choice alone, neither the noise a candidate was crafted
on (which flatters it) nor the verdict's (which would grade the attack on its own exam)."""

from __future__ import annotations

import torch
from torch import nn

from purifyguard.evaluation.losses import cw_margin
from purifyguard.evaluation.seeds import seed_everything


@torch.no_grad()
def select_candidates(
    model: nn.Module, candidates: torch.Tensor, labels: torch.Tensor, draws: int, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen image of each example and the index of its candidate.

    candidates: (C, N, ...) images. Each candidate of each example is classified `draws` times,
    the noise seeded by `seed`; the one wrong most often wins, and among equals the one with the
    largest mean margin (max other logit - true logit), i.e. the furthest past the boundary.
    Costs C x draws forward passes per example.
    """
    count, n = candidates.shape[:2]
    seed_everything(seed)
    stacked = candidates.reshape(count * n, *candidates.shape[2:]).repeat(
        draws, *([1] * (candidates.dim() - 2)))
    logits = model(stacked)
    stacked_labels = labels.repeat(count * draws)
    wrong = (logits.argmax(-1) != stacked_labels).view(draws, count, n).sum(0).float()
    margin = cw_margin(logits.float(), stacked_labels).view(draws, count, n).mean(0)
    # Wrong answers first; the margin, squashed into (0, 0.5), only breaks ties.
    score = wrong + 0.5 * torch.sigmoid(margin)
    chosen = score.argmax(0)
    return candidates[chosen, torch.arange(n, device=chosen.device)], chosen
