"""The primary attack, apgd-eot (purifyguard/evaluation/apgd.py): at the same budget of gradient
evaluations it lowers accuracy at least as far as plain PGD-EOT; its candidate is chosen on fresh
purifications; its budget and every setting are in the record; its convergence curve is there."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_evaluation import _fashion, small_cnn, structured_batch, tiny_classifier
from torch import nn

from purifyguard.evaluation import AttackSpec, default_attacks, evaluate, parse_attack
from purifyguard.evaluation.apgd import apgd_eot, checkpoints, split_budget
from purifyguard.evaluation.em_weighting import combine_draws, vulnerable_cluster_weights
from purifyguard.evaluation.losses import attack_loss, cw_margin, dlr_loss
from purifyguard.evaluation.pgd import EotDraws, eot_pgd, project, random_delta
from purifyguard.evaluation.report import validate_report
from purifyguard.evaluation.selection import select_candidates

MEAN, STD = 0.286, 0.353


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The small CNN of test_evaluation, trained here on real Fashion-MNIST (400 Adam steps,
    about 85% test accuracy), and 128 test images."""
    images, labels = _fashion(train=True).tensors(25600)
    torch.manual_seed(0)
    classifier = small_cnn()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    for _ in range(400):
        rows = torch.randint(0, len(labels), (64,))
        loss = F.cross_entropy(classifier((images[rows] - MEAN) / STD), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return classifier.eval(), _fashion(train=False).tensors(128)


class Normalised(nn.Module):
    def __init__(self, classifier: nn.Module, sigma: float = 0.0) -> None:
        super().__init__()
        self.classifier, self.sigma = classifier, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sigma:  # a randomised defence: Gaussian noise on the input
            x = (x + self.sigma * torch.randn_like(x)).clamp(0, 1)
        return self.classifier((x - MEAN) / STD)


@pytest.mark.parametrize("sigma, steps, eot", [(0.0, 40, 1), (0.15, 20, 2)],
                         ids=["undefended-40x1", "noisy-input-20x2"])
def test_apgd_lowers_accuracy_at_least_as_far_as_pgd_at_the_same_budget(trained, sigma, steps,
                                                                         eot):
    classifier, data = trained
    budget = f"eps=0.05,steps={steps},eot={eot}"
    report = evaluate(Normalised(classifier, sigma), data, [f"pgd:{budget}", f"apgd-eot:{budget}"],
                      n=128, batch_size=128, runs=5, seed=0, progress=False)
    pgd, apgd = report["records"]
    assert pgd["attack"]["gradient_evaluations"] == apgd["attack"]["gradient_evaluations"]
    assert pgd["robust_accuracy"]["mean"] < pgd["clean_accuracy"]["mean"] - 0.1  # it bites
    assert apgd["robust_accuracy"]["mean"] <= pgd["robust_accuracy"]["mean"], (
        apgd["robust_accuracy"], pgd["robust_accuracy"])


class TwoFaced(nn.Module):
    """A hand-made randomised model: wrong on every draw for images whose first pixel is above
    0.5, wrong with probability 1/2 when it is in (0.25, 0.5], always right below."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixel = x.flatten(1)[:, 0]
        coin = torch.rand(len(x)) < 0.5
        wrong = (pixel > 0.5) | ((pixel > 0.25) & coin)
        logits = torch.zeros(len(x), 3)
        logits[:, 0] = torch.where(wrong, -1.0, 1.0)
        logits[:, 1] = torch.where(wrong, 1.0, -1.0)
        return logits


def test_selection_keeps_the_candidate_fresh_purifications_get_wrong_most_often():
    candidates = torch.zeros(3, 2, 1, 4, 4)
    candidates[0, :, 0, 0, 0] = 0.1   # always right
    candidates[1, :, 0, 0, 0] = 0.4   # wrong half the time
    candidates[2, 1, 0, 0, 0] = 0.9   # example 1 only: always wrong
    labels = torch.zeros(2, dtype=torch.long)
    chosen_images, chosen = select_candidates(TwoFaced(), candidates, labels, draws=16, seed=0)
    assert chosen.tolist() == [1, 2]
    assert torch.equal(chosen_images[1], candidates[2, 1])


def test_the_budget_and_every_setting_are_in_the_record(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    data = (torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]))
    spec = "apgd-eot:eps=0.1,steps=6,eot=2,restarts=2,select_draws=3,eot_weighting=em"
    report = evaluate(model, data, [spec, "pgd:eps=0.1,steps=6,eot=2"], n=4, batch_size=4,
                      runs=2, progress=False, output_dir=tmp_path)
    validate_report(json.loads((tmp_path / "report.json").read_text()))
    apgd, pgd = (r["attack"] for r in report["records"])
    assert apgd["gradient_evaluations"] == pgd["gradient_evaluations"] == 12
    assert apgd["selection_forward_passes"] == 3 * 2 * 3 and pgd["selection_forward_passes"] == 0
    assert (apgd["restarts"], apgd["loss"], apgd["momentum"], apgd["eot_weighting"]) == (
        2, "ce+margin", 0.75, "em")
    assert apgd["step_schedule"]["initial_step"] == pytest.approx(0.2)
    assert apgd["step_schedule"]["randomised_initial_step"] == pytest.approx(0.05)
    assert apgd["step_schedule"]["randomised_review"] == "interval mean loss"
    assert pgd["restarts"] is None and pgd["step_schedule"] is None
    curve = report["records"][0]["convergence"]
    assert curve["iterations"] == list(range(1, 7)) and curve["restart_starts"] == [0, 3]
    assert curve["gradient_evaluations"][-1] == 12 and 0 <= curve["final"] <= 1
    assert "12 + 18" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "convergence-model.png").stat().st_size > 0


def test_settings_are_checked_and_restarts_follow_the_budget():
    assert AttackSpec("apgd-eot", steps=40).n_restarts == 1
    assert AttackSpec("apgd-eot", steps=200).n_restarts == 2
    for text, name in [("apgd-eot:steps=2,restarts=3", "restarts"),
                       ("apgd-eot:loss=dlr", "loss"), ("apgd-eot:momentum=1.5", "momentum"),
                       ("apgd-eot:select_draws=-1", "select_draws"),
                       ("apgd-eot:eot_weighting=median", "eot_weighting"),
                       ("apgd-eot:steps=0", "steps")]:
        with pytest.raises(ValueError, match=name):
            parse_attack(text)


def test_default_attacks_lead_with_apgd_and_keep_pgd():
    kinds = [spec.kind for spec in default_attacks()]
    assert kinds[0] == "apgd-eot" and "pgd" in kinds


def test_checkpoints_and_budget_split():
    assert split_budget(10, 3) == [4, 3, 3]
    assert checkpoints(99) == [22, 41, 57, 70, 80, 87, 93, 99]  # APGD's for 100 iterations
    assert checkpoints(9) == [4, 7]  # at least 3 steps apart
    assert checkpoints(1) == []


def test_losses_grow_towards_a_mistake():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    labels = torch.tensor([0, 0])
    assert cw_margin(logits, labels).tolist() == [-2.0, 2.0]
    assert dlr_loss(logits, labels).tolist() == pytest.approx([-2 / 3, 1.0])
    assert attack_loss("margin", 2) is cw_margin and attack_loss("margin", 10) is dlr_loss


def test_em_weighting_follows_the_shared_direction_and_equals_the_mean_for_one_draw():
    direction = torch.zeros(1, 8)
    direction[0, 0] = 1.0
    gradients = torch.stack([direction, direction * 1.1, direction * 0.9,
                             torch.tensor([[0.0, -5.0, 0, 0, 0, 0, 0, 0]])])  # (4 draws, 1, 8)
    weights = vulnerable_cluster_weights(gradients)
    assert weights[:3].min() > 0.9 and weights[3] < 0.1
    combined = combine_draws(EotDraws(gradients, torch.zeros(4, 1), torch.ones(4, 1)), "em")
    assert combined[0, 1].abs() < 0.5 < combined[0, 0]  # the outlier no longer dominates
    one = EotDraws(gradients[:1], torch.zeros(1, 1), torch.ones(1, 1))
    assert torch.equal(combine_draws(one, "em"), combine_draws(one, "mean"))


class SureLinear(nn.Module):
    """A linear classifier sure of class 0 everywhere near the inputs (never fooled here), with
    optional output noise too small to matter but enough to make it a randomised model."""

    def __init__(self, noise: float) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.weight, self.noise = torch.randn(3, 16), noise
        self.bias = torch.tensor([20.0, 0.0, 0.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x.flatten(1) @ self.weight.T + self.bias
        return logits + self.noise * torch.randn_like(logits)


@pytest.mark.parametrize("noise, first_step", [(0.0, 0.1), (1e-6, 0.05)],
                         ids=["deterministic-2eps-clipped-to-eps", "randomised-half-eps"])
def test_the_first_step_is_half_eps_on_a_randomised_model(noise, first_step):
    images, labels = torch.full((2, 1, 4, 4), 0.5), torch.zeros(2, dtype=torch.long)
    adversarial = apgd_eot(SureLinear(noise), images, labels, eps=0.1, steps=2, eot=1,
                           random_start=False, select_draws=0)
    # one step from the clean image; the highest-loss candidate (nothing is fooled) is its end
    assert (adversarial - images).abs().amax().item() == pytest.approx(first_step)


class _Spy(nn.Module):
    """A model that records the inputs of its forward passes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.model(x)


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.0)])
def test_start_is_the_first_iterate_of_the_first_restart_only(norm, eps):
    x, y = structured_batch(4)
    torch.manual_seed(11)
    start = project(x, x + random_delta(x, eps, norm), eps, norm)
    model = _Spy(tiny_classifier())
    apgd_eot(model, x, y, eps=eps, steps=4, restarts=2, norm=norm, select_draws=0,
             start=start)
    # two probes of one image, then restart 1's first gradient, its second, restart 2's first
    assert torch.allclose(model.inputs[2], start, atol=1e-6)
    assert not torch.allclose(model.inputs[4], start, atol=1e-3)
    model.inputs.clear()
    eot_pgd(model, x, y, eps=eps, step_size=eps / 4, steps=2, norm=norm, start=start)
    assert torch.allclose(model.inputs[0], start, atol=1e-6)
    with pytest.raises(ValueError, match="start must have the images' shape"):
        eot_pgd(model, x, y, eps=eps, step_size=eps / 4, steps=1, start=start[:2])


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.0)])
def test_start_none_reproduces_the_random_start_bit_for_bit(norm, eps):
    """start=None draws the random start as before: the same result as starting at that draw
    by start= (which draws nothing), the later restarts' draws included."""
    x, y = structured_batch(4)
    model = tiny_classifier()
    for attack, settings in (
        (apgd_eot, {"steps": 4, "restarts": 2, "select_draws": 0}),
        (apgd_eot, {"steps": 3, "select_draws": 2}),
        (eot_pgd, {"steps": 3, "step_size": eps / 4}),
    ):
        torch.manual_seed(5)
        default = attack(model, x, y, eps=eps, norm=norm, **settings)
        torch.manual_seed(5)
        explicit = attack(model, x, y, eps=eps, norm=norm, start=None, **settings)
        torch.manual_seed(5)
        drawn = project(x, x + random_delta(x, eps, norm), eps, norm)
        started = attack(model, x, y, eps=eps, norm=norm, start=drawn, **settings)
        assert torch.equal(default, explicit) and torch.equal(default, started)
    # without random_start, start=None begins at the clean images, as before
    torch.manual_seed(5)
    clean_start = eot_pgd(model, x, y, eps=eps, step_size=eps / 4, steps=2, norm=norm,
                          random_start=False)
    assert torch.equal(clean_start, eot_pgd(model, x, y, eps=eps, step_size=eps / 4, steps=2,
                                            norm=norm, random_start=False, start=x))
