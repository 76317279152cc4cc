"""Named attack settings and how each one runs against a model from [0, 1] images to logits.

| kind            | what it does                                                  | gradient       |
|-----------------|---------------------------------------------------------------|----------------|
| pgd             | PGD with EOT through the whole purified model (the primary)   | full/surrogate |
| autoattack-rand | torchattacks AutoAttack version="rand": APGD-CE + APGD-DLR, EOT | full/surrogate |
| bpda            | PGD with EOT, the purifier's backward replaced by the identity | bpda          |
| transfer        | PGD crafted on the undefended classifier, replayed on the defence | transfer     |
| square          | Square attack, queries only                                    | black-box     |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torchattacks
from torch import nn

from purifyguard.evaluation.pgd import NORMS, eot_pgd

KINDS = ("pgd", "autoattack-rand", "bpda", "transfer", "square")
GRADIENTS = ("full", "surrogate")
# Reference settings of the protocol (shared/METHOD.md section 5, after Lee and Kim 2023).
REFERENCE_STEPS = 200
REFERENCE_EOT = 20
REFERENCE_APGD_STEPS = 100  # AutoAttack's own iteration count for APGD
REFERENCE_SQUARE_QUERIES = 5000


@dataclass
class AttackSpec:
    """One attack, fully described: the record of every result carries all of these fields.

    step_size: None means eps / 4 (the protocol's default; 0.007 is its choice for 8/255).
    steps: iterations (APGD iterations per loss for autoattack-rand; unused by square).
    eot: gradient samples per iteration (EOT), 1 for no EOT.
    gradient: "full" differentiates the defended process; "surrogate" differentiates a cheaper
        one (surrogate_sampler with surrogate_steps steps) while the verdict uses the real one.
    checkpointing: recompute reverse steps in the backward (same gradient, less memory).
    n_queries: model queries of the square attack.
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

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"attack kind must be one of {KINDS}, got {self.kind!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {self.gradient!r}")
        if self.eps < 0 or self.steps < 0 or self.eot < 1 or self.n_queries < 1:
            raise ValueError(f"attack {self.label}: need eps >= 0, steps >= 0, eot >= 1, queries >= 1")
        if self.name is None:
            self.name = self.kind
        if self.kind in ("transfer", "square"):
            self.eot = 1  # the undefended classifier and a query attack draw no noise to average

    @property
    def label(self) -> str:
        return self.name or self.kind

    @property
    def alpha(self) -> float:
        """The step size actually used."""
        return self.eps / 4 if self.step_size is None else self.step_size

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
        }


def parse_attack(text: str) -> AttackSpec:
    """An AttackSpec from "kind" or "kind:key=value,key=value" (the command line's syntax).

    Example: "pgd:eps=0.1,steps=20,eot=4,norm=l2,name=pgd-l2".
    """
    kind, _, rest = text.partition(":")
    fields = {f.name: f for f in dataclasses.fields(AttackSpec)}
    values: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in fields or key == "kind":
            raise ValueError(f"unknown attack setting {key!r} in {text!r}; known: {sorted(fields)}")
        values[key] = _parse_value(raw.strip(), fields[key].type)
    return AttackSpec(kind=kind.strip(), **values)


def _parse_value(raw: str, annotation: str) -> Any:
    if "bool" in annotation:
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected true or false, got {raw!r}")
        return raw.lower() in ("true", "1", "yes")
    if "float" in annotation:
        return None if raw.lower() == "none" else float(raw)
    if "int" in annotation:
        return int(raw)
    return raw


def default_attacks(norm: str = "linf", eps: float = 0.1, steps: int = REFERENCE_STEPS,
                    eot: int = REFERENCE_EOT, n_queries: int = REFERENCE_SQUARE_QUERIES
                    ) -> list[AttackSpec]:
    """The protocol's set: PGD-EOT (full gradient), AutoAttack rand, BPDA+EOT, transfer, Square."""
    common = {"norm": norm, "eps": eps}
    return [
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


def run_attack(
    spec: AttackSpec, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int
) -> torch.Tensor:
    """Adversarial images from `model` (already the attacked variant); `seed` fixes all its noise."""
    torch.manual_seed(seed)
    if spec.kind in ("pgd", "bpda", "transfer"):
        return eot_pgd(
            model, images, labels, eps=spec.eps, step_size=spec.alpha, steps=spec.steps,
            eot=spec.eot, norm=spec.norm, random_start=spec.random_start,
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
