"""The verdict on a batch: R independent purifications of the same images, one prediction each.

A stochastic defence can answer differently each time it sees an image. The protocol therefore
classifies every image R times with fresh purification noise and reports, from the (R, n) table
of right and wrong answers:

- the mean accuracy over the R runs (an attacker who submits once);
- the accuracy within N submissions (an attacker who may resubmit the same image N times and wins
  if any purification is fooled; DiffHammer's N-evaluation metric), estimated without bias from
  the R runs: an example wrong in k of them survives N draws without replacement with
  probability C(R - k, N) / C(R, N); N = 1 is the mean, N = R the worst case;
- the worst case (an example counts only if all R runs are correct);
- the majority vote (DiffBreak's verdict: an example counts if more than half of the R runs are
  correct; a tie counts as wrong).
"""

from __future__ import annotations

import math

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


SUBMISSIONS = (1, 3, 10)


def accuracy_within(correct: torch.Tensor, submissions: int) -> float:
    """Accuracy against an attacker who submits each image `submissions` times and wins if any
    answer is wrong, estimated from a (runs, n) boolean table (submissions <= runs)."""
    runs = correct.shape[0]
    if not 1 <= submissions <= runs:
        raise ValueError(f"submissions must lie in [1, {runs}] (the runs), got {submissions}")
    right = correct.sum(0).tolist()
    total = math.comb(runs, submissions)
    return sum(math.comb(k, submissions) for k in right) / total / len(right)


def majority_accuracy(correct: torch.Tensor) -> float:
    """Share of examples that more than half of the runs get right (a tie counts as wrong)."""
    return float((2 * correct.sum(0) > correct.shape[0]).float().mean())


def accuracy_summary(correct: torch.Tensor) -> dict[str, object]:
    """Per-run accuracies, their mean, the worst case, the accuracy within N submissions
    (N in SUBMISSIONS up to the runs, keyed by str(N)) and the majority vote, from a (runs, n)
    boolean matrix."""
    n = correct.shape[1]
    per_run = correct.float().mean(1)
    return {
        "n": n,
        "per_run": [round(float(a), 6) for a in per_run],
        "mean": float(per_run.mean()),
        "worst_case": float(correct.all(0).float().mean()),
        "within_submissions": {
            str(count): accuracy_within(correct, count)
            for count in SUBMISSIONS if count <= correct.shape[0]
        },
        "majority": majority_accuracy(correct),
    }
