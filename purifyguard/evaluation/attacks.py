"""Named attack settings (AttackSpec, parse_attack) and how each one runs against a model from
[0, 1] images to logits. The kinds, and what differs between them, are the registered Attacks of
attack_registry.py (apgd-eot, pgd, autoattack-rand, bpda, transfer, square, feature and any added
with register_attack).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from purifyguard.config import SAMPLERS
from purifyguard.evaluation.apgd import LOSS_PLANS, default_restarts
from purifyguard.evaluation.arguments import check_name
from purifyguard.evaluation.attack_registry import (
    APGD_KEYS,
    ATTACKS,
    REFERENCE_APGD_STEPS,
    REFERENCE_EOT,
    REFERENCE_SQUARE_QUERIES,
    REFERENCE_STEPS,
    Attack,
    Kinds,
    registered_attacks,
)
from purifyguard.evaluation.em_weighting import EOT_WEIGHTINGS
from purifyguard.evaluation.exposed_attacks import (
    INITS,
    SOURCES,
    GuidanceClassifier,
    guidance_of,
)
from purifyguard.evaluation.pgd import NORMS
from purifyguard.evaluation.seeds import derive_seed
from purifyguard.evaluation.smooth_substitute import (
    DEFAULT_BETA,
    DEFAULT_POOL,
    POOLS,
    SUBSTITUTES,
    SmoothSubstituteModel,
    smooth_substitute,
)
from purifyguard.evaluation.trace import AttackTrace
from purifyguard.validation import check_bool, check_choice, check_int, check_number

# The record's init: which of the init attack's settings it keeps.
INIT_KEYS = ("name", "kind", "norm", "eps", "steps", "step_size", "random_start", "gradient_mode",
             "gradient_evaluations")
KINDS = Kinds(lambda attack: True)  # the registered kinds, as they stand at each use
# The attacks that call on_step once per gradient iteration (harness.py shows their steps).
STEPPED_KINDS = Kinds(lambda attack: attack.stepped)
GRADIENTS = ("full", "surrogate")


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
    apgd-eot and pgd only (smooth_substitute.py): substitute ("smooth" = "softplus", "silu",
    "gelu"; None: off) runs the real defence forward and differentiates a stand-in whose
    guidance network has its ReLUs made smooth with that activation and its max pooling
    replaced by substitute_pool ("lse": LogSumExp, "avg"), sharpness substitute_beta, on the
    same noise. These three enter the record (gradient_mode) and the batch keys only when
    substitute is set.
    From what the defence exposes (exposed_attacks.py): source (transfer only) is what the
    transfer attack crafts on, "undefended" (the bare classifier) or "guidance" (the purifier's
    guidance network); the record's gradient_mode says which. init (apgd-eot and pgd only;
    "transfer-guidance" or "feature", None: off) starts the attack from that cheap attack's
    examples (same eps and norm, init_steps steps, None: REFERENCE_STEPS) instead of a random
    point; the record's init describes it. Both stay out of the batch keys at their defaults.
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
    substitute: str | None = None
    substitute_beta: float = DEFAULT_BETA
    substitute_pool: str = DEFAULT_POOL
    source: str = "undefended"
    init: str | None = None
    init_steps: int | None = None

    def __post_init__(self) -> None:
        """Check every field (ValueError naming it); numbers are stored as plain floats/ints."""
        where = f"attack {self.name or self.kind!r}: "
        try:
            check_choice("kind", self.kind, registered_attacks())
            attack = self.attack
            if self.name is not None:
                check_name("name", self.name)
            check_choice("norm", self.norm, NORMS)
            # eps = 0 is allowed: the no-attack point of an eps sweep (see sanity.py).
            self.eps = check_number("eps", self.eps, non_negative=True)
            if self.norm == "linf" and self.eps > 1:
                raise ValueError(
                    f"eps={self.eps:g} is an L-inf radius on images in [0, 1], so it must be <= 1 "
                    "(1 already allows any image); 8/255 is written eps=0.0314, not eps=8")
            self.steps = check_int("steps", self.steps, attack.min_steps)
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
            check_choice("loss", self.loss, LOSS_PLANS)
            self.momentum = check_number("momentum", self.momentum, positive=True)
            if self.momentum > 1:
                raise ValueError(f"momentum must lie in (0, 1], got {self.momentum!r}")
            self.select_draws = check_int("select_draws", self.select_draws, 0)
            check_choice("eot_weighting", self.eot_weighting, EOT_WEIGHTINGS)
            check_bool("graft", self.graft)
            if self.graft and "graft" not in attack.options:
                owners = ", ".join(k for k, a in ATTACKS.items() if "graft" in a.options)
                raise ValueError(f"graft=True is an option of {owners}, not of {self.kind!r}")
            self._check_substitute(attack)
            self._check_exposed(attack)
            attack.validate(self)
        except ValueError as error:
            raise ValueError(where + str(error)) from None
        if self.name is None:
            self.name = self.kind
        if not attack.uses_eot:
            self.eot = 1  # e.g. the undefended classifier and a query attack: no noise to average

    def _check_substitute(self, attack: Attack) -> None:
        if isinstance(self.substitute, str) and self.substitute.lower() == "none":
            self.substitute = None
        self.substitute_beta = check_number("substitute_beta", self.substitute_beta, positive=True)
        check_choice("substitute_pool", self.substitute_pool, POOLS)
        if self.substitute is None:
            if self.substitute_beta != DEFAULT_BETA or self.substitute_pool != DEFAULT_POOL:
                raise ValueError("substitute_beta and substitute_pool shape the smooth stand-in: "
                                 "set substitute (e.g. substitute=smooth) to use them")
            return
        check_choice("substitute", self.substitute, SUBSTITUTES)
        if "substitute" not in attack.options or attack.access != "white-box":
            owners = ", ".join(k for k, a in ATTACKS.items()
                               if "substitute" in a.options and a.access == "white-box")
            raise ValueError(f"substitute={self.substitute!r} is an option of {owners}, not of "
                             f"{self.kind!r}")

    def _check_exposed(self, attack: Attack) -> None:
        check_choice("source", self.source, SOURCES)
        if self.source != "undefended" and "source" not in attack.options:
            raise ValueError(f"source={self.source!r} is an option of {_owners('source')}, not "
                             f"of {self.kind!r}")
        if isinstance(self.init, str) and self.init.lower() == "none":
            self.init = None
        if self.init is not None:
            check_choice("init", self.init, tuple(INITS))
            if "init" not in attack.options:
                raise ValueError(f"init={self.init!r} is an option of {_owners('init')}, not of "
                                 f"{self.kind!r}")
        if self.init_steps is not None:
            self.init_steps = check_int("init_steps", self.init_steps, 1)
            if self.init is None:
                raise ValueError("init_steps is the budget of the init attack: set init (e.g. "
                                 "init=feature) to use it")

    @property
    def transfer_source(self) -> str:
        """What a transfer-access kind crafts on: the spec's source where the kind takes the
        option, else the kind's own (Attack.source)."""
        return self.source if "source" in self.attack.options else self.attack.source

    @property
    def init_spec(self) -> AttackSpec | None:
        """The cheap attack this one starts from (same norm and eps), None without init."""
        if self.init is None:
            return None
        kind, settings = INITS[self.init]
        steps = REFERENCE_STEPS if self.init_steps is None else self.init_steps
        return AttackSpec(kind, name=self.init, norm=self.norm, eps=self.eps, steps=steps,
                          **settings)

    @property
    def substitute_activation(self) -> str | None:
        """The stand-in's activation ("smooth" is softplus); None without a substitute."""
        if self.substitute is None:
            return None
        return "softplus" if self.substitute == "smooth" else self.substitute

    @property
    def attack(self) -> Attack:
        """The registered Attack of this kind (attack_registry.py)."""
        try:
            return ATTACKS[self.kind]
        except KeyError:
            raise ValueError(f"attack kind {self.kind!r} is not registered (any more); "
                             f"registered: {registered_attacks()}") from None

    @property
    def label(self) -> str:
        return self.name or self.kind

    @property
    def alpha(self) -> float:
        """The step size actually used (apgd-eot: the initial one); by default the kind's
        default_step times eps (eps / 4; apgd-eot 2 eps)."""
        if self.step_size is not None:
            return self.step_size
        return self.attack.default_step * self.eps

    @property
    def gradient_mode(self) -> str:
        """What the attacker differentiates, as written in reports."""
        access = self.attack.access
        if access == "transfer":
            return ("transfer from guidance network" if self.transfer_source == "guidance"
                    else "transfer from undefended")
        if access != "white-box":
            return access
        mode = "full"
        if self.gradient == "surrogate":
            mode = f"surrogate({self.surrogate_sampler}, {self.surrogate_steps} steps)"
        if self.substitute is None:
            return mode
        substitute = (f"smooth substitute ({self.substitute_activation}, "
                      f"beta={self.substitute_beta!r}, {self.substitute_pool} pool)")
        return substitute if mode == "full" else f"{mode} + {substitute}"

    @property
    def reduced(self) -> bool:
        """True when the setting is below the protocol's reference (to be reported as such)."""
        return self.attack.reduced(self)

    @property
    def n_restarts(self) -> int:
        """apgd-eot's restarts: as set, or one per 100 gradient iterations (at least one)."""
        return default_restarts(self.steps) if self.restarts is None else self.restarts

    @property
    def gradient_evaluations(self) -> int:
        """Forward + backward passes per example through the attacked model (autoattack-rand:
        at most, it skips examples already misclassified; square: none)."""
        return self.attack.gradient_evaluations(self)

    @property
    def gradient_evaluations_per_iteration(self) -> int:
        """eot, or 1 with graft (one backward pass carries all the draws' gradients)."""
        return 1 if self.graft else self.eot

    @property
    def crafting_forward_passes(self) -> int:
        """Forward passes per example without a graph while crafting (graft: eot - 1 per
        iteration; each also costs a backward pass through the classifier alone; substitute:
        one real pass beside each differentiated stand-in pass)."""
        passes = self.steps * (self.eot - 1) if self.graft else 0
        if self.substitute is not None:
            passes += self.steps * self.gradient_evaluations_per_iteration
        return passes

    @property
    def selection_forward_passes(self) -> int:
        """Forward passes per example spent choosing among candidates on fresh draws."""
        return self.attack.selection_forward_passes(self)

    def replace(self, **changes: Any) -> AttackSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        attack = self.attack
        return {
            "name": self.label, "kind": self.kind, "norm": self.norm, "eps": self.eps,
            "steps": self.steps, "step_size": self.alpha,
            "eot": self.eot if attack.uses_eot else 1,
            # APGD and Square always start from a random point of their own.
            "random_start": self.random_start or attack.always_random_start,
            "gradient_mode": self.gradient_mode,
            "checkpointing": self.checkpointing,
            "n_queries": self.n_queries if "n_queries" in attack.options else None,
            "reduced": self.reduced,
            **self._apgd_settings(),
            "gradient_evaluations": self.gradient_evaluations,
            "crafting_forward_passes": self.crafting_forward_passes,
            "selection_forward_passes": self.selection_forward_passes,
            "init": self._init_record(),
        }

    def _init_record(self) -> dict[str, Any] | None:
        """What the attack started from: the init attack's settings and budget (None: none)."""
        init = self.init_spec
        if init is None:
            return None
        record = init.to_dict()
        return {key: record[key] for key in INIT_KEYS}

    def _apgd_settings(self) -> dict[str, Any]:
        """The kind's own settings (apgd-eot's), None for the keys it has none of."""
        own = self.attack.own_settings(self)
        if not set(own) <= set(APGD_KEYS):
            raise ValueError(f"attack kind {self.kind!r}: own_settings may only set {APGD_KEYS}, "
                             f"got {sorted(own)}")
        return {**dict.fromkeys(APGD_KEYS), **own}

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
        if settings["init"] is None:
            del settings["init"]  # batches stored before init existed keep their keys
        return settings


def _owners(option: str) -> str:
    """The registered kinds that take `option` (Attack.options), for messages."""
    return ", ".join(kind for kind, attack in ATTACKS.items() if option in attack.options)


def parse_attack(text: str) -> AttackSpec:
    """An AttackSpec from "kind" or "kind:key=value,key=value" (the command line's syntax).

    Example: "pgd:eps=0.1,steps=20,eot=4,norm=l2,name=pgd-l2". Unknown keys, repeated keys and
    values of the wrong type (steps=2.5, eot=many) are refused with a ValueError naming the key.
    """
    if not isinstance(text, str):
        raise ValueError(f"an attack string must be a str, got {type(text).__name__}")
    kind, _, rest = text.partition(":")
    kind = kind.strip()
    if kind not in ATTACKS:
        raise ValueError(f"attack kind must be one of {registered_attacks()}, got {kind!r} in "
                         f"{text!r}")
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
    """The model whose gradients (or queries) the attack uses, as its kind's access says; the
    verdict always uses `model`. With spec.substitute, a SmoothSubstituteModel: that model's
    value, a smooth stand-in's gradient (smooth_substitute.py). Crafting on the guidance network
    (transfer:source=guidance, feature): a GuidanceClassifier of `model` (exposed_attacks.py).
    With spec.init, `model` must have a guidance network (checked here, used by run_attack)."""
    if spec.init is not None:
        guidance_of(model, f"init={spec.init!r}")
    attacked = _gradient_model(spec, model, undefended)
    if spec.substitute is None:
        return attacked
    return smooth_substitute(attacked, spec.substitute_activation, spec.substitute_beta,
                             spec.substitute_pool)


def _gradient_model(spec: AttackSpec, model: nn.Module, undefended: nn.Module | None
                    ) -> nn.Module:
    access = spec.attack.access
    if access == "transfer" and spec.transfer_source == "guidance":
        what = ("transfer:source=guidance" if spec.kind == "transfer"
                else f"the {spec.kind} attack")
        return GuidanceClassifier(model, what)
    if access == "transfer":
        if undefended is None:
            raise ValueError(
                f"the {spec.kind} attack needs the undefended classifier: pass a PurifiedModel or "
                "undefended=<classifier on [0, 1] images>"
            )
        return undefended
    if access == "black-box":
        return model
    changes: dict[str, Any] = {}
    if access == "bpda":
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
    spec: AttackSpec, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int,
    on_step: Callable[[], object] | None = None, trace: AttackTrace | None = None,
) -> torch.Tensor:
    """Adversarial images from `model` (already the attacked variant); `seed` fixes all its noise.
    on_step: called after each gradient iteration of the STEPPED_KINDS attacks (progress bars);
    trace: filled with their crafting draws' answers per iteration (convergence curve).
    A SmoothSubstituteModel first measures its forward distance on the batch (its own noise,
    from `seed`; model.record() holds it). With spec.init, the init attack runs first on the
    guidance network of `model` (its own seed, derived from `seed`), and the attack's run gets
    its examples as start= (where it begins instead of a random point; a ValueError naming
    init when the kind's run takes no start)."""
    if isinstance(model, SmoothSubstituteModel):
        model.measure(images, derive_seed(seed, "substitute distance"))
    if spec.init is None:
        torch.manual_seed(seed)
        return spec.attack.run(spec, model, images, labels, seed=seed, on_step=on_step,
                               trace=trace)
    if not spec.attack.takes_start():
        raise ValueError(f"attack {spec.label!r}: init={spec.init!r} starts the attack from the "
                         f"{spec.init} attack's examples, passed to its run as start=, but the "
                         f"run of attack kind {spec.kind!r} takes no start argument")
    start = initial_examples(spec, model, images, labels, seed)
    torch.manual_seed(seed)
    return spec.attack.run(spec, model, images, labels, seed=seed, on_step=on_step,
                           trace=trace, start=start)


def initial_examples(spec: AttackSpec, model: nn.Module, images: torch.Tensor,
                     labels: torch.Tensor, seed: int) -> torch.Tensor:
    """The adversarial examples of spec.init_spec (crafted on the guidance network of `model`,
    the attacked model or the defence), where spec starts from."""
    init = spec.init_spec
    if init is None:
        raise ValueError(f"attack {spec.label!r} has no init")
    crafted_on = GuidanceClassifier(model, f"init={spec.init!r}")
    init_seed = derive_seed(seed, "init", spec.init)
    torch.manual_seed(init_seed)
    return init.attack.run(init, crafted_on, images, labels, seed=init_seed, on_step=None,
                           trace=None).detach()
