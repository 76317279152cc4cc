"""EOT from measured variance: the single-draw cosine rho, the EOT it calls for, and the
alignment formula checked against a planted noisy gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from purifyguard.evaluation.gradient_alignment import (
    alignment_of_eot,
    eot_for_alignment,
    measure_gradient_alignment,
    single_draw_gradients,
)


class NoisyGradient(nn.Module):
    """A linear classifier plus a term whose value is 0 but whose input gradient is fresh noise
    of size `noise` on every call: single-draw gradients = expected gradient + independent noise."""

    def __init__(self, noise: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(64, 10)
        self.register_buffer("spread", torch.randn(10))  # the noise term moves the classes apart
        self.noise = noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        direction = torch.randn_like(flat) * self.noise
        jitter = (direction * flat).sum(1, keepdim=True)
        return self.linear(flat) + (jitter - jitter.detach()) * self.spread  # value unchanged


def batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.rand(n, 1, 8, 8, generator=generator), torch.arange(n) % 10


def test_the_formula_reaches_its_target_at_the_smallest_eot():
    assert eot_for_alignment(0.2) == 18  # 0.81 * 0.8 / (0.19 * 0.2) = 17.05
    assert alignment_of_eot(0.2, 18) >= 0.9 > alignment_of_eot(0.2, 17)
    assert eot_for_alignment(1.0) == 1 and alignment_of_eot(1.0, 1) == 1.0
    assert eot_for_alignment(0.5, target=0.8) == math.ceil(0.64 * 0.5 / (0.36 * 0.5))
    with pytest.raises(ValueError, match="target must be an alignment in"):
        eot_for_alignment(0.5, target=1.0)


def test_a_deterministic_model_needs_no_eot():
    model = NoisyGradient(noise=0.0)
    images, labels = batch()
    result = measure_gradient_alignment(model, images, labels, eot=1)
    assert result["rho"] == pytest.approx(1.0, abs=1e-6)
    assert result["recommended_eot"] == 1 and result["warning"] is None


@pytest.mark.parametrize("noise", [0.05, 0.2])
def test_the_predicted_alignment_matches_the_measured_one_on_a_noisy_gradient(noise):
    model = NoisyGradient(noise=noise)
    images, labels = batch()
    result = measure_gradient_alignment(model, images, labels, eot=2, draws=8, seed=1)
    assert 0.05 < result["rho"] < 0.9  # noisy, but not pure noise
    # The expected gradient: the noise-free model's; EOT-4 averages of fresh draws.
    expected = single_draw_gradients(NoisyGradient(noise=0.0), images, labels, 1, 0)[0].flatten(1)
    draws = single_draw_gradients(model, images, labels, 4 * 40, seed=7).flatten(2)
    averages = draws.view(40, 4, *draws.shape[1:]).mean(1)
    measured = F.cosine_similarity(averages, expected.expand_as(averages), dim=2).mean()
    predicted = sum(alignment_of_eot(r, 4) for r in result["rho_per_image"]) / len(labels)
    assert float(measured) == pytest.approx(predicted, abs=0.06)
    assert result["alignment"] == pytest.approx(
        sum(alignment_of_eot(r, 2) for r in result["rho_per_image"]) / len(labels))
    assert result["recommended_eot"] == eot_for_alignment(result["rho"])


def test_a_low_alignment_warns_and_names_the_eot_that_would_do():
    model = NoisyGradient(noise=0.2)
    images, labels = batch()
    result = measure_gradient_alignment(model, images, labels, eot=2, draws=4)
    assert result["alignment"] < 0.8
    assert f"EOT {result['recommended_eot']} would reach 0.9" in result["warning"]
    assert result["recommended_eot"] > 2


def test_bad_arguments_are_refused_by_name():
    images, labels = batch()
    with pytest.raises(ValueError, match="draws"):
        measure_gradient_alignment(NoisyGradient(0.0), images, labels, draws=1)
    with pytest.raises(ValueError, match="eot"):
        measure_gradient_alignment(NoisyGradient(0.0), images, labels, eot=0)


# --- in the harness: measured before each gradient attack, stored, reported --------------------


def test_evaluate_reports_the_eot_alignment_of_each_gradient_attack_and_measures_it_once(
        make_purifier, tmp_path, monkeypatch):
    from test_evaluation import structured_batch, tiny_classifier

    from purifyguard import PurifiedModel, evaluate
    from purifyguard.evaluation import gradient_alignment, validate_report

    model = PurifiedModel(tiny_classifier(), make_purifier(t_star=3), mean=(0.5,), std=(0.5,))
    attacks = ["pgd:eps=0.1,steps=1,eot=2", "square:eps=0.1,n_queries=2"]
    report = evaluate(model, structured_batch(4), attacks, n=4, runs=1, eot_check=3,
                      output_dir=tmp_path, progress=False)
    validate_report(report)
    pgd, square = report["records"]
    alignment = pgd["eot_alignment"]
    assert alignment["images"] == 3 and alignment["eot"] == 2 and len(alignment["rho_per_image"]) == 3
    assert -1 <= alignment["rho"] < 1  # a DDPM purifier: every draw differs
    assert alignment["recommended_eot"] == eot_for_alignment(alignment["rho"])
    assert square["eot_alignment"] is None  # no gradient, no EOT to size
    assert (tmp_path / "eot-alignment.json").is_file()

    calls = []
    monkeypatch.setattr(gradient_alignment, "measure_gradient_alignment",
                        lambda *args, **kwargs: calls.append(args))
    again = evaluate(model, structured_batch(4), attacks, n=4, runs=1, eot_check=3,
                     output_dir=tmp_path, progress=False)
    assert not calls and again["records"][0]["eot_alignment"] == alignment  # resumed, not redone
    off = evaluate(model, structured_batch(4), attacks[:1], n=4, runs=1, eot_check=0,
                   progress=False)
    assert off["records"][0]["eot_alignment"] is None


def test_a_substitute_attack_reports_its_forward_distance(make_purifier, guidance_network):
    from test_evaluation import structured_batch, tiny_classifier

    from purifyguard import PurifiedModel, evaluate

    purifier = make_purifier(t_star=3, sampler="ddim", n_steps=2, guidance="adversarial",
                             guidance_scale=5.0)
    model = PurifiedModel(tiny_classifier(), purifier, mean=(0.5,), std=(0.5,))
    report = evaluate(model, structured_batch(4), ["pgd:eps=0.1,steps=1,eot=1,substitute=smooth"],
                      n=4, batch_size=2, runs=1, eot_check=0, progress=False)
    substitute = report["records"][0]["substitute"]
    assert substitute["batches"] == 2 and substitute["activation"] == "softplus"
    distance = substitute["forward_distance"]
    assert distance["n"] == 4 and 0 < distance["logits_linf_mean"] <= distance["logits_linf_max"]
