"""Long attacks report progress per iteration, so the bar shows a rate and the time left from the
first batch on (not 0/N batches for hours)."""

from __future__ import annotations

import torch

from purifyguard.evaluation import evaluate, harness
from purifyguard.evaluation.attacks import AttackSpec, run_attack


def tiny_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10)).eval()


def test_run_attack_reports_every_iteration():
    calls = []
    spec = AttackSpec("pgd", norm="linf", eps=0.1, steps=4, eot=2)
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2])
    run_attack(spec, tiny_classifier(), x, y, seed=0, on_step=lambda: calls.append(1))
    assert len(calls) == 4


def test_the_evaluation_bar_counts_attack_iterations(monkeypatch):
    bars = []
    real_tqdm = harness.tqdm

    def recording_tqdm(*args, **kwargs):
        bar = real_tqdm(*args, **kwargs)
        bars.append(bar)
        return bar

    monkeypatch.setattr(harness, "tqdm", recording_tqdm)
    data = (torch.rand(6, 1, 28, 28), torch.arange(6) % 10)
    evaluate(tiny_classifier(), data, ["pgd:eps=0.1,steps=3,eot=1"], n=6, batch_size=4, runs=1,
             progress=True)
    by_unit = {bar.unit: bar for bar in bars}
    assert by_unit["step"].total == 2 * 3 and by_unit["step"].n == 2 * 3  # 2 batches x 3 steps
    assert by_unit["batch"].total == 2 and by_unit["batch"].n == 2  # the clean pass
