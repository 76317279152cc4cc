"""How much EOT a randomised defence needs, measured instead of guessed.

An EOT-k gradient averages k single-draw gradients g_1..g_k, each the expected gradient G plus
independent noise. With rho the cosine between two single-draw gradients (rho = |G|^2 /
(|G|^2 + sigma^2) when the draws are exchangeable), the cosine between the EOT-k average and G is

    alignment(k) = sqrt(k rho / (1 + (k - 1) rho)),

so reaching an alignment a takes

    k = a^2 (1 - rho) / ((1 - a^2) rho)        (a = 0.9: k = 0.81 (1 - rho) / (0.19 rho)).

measure_gradient_alignment() estimates rho on a few images (every pair of `draws` single-draw
gradients of the cross-entropy, each draw with fresh purification noise), image by image since
rho differs between images, and reports the smallest EOT whose alignment, averaged over the
images, reaches `target`, and the averaged alignment of the EOT an attack uses. A
deterministic model has rho = 1: EOT 1 is exact. EOT adds to iterations, it does not replace
them (docs/evaluation.md, "How much EOT").
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from purifyguard.evaluation.seeds import derive_seed
from purifyguard.validation import check_int, check_number

TARGET_ALIGNMENT = 0.9
WARN_BELOW = 0.8
DRAWS = 4
_RHO_FLOOR = 1e-4  # below it the draws share no direction worth averaging towards
MAX_EOT = 100_000


def alignment_of_eot(rho: float, eot: int) -> float:
    """Cosine between an EOT-`eot` gradient and the expected gradient, at single-draw cosine rho."""
    rho = min(1.0, max(rho, _RHO_FLOOR))
    return math.sqrt(eot * rho / (1 + (eot - 1) * rho))


def eot_for_alignment(rho: float, target: float = TARGET_ALIGNMENT) -> int:
    """The smallest EOT whose gradient reaches cosine `target` with the expected gradient."""
    target = check_number("target", target, positive=True)
    if target >= 1:
        raise ValueError(f"target must be an alignment in (0, 1), got {target!r}")
    rho = min(1.0, max(rho, _RHO_FLOOR))
    return max(1, math.ceil(target**2 * (1 - rho) / ((1 - target**2) * rho) - 1e-9))


def single_draw_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                          draws: int, seed: int) -> torch.Tensor:
    """(draws, n, ...) input gradients of the summed cross-entropy, one purification draw each
    (torch's global generator reseeded per draw, as the attacks' EOT draws are)."""
    gradients = []
    for draw in range(draws):
        torch.manual_seed(derive_seed(seed, "gradient-alignment", draw))
        x = images.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), labels, reduction="sum")
            gradients.append(torch.autograd.grad(loss, x)[0].detach())
    return torch.stack(gradients)


def measure_gradient_alignment(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eot: int | None = None,
    draws: int = DRAWS, seed: int = 0, target: float = TARGET_ALIGNMENT,
) -> dict[str, Any]:
    """rho (the mean cosine between single-draw gradients, over image and draw pairs), the EOT
    that reaches `target` alignment, and the alignment of `eot` if given; a `warning` string
    when that alignment is below WARN_BELOW (None otherwise)."""
    draws = check_int("draws", draws, 2)
    if eot is not None:
        eot = check_int("eot", eot, 1)
    gradients = single_draw_gradients(model, images, labels, draws, seed).flatten(2)
    cosines = [F.cosine_similarity(gradients[i], gradients[j], dim=1, eps=1e-30)
               for i, j in itertools.combinations(range(draws), 2)]
    per_image = torch.stack(cosines).double().mean(0).tolist()
    rho = sum(per_image) / len(per_image)

    def mean_alignment(k: int) -> float:
        return sum(alignment_of_eot(r, k) for r in per_image) / len(per_image)

    # Between the formula's answer for the best and the worst image; the mean alignment rises
    # with k, so bisect for the smallest k that reaches the target.
    low, high = 1, min(MAX_EOT, max(eot_for_alignment(r, target) for r in per_image))
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if mean_alignment(middle) >= target else (middle + 1, high)
    result: dict[str, Any] = {
        "rho": rho, "rho_per_image": per_image, "images": len(labels), "draws": draws,
        "target": target, "recommended_eot": low,
        "eot": eot, "alignment": None if eot is None else mean_alignment(eot), "warning": None,
    }
    if eot is not None and result["alignment"] < WARN_BELOW:
        result["warning"] = (
            f"EOT {eot} aligns the attack's gradient with the expected gradient to "
            f"{result['alignment']:.2f} only (single-draw cosine {rho:.2f} on {len(labels)} "
            f"images); EOT {result['recommended_eot']} would reach {target}"
        )
    return result
