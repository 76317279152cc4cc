"""The finite-difference gradient check (purifyguard/evaluation/gradient_check.py) with the noise
fixed, in float64, at several finite-difference steps: defences that mask gradients are flagged
with the reason (flat/quantised, detached, shattered), an honest purifier is not, and the check is
part of the sanity checks, which run the attack they are given at its budget. The convergence
check reads the curve."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import purifyguard.evaluation.gradient_check as gradient_check_module
from purifyguard import PurifiedModel
from purifyguard.evaluation import harness, run_sanity_checks
from purifyguard.evaluation.attacks import parse_attack
from purifyguard.evaluation.gradient_check import (
    GRADIENT_CHECK,
    KINDS,
    SMOOTH_SUBSTITUTE,
    STEPS,
    gradient_check,
)
from purifyguard.evaluation.sanity import (
    CONVERGENCE_CHECK,
    EPS_SWEEP_CHECK,
    convergence_check,
    sanity_base,
)


def tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 13 * 13, 10)).eval()


def images(n: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    # On the 8-bit grid, as real images are: a rounding defence is flat exactly there.
    return (torch.rand(n, 1, 28, 28, generator=generator) * 255).round() / 255


@pytest.fixture
def honest(make_purifier) -> PurifiedModel:
    """A tiny purifier whose pixel guidance carries much of the input (t* = 300 in 3 DDIM
    steps, a constant scale), before a tiny classifier."""
    purifier = make_purifier(t_star=300, sampler="ddim", n_steps=3, guidance="pixel",
                             guidance_scale=1.0, scale_schedule="constant")
    return PurifiedModel(tiny_classifier(), purifier, mean=(0.5,), std=(0.5,))


class RoundsInput(nn.Module):
    """Planted: the input is rounded to 8 bits before the model (gradient exactly zero)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 255) / 255)


class BinarisesPurified(nn.Module):
    """Planted: a non-differentiable step after purification (binarising the pixels), hidden
    behind a straight-through backward that pretends it is the identity."""

    def __init__(self, model: PurifiedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        purified = self.model.purify(x)
        binary = (purified > 0.5).to(purified.dtype)
        return self.model.classify(purified + (binary - purified).detach())


class DetachedGuidance(nn.Module):
    """Planted: the purifier's guidance term is computed off the graph (its gradient is a
    constant to the attacker, as if `.detach()` had been written after it)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.reads_x0_hat = inner.reads_x0_hat

    def prepare(self, x_in: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: value.detach() for key, value in self.inner.prepare(x_in).items()}

    def loss(self, x_t, x0_hat, index, schedule, target) -> torch.Tensor:
        real = self.inner.loss(x_t, x0_hat, index, schedule, target)
        constant = torch.autograd.grad(real.sum(), x_t, retain_graph=True)[0].detach()
        return (x_t * constant).flatten(1).sum(1)


def linear_head(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


class GuidedStep(nn.Module):
    """Planted, after the guided purifier: one guidance step x -> x - scale * grad_x energy(x),
    the gradient taken with create_graph (so autograd is exact), then a linear classifier. With
    a ReLU energy network the step's gradient is piecewise constant and a large scale turns its
    kinks into jumps of the output (shattered); with Softplus the same step is smooth (fine)."""

    def __init__(self, activation: nn.Module, scale: float = 100.0, hidden: int = 256) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.energy = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), activation,
                                    nn.Linear(hidden, 1))
        self.head = linear_head()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            point = x if x.requires_grad else x.detach().requires_grad_()
            step = torch.autograd.grad(self.energy(point).sum(), point, create_graph=True)[0]
        return self.head(x - self.scale * step)


class DetachedBranch(nn.Module):
    """Planted: a smooth branch that moves the output is detached (autograd never sees it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.branch = nn.Conv2d(1, 1, 3, padding=1)
        self.head = linear_head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + 3 * torch.tanh(4 * self.branch(x)).detach())


class SubstituteBackward(nn.Module):
    """Planted: the value of a smooth transform g(x), the backward of the identity."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.branch = nn.Conv2d(1, 1, 5, padding=2)
        self.head = linear_head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        smooth = torch.tanh(3 * self.branch(x))
        return self.head(x + (smooth - x).detach())


class OwnNoise(nn.Module):
    """Planted: noise from a generator of its own, so reseeding torch does not fix it."""

    def __init__(self) -> None:
        super().__init__()
        self.head = linear_head()
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=self.generator, dtype=x.dtype)
        return self.head(x + 0.1 * noise.to(x.device))


PLANTED = {
    "fine": [lambda: tiny_classifier(), lambda: GuidedStep(nn.Softplus())],
    "shattered": [lambda: GuidedStep(nn.ReLU())],
    "detached": [DetachedBranch, SubstituteBackward],
    "flat/quantised": [lambda: RoundsInput(linear_head())],
    "nondeterministic": [OwnNoise],
}


@pytest.mark.parametrize("kind,make", [(kind, make) for kind, makers in PLANTED.items()
                                       for make in makers])
@pytest.mark.parametrize("seed", [0, 1])
def test_each_planted_model_gets_its_verdict(kind, make, seed):
    check = gradient_check(make(), images(), seed=seed)
    assert check["values"]["kind"] == kind, check["message"]
    assert check["passed"] == (kind == "fine")


def test_a_shattered_gradient_is_exact_locally_and_the_substitute_is_named():
    """The ReLU guidance step: autograd is right within its piece (it matches the finite
    difference at the smallest h), so it is not "detached"; the larger h cross kinks and
    disagree. The same step with Softplus agrees at every h."""
    check = gradient_check(GuidedStep(nn.ReLU()), images())
    values = check["values"]
    by_step = {entry["h"]: entry for entry in values["finite_differences"]}
    assert sorted(by_step, reverse=True) == list(STEPS)
    assert by_step[min(STEPS)]["relative_error"] < 1e-6
    assert by_step[max(STEPS)]["relative_error"] > 0.5
    assert values["finite_difference_spread"] > 0.5
    assert SMOOTH_SUBSTITUTE in check["message"] and "shattered" in check["message"]
    smooth = gradient_check(GuidedStep(nn.Softplus()), images())["values"]
    assert smooth["finite_difference_spread"] < 1e-3
    assert all(entry["relative_error"] < 1e-3 for entry in smooth["finite_differences"])


@pytest.mark.parametrize("name", ["fashion-mnist-resnet18", "fashion-mnist-resnet18-trades"])
def test_a_plain_relu_classifier_is_fine_though_its_kinks_move_the_larger_steps(name):
    """The bundled ResNets (real trained weights, real test images): at h = 0.01 every pixel
    moves and crosses ReLU kinks, so the finite differences differ from those at 1e-4 by up to
    a third, but their magnitudes hold and autograd is right: not a shattered gradient (on
    these images the former threshold 0.25 called both shattered)."""
    from purifyguard.presets import bundled_classifier, bundled_test_images

    x = bundled_test_images()[0][:16]
    for part in (x[:8], x[8:]):
        check = gradient_check(bundled_classifier(name), part)
        assert check["values"]["kind"] == "fine", check["message"]
        assert 0.1 < check["values"]["finite_difference_spread"] < 0.5


def test_the_record_keeps_its_shape_and_adds_the_finite_differences():
    check = gradient_check(tiny_classifier(), images(3), directions=2)
    assert set(check) == {"check", "passed", "message", "values"}
    values = check["values"]
    assert {"cosine", "relative_error", "magnitude_ratio", "deterministic", "step", "directions",
            "examples", "kind", "finite_differences"} <= set(values)
    assert values["kind"] in KINDS and values["dtype"] == "float64"
    assert values["step"] == min(STEPS) and values["examples"] == 3
    for entry in values["finite_differences"]:
        assert len(entry["derivatives"]) == 2 and len(entry["derivatives"][0]) == 3


def test_an_honest_purifier_passes(honest):
    check = gradient_check(honest, images())
    assert check["check"] == GRADIENT_CHECK
    assert check["passed"], check["message"]
    assert check["values"]["cosine"] > 0.99 and check["values"]["deterministic"]
    assert check["values"]["kind"] == "fine"
    assert check["values"]["finite_difference_spread"] < 0.1  # threshold 0.5
    assert next(honest.parameters()).dtype == torch.float32  # checked on a float64 copy


def test_input_rounding_is_flagged_with_the_reason(honest):
    check = gradient_check(RoundsInput(honest), images())
    assert not check["passed"]
    assert "zero" in check["message"] and "rounding" in check["message"]
    assert check["values"]["kind"] == "flat/quantised"


def test_a_non_differentiable_step_is_flagged_with_the_reason(honest):
    check = gradient_check(BinarisesPurified(honest), images())
    assert not check["passed"]
    # The binarised output is piecewise constant: it jumps where a pixel crosses 0.5, so the
    # finite differences at different h disagree (the straight-through backward cannot hide
    # that), and the smooth substitute is what an attack wants.
    assert check["values"]["kind"] == "shattered", check["message"]
    assert SMOOTH_SUBSTITUTE in check["message"]


def test_a_detached_guidance_term_is_flagged_with_the_reason(honest):
    planted = honest.with_purifier(honest.purifier.with_settings())
    planted.purifier.guidance = DetachedGuidance(planted.purifier.guidance)
    check = gradient_check(planted, images())
    assert not check["passed"], check["values"]
    assert "guidance" in check["message"]
    assert check["values"]["kind"] == "detached", check["message"]
    # The plant did not touch the original.
    assert gradient_check(honest, images(), directions=1)["passed"]


def test_the_sanity_checks_include_the_gradient_check():
    data = (images(8), torch.arange(8) % 10)
    masked = RoundsInput(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))
    checks = {c["check"]: c for c in run_sanity_checks(
        masked, data, ["pgd:eps=0.1,steps=2,eot=1"], n=8, batch_size=8, runs=1,
        progress=False)}
    assert not checks[GRADIENT_CHECK]["passed"]
    assert CONVERGENCE_CHECK in checks


def test_bad_arguments_are_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    for settings, name in [({"directions": 0}, "directions"), ({"steps": (0.5, 1e-3)}, "steps"),
                           ({"steps": (1e-3,)}, "steps"), ({"steps": (1e-3, 0)}, "steps"),
                           ({"steps": 1e-3}, "steps"), ({"seed": "x"}, "seed")]:
        with pytest.raises(ValueError, match=name):
            gradient_check(model, images(), **settings)


def test_the_convergence_check_flags_a_rise_within_a_restart_only():
    falling = {"robust_accuracy": [0.9, 0.5, 0.3, 0.3], "restart_starts": [0]}
    assert convergence_check(falling, 100)["passed"]
    rising = {"robust_accuracy": [0.9, 0.3, 0.5, 0.7], "restart_starts": [0]}
    check = convergence_check(rising, 100)
    assert not check["passed"] and "rose with more steps" in check["message"]
    # A restart begins at a random point: its first iterations are judged on their own.
    restarted = {"robust_accuracy": [0.9, 0.3, 0.8, 0.3], "restart_starts": [0, 2]}
    assert convergence_check(restarted, 100)["passed"]
    noisy = {"robust_accuracy": [0.5, 0.45, 0.5], "restart_starts": [0]}
    assert convergence_check(noisy, 20)["passed"]  # within noise on 20 examples


def test_the_sanity_checks_run_the_given_attack_at_its_budget(make_purifier, monkeypatch):
    """An apgd-eot attack of 2 steps x EOT 2 on a (cheap) purified model: every attack the checks
    run is that kind at that budget (twice the steps for the "more steps" check; BPDA at the same
    budget); no reference 200-step PGD. The model is checked once, by the entry point."""
    purifier = make_purifier(t_star=100, sampler="ddim", n_steps=1)
    model = PurifiedModel(tiny_classifier(), purifier, mean=(0.5,), std=(0.5,))
    calls = []
    real = harness._evaluate_checked

    def spy(model, data, specs, **settings):
        calls.append(list(specs))
        # Before anything runs: the reference PGD would take minutes here.
        assert not any(s.kind == "pgd" or s.steps >= 200 or s.eot >= 20 for s in specs), specs
        return real(model, data, specs, **settings)

    def check_model_again(*args, **kwargs):
        raise AssertionError("the sanity path checked the model again")

    monkeypatch.setattr(harness, "_evaluate_checked", spy)
    monkeypatch.setattr(gradient_check_module, "check_model", check_model_again)
    data = (images(4), torch.arange(4) % 10)
    checks = {c["check"]: c for c in run_sanity_checks(
        model, data, ["apgd-eot:eps=0.1,steps=2,eot=2"], n=4, batch_size=4, runs=1,
        progress=False)}
    assert len(calls) == 1
    specs = calls[0]
    assert {(s.kind, s.steps, s.eot) for s in specs} == {
        ("apgd-eot", 2, 2), ("apgd-eot", 4, 2), ("bpda", 2, 2)}
    assert sorted(s.eps for s in specs if s.kind == "apgd-eot" and s.steps == 2) == [
        0.05, 0.1, 0.2, 1.0]  # eps = 0 is the clean accuracy: no attack runs there
    sweep = checks[EPS_SWEEP_CHECK]["values"]
    assert sweep["eps"] == [0.0, 0.05, 0.1, 0.2, 1.0] and len(sweep["ci95"]) == 5
    assert sweep["attack_settings"]["kind"] == "apgd-eot"
    assert sweep["attack"].startswith("APGD-EOT2, full gradient, L-inf, 2 steps")
    assert checks["more steps never raise robust accuracy"]["values"]["steps"] == [2, 4]
    assert checks["full gradient <= BPDA"]["values"]["gradient_mode"] == "full"
    assert checks[GRADIENT_CHECK]["values"]["kind"] in KINDS


def test_the_sanity_base_is_the_first_gradient_attack():
    apgd = parse_attack("apgd-eot:eps=0.05,steps=20,eot=2,restarts=2")
    assert sanity_base([parse_attack("square:eps=0.1"), apgd]) == apgd
    bpda = sanity_base([parse_attack("bpda:eps=0.1,steps=7,eot=3")])
    assert (bpda.kind, bpda.steps, bpda.eot, bpda.gradient_mode) == ("pgd", 7, 3, "full")
    reference = sanity_base([parse_attack("transfer:eps=0.1,steps=5")])
    assert (reference.kind, reference.steps, reference.eot) == ("pgd", 200, 20)
