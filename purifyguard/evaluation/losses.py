"""Per-example attack losses on logits: cross-entropy and the margin losses (larger = closer to
a mistake).

- "ce": cross-entropy of the true class.
- "dlr": the Difference of Logits Ratio (Croce and Hein 2020, AutoAttack),
  -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), invariant to shifting and scaling the logits;
  it needs at least 3 classes.
- "cw": the Carlini-Wagner margin max_{i != y} z_i - z_y, for 2 classes where DLR is undefined.
- "margin": DLR when there are >= 3 classes, CW otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LOSSES = ("ce", "dlr", "cw", "margin")
_TINY = 1e-12

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def cw_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """max_{i != y} z_i - z_y: positive once the example is misclassified."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return others.amax(1) - true


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The margin of cw_margin divided by the gap between the largest and third-largest logit."""
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}")
    ranked = logits.sort(dim=1, descending=True).values
    return cw_margin(logits, labels) / (ranked[:, 0] - ranked[:, 2] + _TINY)


def attack_loss(name: str, n_classes: int) -> Loss:
    """The per-example loss called `name` (LOSSES); "margin" picks DLR or CW by n_classes."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
    if name == "margin":
        name = "dlr" if n_classes >= 3 else "cw"
    return {"ce": cross_entropy, "dlr": dlr_loss, "cw": cw_margin}[name]


def margin_name(n_classes: int) -> str:
    """Which margin loss "margin" means for a model with n_classes outputs."""
    return "dlr" if n_classes >= 3 else "cw"
