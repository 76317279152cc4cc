"""Named attack settings and how each one runs against a model from [0, 1] images to logits.

| kind            | what it does                                                  | gradient       |
|-----------------|---------------------------------------------------------------|----------------|
| apgd-eot        | APGD with EOT, CE/margin restarts, selection on fresh draws   | full/surrogate |
| pgd             | PGD with EOT through the whole purified model                 | full/surrogate |
| autoattack-rand | torchattacks AutoAttack version="rand": APGD-CE + APGD-DLR, EOT | full/surrogate |
| bpda            | PGD with EOT, the purifier's backward replaced by the identity | bpda          |
| transfer        | PGD crafted on the undefended classifier, replayed on the defence | transfer     |
| square          | Square attack, queries only                                    | black-box     |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torchattacks
from torch import nn

from purifyguard.config import SAMPLERS
from purifyguard.evaluation.apgd import (
    CANDIDATES_PER_RESTART,
    CHECKPOINT_SHRINK,
    FIRST_CHECKPOINT,
    LOSS_PLANS,
    MIN_CHECKPOINT,
    RANDOMISED_INITIAL_STEP,
    RANDOMISED_REVIEW,
    RHO,
    apgd_eot,
    default_restarts,
)
from purifyguard.evaluation.arguments import (
    check_name,
)
from purifyguard.evaluation.em_weighting import EOT_WEIGHTINGS
from purifyguard.evaluation.pgd import NORMS, eot_pgd
from purifyguard.evaluation.seeds import derive_seed
from purifyguard.evaluation.trace import AttackTrace
from purifyguard.validation import check_bool, check_choice, check_int, check_number

KINDS = ("apgd-eot", "pgd", "autoattack-rand", "bpda", "transfer", "square")
GRADIENTS = ("full", "surrogate")
# Reference settings of the protocol (docs/evaluation.md, "The protocol"; after Lee and Kim 2023).
REFERENCE_STEPS = 200
REFERENCE_EOT = 20
REFERENCE_APGD_STEPS = 100  # AutoAttack's own iteration count for APGD
REFERENCE_SQUARE_QUERIES = 5000


@dataclass
class AttackSpec:
    """One attack, fully described: the record of every result carries all of these fields.

    step_size: None means eps / 4 (the protocol's default; 0.007 is its choice for 8/255), and
        for apgd-eot the initial step 2 eps (APGD's).
    steps: iterations (APGD iterations per loss for autoattack-rand; gradient iterations of all
        restarts together for apgd-eot; unused by square).
    eot: gradient samples per iteration (EOT), 1 for no EOT.
    gradient: "full" differentiates the defended process; "surrogate" differentiates a cheaper
        one (surrogate_sampler with surrogate_steps steps) while the verdict uses the real one.
    checkpointing: recompute reverse steps in the backward (same gradient, less memory).
    n_queries: model queries of the square attack.
    apgd-eot only (apgd.py): restarts (they share the steps; None: one per 100), loss ("ce+margin" alternates
    cross-entropy and the margin loss across restarts, or "ce" / "margin" throughout), momentum
    (APGD's 0.75), select_draws (fresh forward passes per candidate for the final choice; 0
    lets the crafting draws decide), eot_weighting ("mean": plain EOT, "em": DiffHammer-style),
    graft (one backward pass per iteration: the draws' gradients at the purified images grafted
    onto one draw's purification, grafting.py; needs a PurifiedModel).
    """

    kind: str = "pgd"
    name: str | None = None
    norm: str = "linf"
    eps: float = 0.1
    steps: int = 200
    step_size: float | None = None
    eot: int = 20
    random_start: bool = True
    gradient: str = "full"
    surrogate_sampler: str = "ddim"
    surrogate_steps: int = 5
    checkpointing: bool = False
    n_queries: int = REFERENCE_SQUARE_QUERIES
    restarts: int | None = None
    loss: str = "ce+margin"
    momentum: float = 0.75
    select_draws: int = 4
    eot_weighting: str = "mean"
    graft: bool = False

    def __post_init__(self) -> None:
        """Check every field (ValueError naming it); numbers are stored as plain floats/ints."""
        where = f"attack {self.name or self.kind!r}: "
        try:
            check_choice("kind", self.kind, KINDS)
            if self.name is not None:
                check_name("name", self.name)
            check_choice("norm", self.norm, NORMS)
            # eps = 0 is allowed: the no-attack point of an eps sweep (see sanity.py).
            self.eps = check_number("eps", self.eps, non_negative=True)
            least = 1 if self.kind in ("autoattack-rand", "apgd-eot") else 0
            self.steps = check_int("steps", self.steps, least)
            if self.step_size is not None:
                self.step_size = check_number("step_size", self.step_size, positive=True)
            self.eot = check_int("eot", self.eot, 1)
            check_bool("random_start", self.random_start)
            check_choice("gradient", self.gradient, GRADIENTS)
            check_choice("surrogate_sampler", self.surrogate_sampler, SAMPLERS)
            self.surrogate_steps = check_int("surrogate_steps", self.surrogate_steps, 1)
            check_bool("checkpointing", self.checkpointing)
            self.n_queries = check_int("n_queries", self.n_queries, 1)
            if self.restarts is not None:
                self.restarts = check_int("restarts", self.restarts, 1)
            if self.kind == "apgd-eot" and self.n_restarts > self.steps:
                raise ValueError(f"restarts must be <= steps ({self.steps}), each restart needs "
                                 f"a gradient iteration, got {self.restarts}")
            check_choice("loss", self.loss, LOSS_PLANS)
            self.momentum = check_number("momentum", self.momentum, positive=True)
            if self.momentum > 1:
                raise ValueError(f"momentum must lie in (0, 1], got {self.momentum!r}")
            self.select_draws = check_int("select_draws", self.select_draws, 0)
            check_choice("eot_weighting", self.eot_weighting, EOT_WEIGHTINGS)
            check_bool("graft", self.graft)
            if self.graft and self.kind != "apgd-eot":
                raise ValueError(f"graft=True is an option of apgd-eot, not of {self.kind!r}")
        except ValueError as error:
            raise ValueError(where + str(error)) from None
        if self.name is None:
            self.name = self.kind
        if self.kind in ("transfer", "square"):
            self.eot = 1  # the undefended classifier and a query attack draw no noise to average

    @property
    def label(self) -> str:
        return self.name or self.kind

    @property
    def alpha(self) -> float:
        """The step size actually used (apgd-eot: the initial one)."""
        if self.step_size is not None:
            return self.step_size
        return 2 * self.eps if self.kind == "apgd-eot" else self.eps / 4

    @property
    def gradient_mode(self) -> str:
        """What the attacker differentiates, as written in reports."""
        if self.kind == "bpda":
            return "bpda"
        if self.kind == "transfer":
            return "transfer from undefended"
        if self.kind == "square":
            return "black-box"
        if self.gradient == "surrogate":
            return f"surrogate({self.surrogate_sampler}, {self.surrogate_steps} steps)"
        return "full"

    @property
    def reduced(self) -> bool:
        """True when the setting is below the protocol's reference (to be reported as such)."""
        if self.kind == "square":
            return self.n_queries < REFERENCE_SQUARE_QUERIES
        if self.kind == "transfer":
            return self.steps < REFERENCE_STEPS
        if self.kind == "autoattack-rand":
            return self.steps < REFERENCE_APGD_STEPS or self.eot < REFERENCE_EOT
        return self.steps < REFERENCE_STEPS or self.eot < REFERENCE_EOT

    @property
    def n_restarts(self) -> int:
        """apgd-eot's restarts: as set, or one per 100 gradient iterations (at least one)."""
        return default_restarts(self.steps) if self.restarts is None else self.restarts

    @property
    def gradient_evaluations(self) -> int:
        """Forward + backward passes per example through the attacked model (autoattack-rand:
        at most, it skips examples already misclassified; square: none)."""
        if self.kind == "square":
            return 0
        if self.kind == "transfer":
            return self.steps
        if self.kind == "autoattack-rand":
            return 2 * (self.steps + 1) * self.eot  # APGD-CE then APGD-DLR, start point included
        return self.steps * self.gradient_evaluations_per_iteration

    @property
    def gradient_evaluations_per_iteration(self) -> int:
        """eot, or 1 with graft (one backward pass carries all the draws' gradients)."""
        return 1 if self.graft else self.eot

    @property
    def crafting_forward_passes(self) -> int:
        """Forward passes per example without a graph while crafting (graft: eot - 1 per
        iteration; each also costs a backward pass through the classifier alone)."""
        return self.steps * (self.eot - 1) if self.graft else 0

    @property
    def selection_forward_passes(self) -> int:
        """Forward passes per example spent choosing among candidates on fresh draws."""
        if self.kind != "apgd-eot":
            return 0
        return CANDIDATES_PER_RESTART * self.n_restarts * self.select_draws

    def replace(self, **changes: Any) -> AttackSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.label, "kind": self.kind, "norm": self.norm, "eps": self.eps,
            "steps": self.steps, "step_size": self.alpha, "eot": 1 if self.kind == "square" else self.eot,
            # APGD and Square always start from a random point of their own.
            "random_start": self.random_start or self.kind in ("autoattack-rand", "square"),
            "gradient_mode": self.gradient_mode,
            "checkpointing": self.checkpointing,
            "n_queries": self.n_queries if self.kind == "square" else None,
            "reduced": self.reduced,
            **self._apgd_settings(),
            "gradient_evaluations": self.gradient_evaluations,
            "crafting_forward_passes": self.crafting_forward_passes,
            "selection_forward_passes": self.selection_forward_passes,
        }

    def _apgd_settings(self) -> dict[str, Any]:
        """apgd-eot's own settings, None for every other kind."""
        if self.kind != "apgd-eot":
            return dict.fromkeys(APGD_KEYS)
        return {
            "restarts": self.n_restarts, "loss": self.loss, "momentum": self.momentum,
            "select_draws": self.select_draws, "eot_weighting": self.eot_weighting,
            "graft": self.graft,
            "step_schedule": {
                "initial_step": self.alpha, "first_checkpoint": FIRST_CHECKPOINT,
                "checkpoint_shrink": CHECKPOINT_SHRINK, "min_checkpoint": MIN_CHECKPOINT,
                "rho": RHO, "candidates_per_restart": CANDIDATES_PER_RESTART,
                "randomised_review": RANDOMISED_REVIEW,
                "randomised_initial_step": (self.step_size if self.step_size is not None
                                            else RANDOMISED_INITIAL_STEP * self.eps),
            },
        }

    def identity(self) -> dict[str, Any]:
        """The settings that make two attacks the same (batch keys): to_dict without the budget,
        which follows from them, and without the apgd-eot settings of other kinds (so batches
        stored before those settings existed keep their keys; graft only when it is on)."""
        settings = self.to_dict()
        for key in ("gradient_evaluations", "crafting_forward_passes", "selection_forward_passes"):
            del settings[key]
        for key in APGD_KEYS:
            if settings[key] is None or (key == "graft" and not settings[key]):
                del settings[key]
        return settings


APGD_KEYS = ("restarts", "loss", "momentum", "select_draws", "eot_weighting", "graft",
             "step_schedule")


def parse_attack(text: str) -> AttackSpec:
    """An AttackSpec from "kind" or "kind:key=value,key=value" (the command line's syntax).

    Example: "pgd:eps=0.1,steps=20,eot=4,norm=l2,name=pgd-l2". Unknown keys, repeated keys and
    values of the wrong type (steps=2.5, eot=many) are refused with a ValueError naming the key.
    """
    if not isinstance(text, str):
        raise ValueError(f"an attack string must be a str, got {type(text).__name__}")
    kind, _, rest = text.partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise ValueError(f"attack kind must be one of {KINDS}, got {kind!r} in {text!r}")
    fields = {f.name: f for f in dataclasses.fields(AttackSpec)}
    known = sorted(set(fields) - {"kind"})
    values: dict[str, Any] = {}
    for item in rest.split(","):
        if not item.strip():
            continue
        key, equals, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not equals:
            raise ValueError(f"attack setting {item.strip()!r} in {text!r} is not key=value")
        if key not in fields or key == "kind":
            raise ValueError(f"unknown attack setting {key!r} in {text!r}; known: {known}")
        if key in values:
            raise ValueError(f"attack setting {key!r} is given twice in {text!r}")
        try:
            values[key] = _parse_value(raw.strip(), fields[key].type)
        except ValueError as error:
            raise ValueError(f"attack setting {key}={raw.strip()!r} in {text!r}: {error}") from None
    return AttackSpec(kind=kind, **values)


def _parse_value(raw: str, annotation: str) -> Any:
    if "bool" in annotation:
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected true or false, got {raw!r}")
        return raw.lower() in ("true", "1", "yes")
    if "float" in annotation:
        if "None" in annotation and raw.lower() in ("none", "null"):
            return None
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
    if "int" in annotation:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
    if not raw:
        raise ValueError("expected a value, got nothing")
    return raw


def default_attacks(norm: str = "linf", eps: float = 0.1, steps: int = REFERENCE_STEPS,
                    eot: int = REFERENCE_EOT, n_queries: int = REFERENCE_SQUARE_QUERIES
                    ) -> list[AttackSpec]:
    """The protocol's set: APGD-EOT (the primary), PGD-EOT at the same budget (full gradient),
    AutoAttack rand, BPDA+EOT, transfer, Square."""
    common = {"norm": norm, "eps": eps}
    return [
        AttackSpec("apgd-eot", **common, steps=steps, eot=eot),
        AttackSpec("pgd", **common, steps=steps, eot=eot),
        AttackSpec("autoattack-rand", **common, steps=min(steps, REFERENCE_APGD_STEPS), eot=eot),
        AttackSpec("bpda", **common, steps=steps, eot=eot),
        AttackSpec("transfer", **common, steps=steps, eot=1),
        AttackSpec("square", **common, n_queries=n_queries),
    ]


def attacked_model(spec: AttackSpec, model: nn.Module, undefended: nn.Module | None) -> nn.Module:
    """The model whose gradients (or queries) the attack uses; the verdict always uses `model`."""
    if spec.kind == "transfer":
        if undefended is None:
            raise ValueError(
                "the transfer attack needs the undefended classifier: pass a PurifiedModel or "
                "undefended=<classifier on [0, 1] images>"
            )
        return undefended
    if spec.kind == "square":
        return model
    changes: dict[str, Any] = {}
    if spec.kind == "bpda":
        changes["gradient_mode"] = "bpda"
    elif spec.gradient == "surrogate":
        changes.update(gradient_mode="surrogate", surrogate_sampler=spec.surrogate_sampler,
                       surrogate_steps=spec.surrogate_steps)
    if spec.checkpointing:
        changes["checkpointing"] = True
    purifier = getattr(model, "purifier", None)
    if not changes or (purifier is None and hasattr(model, "with_purifier")):
        return model  # nothing to approximate in an undefended model
    if purifier is None:
        raise ValueError(
            f"attack {spec.label!r} ({spec.gradient_mode}) changes the purifier's backward, which "
            "needs a PurifiedModel"
        )
    return model.with_purifier(purifier.with_settings(**changes))


# The attacks that run here one gradient iteration at a time (the others run in torchattacks).
STEPPED_KINDS = ("apgd-eot", "pgd", "bpda", "transfer")


def run_attack(
    spec: AttackSpec, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int,
    on_step: Callable[[], object] | None = None, trace: AttackTrace | None = None,
) -> torch.Tensor:
    """Adversarial images from `model` (already the attacked variant); `seed` fixes all its noise.
    on_step: called after each gradient iteration of the STEPPED_KINDS attacks (progress bars);
    trace: filled with their crafting draws' answers per iteration (convergence curve)."""
    torch.manual_seed(seed)
    if spec.kind == "apgd-eot":
        return apgd_eot(
            model, images, labels, eps=spec.eps, steps=spec.steps, eot=spec.eot, norm=spec.norm,
            restarts=spec.n_restarts, loss=spec.loss, momentum=spec.momentum,
            initial_step=spec.step_size, select_draws=spec.select_draws,
            eot_weighting=spec.eot_weighting, graft=spec.graft, random_start=spec.random_start,
            selection_seed=derive_seed(seed, "selection"), on_step=on_step, trace=trace,
        )
    if spec.kind in STEPPED_KINDS:
        return eot_pgd(
            model, images, labels, eps=spec.eps, step_size=spec.alpha, steps=spec.steps,
            eot=spec.eot, norm=spec.norm, random_start=spec.random_start, on_step=on_step,
            trace=trace,
        )
    norm = "Linf" if spec.norm == "linf" else "L2"
    n_classes = _n_classes(model, images[:1])
    if spec.kind == "autoattack-rand":
        attack = torchattacks.AutoAttack(
            model, norm=norm, eps=spec.eps, version="rand", n_classes=n_classes, seed=seed
        )
        for apgd in attack._autoattack.attacks:  # torchattacks fixes EOT 20 and 10 steps
            apgd.steps, apgd.eot_iter = spec.steps, spec.eot
    else:
        attack = torchattacks.Square(
            model, norm=norm, eps=spec.eps, n_queries=spec.n_queries, seed=seed
        )
    attack.set_device(images.device)
    return attack(images, labels).detach()


@torch.no_grad()
def _n_classes(model: nn.Module, image: torch.Tensor) -> int:
    return int(model(image).shape[-1])
