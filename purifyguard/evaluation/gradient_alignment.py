"""How much EOT a randomised defence needs, measured instead of guessed.

An EOT-k gradient averages k single-draw gradients g_1..g_k, each the expected gradient G plus
independent noise. With rho the cosine between two single-draw gradients (rho = |G|^2 /
(|G|^2 + sigma^2) when the draws are exchangeable), the cosine between the EOT-k average and G is

    alignment(k) = sqrt(k rho / (1 + (k - 1) rho)),

so reaching an alignment a takes

    k = a^2 (1 - rho) / ((1 - a^2) rho)        (a = 0.9: k = 0.81 (1 - rho) / (0.19 rho)).

measure_gradient_alignment() estimates rho on a few images (every pair of `draws` single-draw
gradients of the cross-entropy, each draw with fresh purification noise) and reports the EOT
that brings the alignment at the mean rho to `target`. Since rho differs between images (an
image whose gradient is all noise has rho near 0, and no EOT aligns it), the alignment of the
EOT an attack uses is averaged over the images' own rho, which predicts the measured alignment
where the mean rho does not (tests/test_gradient_alignment.py). A
deterministic model has rho = 1: EOT 1 is exact. EOT adds to iterations, it does not replace
them (docs/evaluation.md, "How much EOT").
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from purifyguard.evaluation.seeds import derive_seed
from purifyguard.files import read_json, write_json
from purifyguard.validation import check_int, check_number

logger = logging.getLogger(__name__)

TARGET_ALIGNMENT = 0.9
WARN_BELOW = 0.8
DRAWS = 4
_RHO_FLOOR = 1e-4  # below it the draws share no direction worth averaging towards


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
    """rho (the mean cosine between single-draw gradients, over image and draw pairs) and each
    image's, the EOT that reaches `target` alignment at the mean rho, and the alignment of `eot`
    if given (averaged over the images); a `warning` string when that alignment is below
    WARN_BELOW (None otherwise)."""
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

    result: dict[str, Any] = {
        "rho": rho, "rho_per_image": per_image, "images": len(labels), "draws": draws,
        "target": target, "recommended_eot": eot_for_alignment(rho, target),
        "eot": eot, "alignment": None if eot is None else mean_alignment(eot), "warning": None,
    }
    if eot is not None and result["alignment"] < WARN_BELOW:
        result["warning"] = (
            f"EOT {eot} aligns the attack's gradient with the expected gradient to "
            f"{result['alignment']:.2f} only (single-draw cosine {rho:.2f} on {len(labels)} "
            f"images); EOT {result['recommended_eot']} would reach {target}"
        )
    return result


ALIGNMENT_FILE = "eot-alignment.json"


def measured_alignment(
    output_dir: Path | None, key: str, model: nn.Module, images: torch.Tensor,
    labels: torch.Tensor, *, eot: int, seed: int, write: bool = True,
) -> dict[str, Any]:
    """measure_gradient_alignment for one attacked model, kept in output_dir/eot-alignment.json
    under `key` (the model, its version and the attack's settings), so a resumed evaluation
    measures it once; a warning is logged when the EOT used aligns poorly."""
    stored = read_json(output_dir / ALIGNMENT_FILE, "the EOT alignment file") \
        if output_dir is not None and (output_dir / ALIGNMENT_FILE).is_file() else {}
    if key not in stored:
        stored[key] = measure_gradient_alignment(model, images, labels, eot=eot, seed=seed)
        if output_dir is not None and write:
            write_json(output_dir / ALIGNMENT_FILE, stored)
    if stored[key]["warning"]:
        logger.warning("%s: %s", key, stored[key]["warning"])
    return stored[key]
