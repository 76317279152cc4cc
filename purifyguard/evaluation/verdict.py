"""The verdict on a batch: R independent purifications of the same images, one prediction each.

A stochastic defence can answer differently each time it sees an image. The protocol therefore
classifies every image R times with fresh purification noise and reports both the mean accuracy
over the R runs and the worst case (an example counts only if all R runs are correct).
"""

from __future__ import annotations

import torch
from torch import nn

from purifyguard.evaluation.seeds import derive_seed, seed_everything


@torch.no_grad()
def predictions(
    model: nn.Module, images: torch.Tensor, runs: int, seed: int
) -> torch.Tensor:
    """Predicted labels of shape (runs, N); run r draws its noise from derive_seed(seed, r).

    A PurifiedModel without a purifier is deterministic: it is evaluated once and repeated.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    deterministic = hasattr(model, "purifier") and model.purifier is None
    rows = []
    for run in range(1 if deterministic else runs):
        seed_everything(derive_seed(seed, "run", run))
        rows.append(model(images).argmax(-1))
    return torch.stack(rows).expand(runs, -1) if deterministic else torch.stack(rows)


def accuracy_summary(correct: torch.Tensor) -> dict[str, object]:
    """Per-run accuracies, their mean and the worst case, from a (runs, n) boolean matrix."""
    n = correct.shape[1]
    per_run = correct.float().mean(1)
    return {
        "n": n,
        "per_run": [round(float(a), 6) for a in per_run],
        "mean": float(per_run.mean()),
        "worst_case": float(correct.all(0).float().mean()),
    }
