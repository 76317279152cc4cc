"""The finite-difference gradient check (purifyguard/evaluation/gradient_check.py) with the noise
fixed: defences that mask gradients are flagged with the reason, an honest purifier is not, and
the check is part of the sanity checks. The convergence check reads the curve."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from purifyguard import PurifiedModel
from purifyguard.evaluation import run_sanity_checks
from purifyguard.evaluation.gradient_check import GRADIENT_CHECK, gradient_check
from purifyguard.evaluation.sanity import CONVERGENCE_CHECK, convergence_check


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


def test_an_honest_purifier_passes(honest):
    check = gradient_check(honest, images())
    assert check["check"] == GRADIENT_CHECK
    assert check["passed"], check["message"]
    assert check["values"]["cosine"] > 0.99 and check["values"]["deterministic"]


def test_input_rounding_is_flagged_with_the_reason(honest):
    check = gradient_check(RoundsInput(honest), images())
    assert not check["passed"]
    assert "zero" in check["message"] and "rounding" in check["message"]


def test_a_non_differentiable_step_is_flagged_with_the_reason(honest):
    check = gradient_check(BinarisesPurified(honest), images())
    assert not check["passed"]
    assert "detached" in check["message"] or "substitute backward" in check["message"]


def test_a_detached_guidance_term_is_flagged_with_the_reason(honest):
    planted = honest.with_purifier(honest.purifier.with_settings())
    planted.purifier.guidance = DetachedGuidance(planted.purifier.guidance)
    check = gradient_check(planted, images())
    assert not check["passed"], check["values"]
    assert "guidance" in check["message"]
    assert gradient_check(honest, images())["passed"]  # the plant did not touch the original


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
    for settings, name in [({"directions": 0}, "directions"), ({"step": 0.5}, "step"),
                           ({"seed": "x"}, "seed")]:
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
