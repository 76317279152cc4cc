"""Validation while training: the learning curve on held-out images, the best network kept and
exported, resume keeping the curve and the best that the checkpoint had seen."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_train import TINY, fashion_mnist_available, train  # noqa: F401 (a fixture)
from torch import nn

from purifyguard.train.run import read_metrics
from purifyguard.train.validation import BestNetwork, ValidationResult, curve_table, measure


def test_a_better_measurement_replaces_the_best_and_a_tie_keeps_the_earlier(tmp_path):
    best = BestNetwork(tmp_path)
    saved = []

    def save(folder):
        folder.mkdir(exist_ok=True)
        saved.append(folder)

    assert best.offer(ValidationResult(10, 0.8, 0.5), save)
    assert not best.offer(ValidationResult(20, 0.9, 0.5), save)  # a tie in robust accuracy
    assert not best.offer(ValidationResult(30, 0.95, 0.4), save)  # cleaner, less robust
    assert best.offer(ValidationResult(40, 0.7, 0.6), save)
    assert len(saved) == 2
    assert best.saved() == ValidationResult(40, 0.7, 0.6)


def test_clean_accuracy_decides_when_there_is_no_attack(tmp_path):
    best = BestNetwork(tmp_path)
    best.offer(ValidationResult(1, 0.5, None), lambda folder: folder.mkdir())
    assert best.offer(ValidationResult(2, 0.6, None), lambda folder: None)
    assert best.best.step == 2


def test_restore_forgets_a_best_saved_after_the_resumed_checkpoint(tmp_path):
    best = BestNetwork(tmp_path)
    best.offer(ValidationResult(8, 0.9, 0.7), lambda folder: folder.mkdir())
    early = [ValidationResult(4, 0.8, 0.6)]

    resumed = BestNetwork(tmp_path)
    resumed.restore(early)
    assert resumed.best is None and resumed.saved() is None

    resumed.offer(ValidationResult(8, 0.9, 0.7), lambda folder: None)  # step 8 trained again
    again = BestNetwork(tmp_path)
    again.restore([*early, ValidationResult(8, 0.9, 0.7)])
    assert again.best == ValidationResult(8, 0.9, 0.7)


def test_the_curve_table_marks_the_best_row():
    history = [ValidationResult(5, 0.5, 0.2), ValidationResult(10, 0.6, 0.3)]
    table = curve_table(history, history[1]).splitlines()
    assert table[0] == "| step | clean accuracy | robust accuracy | kept |"
    assert table[-1] == "| 10 | 0.6000 | 0.3000 | best |"


class Threshold(nn.Module):
    """Class 1 when the mean pixel exceeds 0.5: a model a small L-inf step flips near 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(40.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.weight * (x.mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([-score, score], dim=1)


def test_measure_attacks_and_leaves_the_training_random_state_alone():
    images = torch.cat([torch.full((4, 1, 8, 8), 0.55), torch.full((4, 1, 8, 8), 0.9)])
    labels = torch.ones(8, dtype=torch.long)
    model = Threshold().train()

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    result = measure(model, images, labels, step=7, eps=0.1, attack_steps=5, seed=0)
    after = torch.rand(3)

    assert result == ValidationResult(7, 1.0, 0.5)  # the 0.55 images cross 0.5 within eps
    assert torch.equal(after, expected)
    assert model.training
    assert measure(model, images, labels, step=7, eps=0.1, attack_steps=0,
                   seed=0).robust_accuracy is None


TRADES = ["--beta", "6", "--pgd-steps", "1", "--batch-size", "8", "--lr", "0.05",
          "--validation-size", "200", "--validation-images", "32", "--validate-every", "3",
          "--validation-attack-steps", "2", "--checkpoint-every", "3", "--keep-checkpoints", "5",
          "--log-every", "100", *TINY["guidance"]]


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist_available")
def test_a_run_logs_its_curve_and_exports_the_best_network(tmp_path):
    out = tmp_path / "run"
    train("guidance", out, "--steps", "9", *TRADES)

    curve = [line for line in read_metrics(out) if "validation_robust_accuracy" in line]
    assert [line["step"] for line in curve] == [3, 6, 9]
    best = json.loads((out / "best.json").read_text())
    assert best["robust_accuracy"] == max(line["validation_robust_accuracy"] for line in curve)
    exported = load_file(out / "final" / "model.safetensors")
    kept = load_file(out / "best" / "model.safetensors")
    assert all(torch.equal(exported[name], kept[name]) for name in kept)
    card = (out / "final" / "README.md").read_text()
    assert "## Learning curve" in card and (out / "final" / "learning_curve.png").stat().st_size
    assert f"best validated network, step {best['step']}" in card


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist_available")
def test_resume_keeps_the_curve_and_reaches_the_same_best(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train("guidance", straight, "--steps", "9", *TRADES)
    # Killed after step 9's validation, before its checkpoint: resume goes back to step 6.
    shutil.copytree(straight, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "step_00000009")
    shutil.rmtree(interrupted / "final")
    result = train("guidance", interrupted, "--resume", "--steps", "9", *TRADES)

    assert "at step 6" in result.stdout
    steps = [line["step"] for line in read_metrics(interrupted) if "validation_clean_accuracy"
             in line]
    assert steps == [3, 6, 9]
    assert json.loads((interrupted / "best.json").read_text()) == \
        json.loads((straight / "best.json").read_text())
    first = load_file(straight / "final" / "model.safetensors")
    second = load_file(interrupted / "final" / "model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)
