"""How the EOT draws' gradients are combined into one ascent direction.

"mean": plain EOT, the average over the draws (Athalye et al. 2018).
"em": after DiffHammer (Wang et al., NeurIPS 2024). The purifications of one image do not all
share one vulnerability: their gradients split into a cluster that points the same way (the
purification runs an attack can fool together) and others that point elsewhere and, averaged
in, cancel the useful direction (DiffHammer's "gradient dilemma"). An EM step finds the cluster
per example and weights the draws by their membership:

- model: a mixture of a "vulnerable" component whose unit gradients concentrate around a
  direction mu (density proportional to exp(k cos(g_j, mu)), k = CONCENTRATION) and a
  background at the example's typical alignment (density exp(k c), c the mean cosine of its
  draws), with prior share pi;
- E-step: membership r_j = pi e^{k cos_j} / (pi e^{k cos_j} + (1 - pi) e^{k c}), where cos_j
  is measured against the direction of the other draws (leave-one-out, so a draw does not vote
  for itself);
- M-step: mu = normalise(sum_j r_j g_j / |g_j|), pi = mean_j r_j (kept in [0.05, 0.95]).

EM_ROUNDS rounds start from equal weights (plain EOT's direction); the step then follows
sum_j r_j g_j / sum_j r_j. With one draw (eot = 1) both weightings are the same. This is our
formulation of DiffHammer's selective step, not a port of its code; gradient grafting (its
O(1)-backward trick) is not implemented.
"""

from __future__ import annotations

import torch

from purifyguard.evaluation.pgd import EotDraws

EOT_WEIGHTINGS = ("mean", "em")
EM_ROUNDS = 3
CONCENTRATION = 10.0
SHARE_BOUNDS = (0.05, 0.95)
_TINY = 1e-12


def combine_draws(draws: EotDraws, weighting: str) -> torch.Tensor:
    """One ascent gradient per example from the draws' gradients (weighting: EOT_WEIGHTINGS)."""
    if weighting not in EOT_WEIGHTINGS:
        raise ValueError(f"eot_weighting must be one of {EOT_WEIGHTINGS}, got {weighting!r}")
    if weighting == "mean" or draws.gradients.shape[0] == 1:
        return draws.mean_gradient()
    weights = vulnerable_cluster_weights(draws.gradients)
    shape = (*weights.shape, *([1] * (draws.gradients.dim() - 2)))
    return (weights.view(shape) * draws.gradients).sum(0) / weights.sum(0).view(shape[1:])


def vulnerable_cluster_weights(gradients: torch.Tensor, rounds: int = EM_ROUNDS,
                               concentration: float = CONCENTRATION) -> torch.Tensor:
    """(draws, N) memberships in [0, 1] of each draw in its example's vulnerable cluster, from
    (draws, N, ...) gradients (the module docstring gives the model)."""
    flat = gradients.flatten(2).float()
    unit = flat / (flat.norm(dim=2, keepdim=True) + _TINY)
    weights = torch.ones(unit.shape[:2], device=unit.device)
    share = torch.full(unit.shape[1:2], 0.5, device=unit.device)
    for _ in range(rounds):
        total = (weights[..., None] * unit).sum(0)
        others = total[None] - weights[..., None] * unit
        direction = others / (others.norm(dim=2, keepdim=True) + _TINY)
        cosine = (unit * direction).sum(2)
        typical = cosine.mean(0, keepdim=True)
        weights = torch.sigmoid(concentration * (cosine - typical) + torch.logit(share))
        share = weights.mean(0).clamp(*SHARE_BOUNDS)
    return weights
