"""The attack kinds AttackSpec knows: each kind is one registered Attack, which holds what differs
between kinds (how it crafts, its default step, which settings apply, its budget, its checks).

| kind            | what it does                                                  | gradient       |
|-----------------|---------------------------------------------------------------|----------------|
| apgd-eot        | APGD with EOT, CE/margin restarts, selection on fresh draws   | full/surrogate |
| pgd             | PGD with EOT through the whole purified model                 | full/surrogate |
| autoattack-rand | torchattacks AutoAttack version="rand": APGD-CE + APGD-DLR, EOT | full/surrogate |
| bpda            | PGD with EOT, the purifier's backward replaced by the identity | bpda          |
| transfer        | PGD crafted on the undefended classifier, replayed on the defence | transfer     |
| square          | Square attack, queries only                                    | black-box     |
| feature         | PGD on the guidance network's features, toward another class  | transfer      |

apgd-eot and pgd also take substitute= (smooth_substitute.py): the real defence forward, a smooth
stand-in of its guidance network backward, on the same noise. From what the defence exposes
(exposed_attacks.py): transfer takes source=guidance (crafted on the purifier's guidance network),
and apgd-eot and pgd take init=transfer-guidance|feature (start from that attack's examples).

A kind of your own, by one decorated function (or an Attack subclass, with run as a method):

    @register_attack("fgsm", default_step=1.0)
    def fgsm(spec, model, images, labels):  # may also take seed=, on_step=, trace=, start=
        images = images.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        return images + spec.alpha * torch.autograd.grad(loss, images)[0].sign()

    parse_attack("fgsm:eps=0.1,steps=1")  # and evaluate(model, data, ["fgsm:eps=0.1"], ...)
"""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torchattacks
from torch import nn

from purifyguard.evaluation.apgd import (
    CANDIDATES_PER_RESTART,
    CHECKPOINT_SHRINK,
    FIRST_CHECKPOINT,
    MIN_CHECKPOINT,
    RANDOMISED_INITIAL_STEP,
    RANDOMISED_REVIEW,
    RHO,
    apgd_eot,
)
from purifyguard.evaluation.exposed_attacks import SOURCES, feature_pgd
from purifyguard.evaluation.pgd import eot_pgd
from purifyguard.evaluation.seeds import derive_seed
from purifyguard.validation import check_bool, check_choice, check_int, check_number

if TYPE_CHECKING:
    from purifyguard.evaluation.attacks import AttackSpec
    from purifyguard.evaluation.trace import AttackTrace

# Reference settings of the protocol (docs/evaluation.md, "The protocol"; after Lee and Kim 2023).
REFERENCE_STEPS = 200
REFERENCE_EOT = 20
REFERENCE_APGD_STEPS = 100  # AutoAttack's own iteration count for APGD
REFERENCE_SQUARE_QUERIES = 5000

# What the attacker uses: the defence's gradient (full or surrogate, as the spec says), that
# gradient with the purifier's backward replaced by the identity, the gradient of a network
# crafted on alone (the undefended classifier or the guidance network, see Attack.source), or
# the defence's answers only.
ACCESS = ("white-box", "bpda", "transfer", "black-box")
# AttackSpec fields that apply to some kinds only (Attack.options); the others apply to all.
OPTIONS = ("n_queries", "restarts", "loss", "momentum", "select_draws", "eot_weighting", "graft",
           "substitute", "source", "init")
# The record keys of kind-specific settings (Attack.own_settings), None for the other kinds.
APGD_KEYS = ("restarts", "loss", "momentum", "select_draws", "eot_weighting", "graft",
             "step_schedule")
_CONTEXT = ("seed", "on_step", "trace", "start")
_KIND = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


class Attack:
    """One attack kind. Subclass it (run as a method) or give register_attack a function; the
    class attributes below are its defaults, each settable as a keyword of register_attack.

    description: one line for listings (default: the docstring's first line).
    default_step: the step size when the spec's step_size is None, in units of eps.
    min_steps: the least steps a spec of this kind may ask for.
    uses_eot: False pins eot to 1 (nothing random to average over).
    access: one of ACCESS; picks the model run() gets and the report's gradient_mode.
    source: for access "transfer", what run() crafts on: "undefended" (the bare classifier) or
        "guidance" (the purifier's guidance network, exposed_attacks.GuidanceClassifier); a kind
        with the option "source" lets the spec's source decide.
    always_random_start: the attack starts from a random point whatever random_start says.
    stepped: run() calls on_step after each of the spec's steps (per-iteration progress).
    options: the fields of OPTIONS that apply (n_queries for square, the APGD settings,
        substitute for the white-box kinds that differentiate a smooth stand-in on request,
        source for transfer, init for the kinds whose run() takes start= and begins there...).
    reference_steps / reference_eot / reference_queries: the protocol's reference; a spec below
        one of them is reported as reduced (steps None: not compared; eot only when uses_eot;
        queries only when n_queries is an option).
    """

    kind: str = ""
    description: str = ""
    default_step: float = 0.25
    min_steps: int = 0
    uses_eot: bool = True
    access: str = "white-box"
    source: str = "undefended"
    always_random_start: bool = False
    stepped: bool = False
    options: tuple[str, ...] = ()
    reference_steps: int | None = REFERENCE_STEPS
    reference_eot: int = REFERENCE_EOT
    reference_queries: int = REFERENCE_SQUARE_QUERIES

    def __init__(self, function: Callable[..., torch.Tensor] | None = None, **settings: Any):
        for key, value in settings.items():
            if key not in PROPERTIES:
                raise ValueError(f"unknown attack property {key!r}; known: {sorted(PROPERTIES)}")
            setattr(self, key, value)  # a callable replaces the method of the same name
        self.function, self._accepts = function, _CONTEXT
        if function is not None:
            self._accepts = _context_taken(function)
        if not self.description:
            self.description = (inspect.getdoc(function if function is not None else self)
                                or "").split("\n")[0]

    def run(self, spec: AttackSpec, model: nn.Module, images: torch.Tensor,
            labels: torch.Tensor, *, seed: int, on_step: Callable[[], object] | None,
            trace: AttackTrace | None, start: torch.Tensor | None = None) -> torch.Tensor:
        """Adversarial images from `model` (already the attacked variant, see `access`); `seed`
        was set with torch.manual_seed. start (spec.init only; run_attack passes it only then):
        adversarial images within the ball to begin at instead of a random point. The default
        calls the registered function (start only when given: see takes_start)."""
        if self.function is None:  # register_attack refuses such a kind; a direct call lands here
            raise ValueError(f"attack kind {self.kind!r} has no run method or function")
        if start is not None and "start" not in self._accepts:
            raise ValueError(_no_start(self))
        context = {"seed": seed, "on_step": on_step, "trace": trace, "start": start}
        return self.function(spec, model, images, labels,
                             **{key: context[key] for key in self._accepts
                                if key != "start" or start is not None})

    def takes_start(self) -> bool:
        """Whether run accepts start= (the registered function's or the subclass's run
        signature), which init needs."""
        if self.function is not None:
            return "start" in self._accepts
        try:
            parameters = inspect.signature(self.run).parameters.values()
        except (TypeError, ValueError):
            return False
        return any(p.name == "start" or p.kind is p.VAR_KEYWORD for p in parameters)

    def validate(self, spec: AttackSpec) -> None:
        """Raise a ValueError for settings this kind cannot run (after the common checks)."""

    def gradient_evaluations(self, spec: AttackSpec) -> int:
        """Forward + backward passes per example through the attacked model."""
        return spec.steps * spec.gradient_evaluations_per_iteration

    def selection_forward_passes(self, spec: AttackSpec) -> int:
        """Forward passes per example spent choosing among candidates on fresh draws."""
        return 0

    def reduced(self, spec: AttackSpec) -> bool:
        """True when the setting is below the protocol's reference (to be reported as such)."""
        return ((self.reference_steps is not None and spec.steps < self.reference_steps)
                or (self.uses_eot and spec.eot < self.reference_eot)
                or ("n_queries" in self.options and spec.n_queries < self.reference_queries))

    def own_settings(self, spec: AttackSpec) -> dict[str, Any]:
        """Values of the record's APGD_KEYS for this kind (the others are None)."""
        return {}

    def __repr__(self) -> str:
        return f"<attack {self.kind!r}: {self.description}>"


PROPERTIES = frozenset({
    "description", "default_step", "min_steps", "uses_eot", "access", "source",
    "always_random_start",
    "stepped", "options", "reference_steps", "reference_eot", "reference_queries",
    "validate", "gradient_evaluations", "selection_forward_passes", "reduced", "own_settings",
})

_ATTACKS: dict[str, Attack] = {}
ATTACKS: Mapping[str, Attack] = types.MappingProxyType(_ATTACKS)  # kind -> Attack, read-only
_T = TypeVar("_T")


def register_attack(kind: str, **properties: Any) -> Callable[[_T], _T]:
    """Decorator: registers a function run(spec, model, images, labels[, seed=, on_step=,
    trace=, start=]) -> adversarial images, or an Attack subclass, as the attack kind `kind`,
    which parse_attack, AttackSpec and evaluate then accept. `properties` set Attack's
    attributes (default_step=1.0, uses_eot=False, ...). A kind already registered is a
    ValueError."""
    _check_kind(kind)

    def register(target: _T) -> _T:
        if isinstance(target, type) and issubclass(target, Attack):
            attack = target(**properties)
        elif callable(target) and not isinstance(target, type):
            attack = Attack(target, **properties)
        else:
            raise ValueError(f"register_attack({kind!r}) decorates a function or an Attack "
                             f"subclass, got {target!r}")
        attack.kind = kind
        _check_attack(attack)
        if kind in _ATTACKS:  # checked again: the decorated body may have registered it
            raise _already(kind)
        _ATTACKS[kind] = attack
        return target

    if kind in _ATTACKS:
        raise _already(kind)
    return register


def registered_attacks() -> tuple[str, ...]:
    """The registered attack kinds, built-ins first, in the order they were registered."""
    return tuple(_ATTACKS)


def unregister_attack(kind: str) -> None:
    """Removes a kind registered with register_attack (the built-ins stay)."""
    if kind in BUILT_IN:
        raise ValueError(f"attack kind {kind!r} is built in and cannot be unregistered")
    if kind not in _ATTACKS:
        raise ValueError(f"attack kind {kind!r} is not registered; registered: "
                         f"{registered_attacks()}")
    del _ATTACKS[kind]


def get_attack(kind: str) -> Attack:
    """The Attack registered as `kind`; a ValueError listing the registered kinds otherwise."""
    if not isinstance(kind, str) or kind not in _ATTACKS:
        raise ValueError(f"attack kind must be one of {registered_attacks()}, got {kind!r}")
    return _ATTACKS[kind]


class Kinds(Sequence):
    """The registered kinds whose Attack satisfies `condition`, read at each use (a tuple
    computed once would miss kinds registered later)."""

    def __init__(self, condition: Callable[[Attack], bool]) -> None:
        self._condition = condition

    def _kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind, attack in _ATTACKS.items() if self._condition(attack))

    def __getitem__(self, index: Any) -> Any:
        return self._kinds()[index]

    def __len__(self) -> int:
        return len(self._kinds())

    def __repr__(self) -> str:
        return repr(self._kinds())


def _already(kind: str) -> ValueError:
    return ValueError(f"attack kind {kind!r} is already registered (registered: "
                      f"{registered_attacks()}); unregister_attack({kind!r}) first to replace it")


def _check_kind(kind: Any) -> None:
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise ValueError(
            "an attack kind must be a str of letters, digits, '-', '_', '.' and '+' that starts "
            f"with a letter or digit (it is written before ':' in 'kind:key=value'), got {kind!r}"
        )


def _check_attack(attack: Attack) -> None:
    try:
        if attack.function is None and type(attack).run is Attack.run:
            raise ValueError("it crafts nothing: decorate a function, or override Attack.run")
        check_number("default_step", attack.default_step, positive=True)
        check_int("min_steps", attack.min_steps, 0)
        for name in ("uses_eot", "always_random_start", "stepped"):
            check_bool(name, getattr(attack, name))
        check_choice("access", attack.access, ACCESS)
        check_choice("source", attack.source, SOURCES)
        if not isinstance(attack.options, (tuple, list, set, frozenset)):
            raise ValueError(f"options must be a tuple of names, got {attack.options!r}")
        for option in attack.options:
            check_choice("each option", option, OPTIONS)
        if attack.reference_steps is not None:
            check_int("reference_steps", attack.reference_steps, 0)
        check_int("reference_eot", attack.reference_eot, 1)
        check_int("reference_queries", attack.reference_queries, 1)
    except ValueError as error:
        raise ValueError(f"attack kind {attack.kind!r}: {error}") from None


def _no_start(attack: Attack) -> str:
    return (f"init starts the attack from another attack's examples, passed to its run as "
            f"start=, but the run of attack kind {attack.kind!r} takes no start argument; give "
            f"it a keyword start (None: its usual start) or leave init unset")


def _context_taken(function: Callable[..., Any]) -> tuple[str, ...]:
    """Which of seed, on_step, trace and start the function takes as keywords; it must take four
    positional arguments (spec, model, images, labels)."""
    try:
        signature = inspect.signature(function)
        signature.bind(None, None, None, None)
    except (TypeError, ValueError):
        raise ValueError(f"an attack function must take (spec, model, images, labels), got "
                         f"{function!r}") from None
    parameters = signature.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return _CONTEXT
    return tuple(name for name in _CONTEXT if name in signature.parameters)


# --- the built-in kinds ------------------------------------------------------------------------


@register_attack("apgd-eot")
class APGDEOT(Attack):
    """APGD with EOT, CE/margin restarts, selection on fresh draws (apgd.py)."""

    default_step = 2.0  # APGD's initial step, 2 eps
    min_steps = 1
    stepped = True
    options = ("restarts", "loss", "momentum", "select_draws", "eot_weighting", "graft",
               "substitute", "init")

    def validate(self, spec: AttackSpec) -> None:
        if spec.n_restarts > spec.steps:
            raise ValueError(f"restarts must be <= steps ({spec.steps}), each restart needs "
                             f"a gradient iteration, got {spec.restarts}")

    def selection_forward_passes(self, spec: AttackSpec) -> int:
        return CANDIDATES_PER_RESTART * spec.n_restarts * spec.select_draws

    def own_settings(self, spec: AttackSpec) -> dict[str, Any]:
        return {
            "restarts": spec.n_restarts, "loss": spec.loss, "momentum": spec.momentum,
            "select_draws": spec.select_draws, "eot_weighting": spec.eot_weighting,
            "graft": spec.graft,
            "step_schedule": {
                "initial_step": spec.alpha, "first_checkpoint": FIRST_CHECKPOINT,
                "checkpoint_shrink": CHECKPOINT_SHRINK, "min_checkpoint": MIN_CHECKPOINT,
                "rho": RHO, "candidates_per_restart": CANDIDATES_PER_RESTART,
                "randomised_review": RANDOMISED_REVIEW,
                "randomised_initial_step": (spec.step_size if spec.step_size is not None
                                            else RANDOMISED_INITIAL_STEP * spec.eps),
            },
        }

    def run(self, spec, model, images, labels, *, seed, on_step, trace, start=None):
        return apgd_eot(
            model, images, labels, eps=spec.eps, steps=spec.steps, eot=spec.eot, norm=spec.norm,
            restarts=spec.n_restarts, loss=spec.loss, momentum=spec.momentum,
            initial_step=spec.step_size, select_draws=spec.select_draws,
            eot_weighting=spec.eot_weighting, graft=spec.graft, random_start=spec.random_start,
            selection_seed=derive_seed(seed, "selection"), on_step=on_step, trace=trace,
            start=start,
        )


class _EOTPGD(Attack):
    """PGD with EOT (pgd.py), on whichever model `access` picks."""

    stepped = True

    def run(self, spec, model, images, labels, *, seed, on_step, trace, start=None):
        return eot_pgd(
            model, images, labels, eps=spec.eps, step_size=spec.alpha, steps=spec.steps,
            eot=spec.eot, norm=spec.norm, random_start=spec.random_start, on_step=on_step,
            trace=trace, start=start,
        )


@register_attack("pgd")
class PGD(_EOTPGD):
    """PGD with EOT through the whole purified model."""

    options = ("substitute", "init")


@register_attack("autoattack-rand")
class AutoAttackRand(Attack):
    """torchattacks AutoAttack version="rand": APGD-CE + APGD-DLR, EOT."""

    min_steps = 1
    always_random_start = True  # APGD starts from a random point of its own
    reference_steps = REFERENCE_APGD_STEPS

    def gradient_evaluations(self, spec: AttackSpec) -> int:
        """At most: it skips examples already misclassified."""
        return 2 * (spec.steps + 1) * spec.eot  # APGD-CE then APGD-DLR, start point included

    def run(self, spec, model, images, labels, *, seed, on_step, trace):
        attack = torchattacks.AutoAttack(
            model, norm=_torchattacks_norm(spec), eps=spec.eps, version="rand",
            n_classes=_n_classes(model, images[:1]), seed=seed,
        )
        for apgd in attack._autoattack.attacks:  # torchattacks fixes EOT 20 and 10 steps
            apgd.steps, apgd.eot_iter = spec.steps, spec.eot
        attack.set_device(images.device)
        return attack(images, labels).detach()


@register_attack("bpda")
class BPDA(_EOTPGD):
    """PGD with EOT, the purifier's backward replaced by the identity."""

    access = "bpda"


@register_attack("transfer")
class Transfer(_EOTPGD):
    """PGD crafted on the undefended classifier, replayed on the defence."""

    access = "transfer"
    options = ("source",)  # source=guidance: crafted on the purifier's guidance network instead
    uses_eot = False  # the undefended classifier draws no noise to average


@register_attack("square")
class Square(Attack):
    """Square attack, queries only."""

    access = "black-box"
    uses_eot = False  # a query attack averages nothing
    always_random_start = True
    options = ("n_queries",)
    reference_steps = None

    def gradient_evaluations(self, spec: AttackSpec) -> int:
        return 0

    def run(self, spec, model, images, labels, *, seed, on_step, trace):
        # One forward pass, as before the registry (it counted the classes here too): it draws
        # the purifier's noise, so the same seed gives the same adversarial images as then.
        _n_classes(model, images[:1])
        attack = torchattacks.Square(
            model, norm=_torchattacks_norm(spec), eps=spec.eps, n_queries=spec.n_queries,
            seed=seed,
        )
        attack.set_device(images.device)
        return attack(images, labels).detach()


@register_attack("feature")
class Feature(Attack):
    """PGD on the guidance network's features, toward another class's centroid."""

    access = "transfer"
    source = "guidance"  # a GuidanceClassifier (exposed_attacks.py): no gradient via the purifier
    uses_eot = False  # the guidance network draws no noise
    stepped = True

    def run(self, spec, model, images, labels, *, seed, on_step, trace):
        return feature_pgd(model, images, labels, eps=spec.eps, step_size=spec.alpha,
                           steps=spec.steps, norm=spec.norm, random_start=spec.random_start,
                           on_step=on_step)


def _torchattacks_norm(spec: AttackSpec) -> str:
    return "Linf" if spec.norm == "linf" else "L2"


@torch.no_grad()
def _n_classes(model: nn.Module, image: torch.Tensor) -> int:
    return int(model(image).shape[-1])


BUILT_IN = registered_attacks()
