"""Paired comparison of two defences on the same images: McNemar on the worst case, a paired
bootstrap on the mean, read from an evaluation folder's stored batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from purifyguard.evaluation import evaluate_models
from purifyguard.evaluation.paired import (
    compare_attacks_stored,
    compare_stored,
    correct_table,
    mcnemar_exact,
    paired_bootstrap,
)


def test_mcnemar_counts_only_the_images_where_the_defences_disagree():
    first = torch.tensor([True] * 10 + [True] * 5 + [False] * 5)
    second = torch.tensor([False] * 10 + [True] * 5 + [False] * 5)
    result = mcnemar_exact(first, second)
    assert (result["only_first"], result["only_second"]) == (10, 0)
    assert result["p_value"] == pytest.approx(2 / 2**10)
    assert mcnemar_exact(first, first)["p_value"] == 1.0
    balanced = mcnemar_exact(torch.tensor([True, False]), torch.tensor([False, True]))
    assert balanced["p_value"] == 1.0


def test_the_paired_bootstrap_sees_a_consistent_difference_and_no_difference():
    torch.manual_seed(0)
    base = torch.rand(200)
    clear = paired_bootstrap(base + 0.05, base)
    assert clear["difference"] == pytest.approx(0.05)
    assert clear["ci95"][0] > 0 and clear["p_value"] < 0.01
    same = paired_bootstrap(base, base)
    assert same["difference"] == 0 and same["p_value"] == 1.0


def test_scores_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        paired_bootstrap(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="one shape"):
        mcnemar_exact(torch.zeros(3, dtype=torch.bool), torch.zeros(2, dtype=torch.bool))


class ReadsTheLabel(nn.Module):
    """Predicts class k from a mean pixel near (k + 0.5) / 10: right on every image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = x.mean(dim=(1, 2, 3)) * 10 - 0.5
        return -(level[:, None] - torch.arange(10.0)) ** 2


class AlwaysZero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.bias + torch.eye(10)[0]).expand(len(x), 10) + 0 * x.sum(dim=(1, 2, 3))[:, None]


def test_two_stored_defences_are_compared_image_by_image(tmp_path):
    labels = torch.arange(40) % 10
    images = ((labels.float() + 0.5) / 10).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    evaluate_models({"reads": ReadsTheLabel(), "zero": AlwaysZero()}, (images, labels),
                    ["pgd:eps=0.001,steps=1,eot=1"], n=40, batch_size=16, runs=2,
                    output_dir=tmp_path, progress=False)

    indices, table = correct_table(tmp_path, "zero", "pgd")
    assert sorted(indices.tolist()) == list(range(40)) and table.shape == (2, 40)
    result = compare_stored(tmp_path, "reads", "zero", "pgd")
    assert result["n"] == 40
    assert result["worst_case"]["only_first"] == 36  # every image but the four of class 0
    assert result["worst_case"]["only_second"] == 0
    assert result["mean"]["difference"] == pytest.approx(0.9)
    assert result["mean"]["p_value"] < 0.01
    with pytest.raises(ValueError, match="no stored batches"):
        compare_stored(tmp_path, "reads", "absent", "pgd")


def test_two_attacks_on_one_stored_defence_are_compared_image_by_image(tmp_path):
    labels = torch.arange(40) % 10
    images = ((labels.float() + 0.5) / 10).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    evaluate_models({"reads": ReadsTheLabel()}, (images, labels),
                    ["pgd:eps=0.001,steps=1,eot=1,name=weak",
                     "pgd:eps=0.2,steps=5,eot=1,name=strong"],
                    n=40, batch_size=16, runs=2, output_dir=tmp_path, progress=False)

    result = compare_attacks_stored(tmp_path, "reads", "strong", "weak")
    assert (result["model"], result["first"], result["second"], result["n"]) == (
        "reads", "strong", "weak", 40)
    _, strong = correct_table(tmp_path, "reads", "strong")
    fooled = int((~strong.all(0)).sum())
    assert fooled > 20  # a shift of 0.2 in the mean pixel is two classes away
    assert result["worst_case"] == {"only_first": 0, "only_second": fooled,
                                    "p_value": pytest.approx(2 / 2**fooled)}
    assert result["mean"]["difference"] < 0 and result["mean"]["p_value"] < 0.01
    with pytest.raises(ValueError, match="no stored batches"):
        compare_attacks_stored(tmp_path, "reads", "strong", "absent")
