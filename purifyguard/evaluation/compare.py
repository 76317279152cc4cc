"""Several defences side by side: the same images, attacks and seeds for every one of them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from purifyguard.evaluation.arguments import (
    check_model,
    check_models,
)
from purifyguard.evaluation.attacks import AttackSpec
from purifyguard.evaluation.harness import Data, evaluate_models
from purifyguard.purified_model import PurifiedModel
from purifyguard.validation import check_choice, check_number

logger = logging.getLogger(__name__)

GUIDANCE_VARIANTS = ("none", "pixel", "adversarial")


def build_defences(
    model: PurifiedModel, adversarially_trained: nn.Module | None = None,
    guidance: Sequence[str] = GUIDANCE_VARIANTS, scales: dict[str, float] | None = None,
) -> dict[str, nn.Module]:
    """The protocol's line-up from one PurifiedModel: its undefended classifier, an
    adversarially trained classifier (if given), and its purifier with each guidance mode.

    The guidance variants share the purifier's networks and settings. A pixel-space and a
    feature-space distance need very different scales, so `scales` sets the scale of a mode
    (e.g. {"pixel": 1.0}); a mode not in it keeps the purifier's own scale. A mode the purifier
    cannot run (adversarial guidance without a guidance network) is left out with a warning.
    """
    scales = scales or {}
    unknown = set(scales) - set(GUIDANCE_VARIANTS)
    if unknown:
        raise ValueError(f"scales for unknown guidance modes {sorted(unknown)}; "
                         f"known: {GUIDANCE_VARIANTS}")
    scales = {mode: check_number(f"scales[{mode!r}]", scale, non_negative=True)
              for mode, scale in scales.items()}
    if isinstance(guidance, str):
        guidance = [guidance]
    for mode in guidance:
        check_choice("guidance", mode, GUIDANCE_VARIANTS)
    check_model("adversarially_trained", adversarially_trained, optional=True)
    if not isinstance(model, PurifiedModel):
        raise ValueError(f"build_defences needs a PurifiedModel, got {type(model).__name__}")
    if model.purifier is None:
        raise ValueError("build_defences needs a PurifiedModel with a purifier")
    defences: dict[str, nn.Module] = {"undefended": model.with_purifier(None)}
    if adversarially_trained is not None:
        defences["adversarially-trained"] = adversarially_trained
    for mode in guidance:
        try:
            changes = {"guidance": mode}
            if mode in scales:
                changes["guidance_scale"] = scales[mode]
            purifier = model.purifier.with_settings(**changes)
        except ValueError as error:
            logger.warning("compare: leaving out the %r guidance purifier: %s", mode, error)
            continue
        defences[f"purifier-{mode}"] = model.with_purifier(purifier)
    return defences


def compare(
    defences: dict[str, nn.Module], data: Data, attacks: Sequence[AttackSpec | str] | None = None,
    *, undefended: nn.Module | None = None, **settings: Any,
) -> dict[str, Any]:
    """Evaluate every defence on the same examples and attacks; one report for all of them.

    undefended: the bare classifier the transfer attack is crafted on, shared by all defences
    (default: each PurifiedModel's own classifier; for other models, defences["undefended"]).
    settings: as for evaluate (n, batch_size, runs, seed, output_dir, resume, sanity, ...).
    """
    defences = check_models(defences, "defences")
    check_model("undefended", undefended, optional=True)
    shared = undefended if undefended is not None else defences.get("undefended")
    sources = {
        name: shared if not isinstance(model, PurifiedModel) or undefended is not None else None
        for name, model in defences.items()
    }
    return evaluate_models(defences, data, attacks, undefended=sources, **settings)
