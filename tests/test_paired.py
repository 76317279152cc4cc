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
    format_p_value,
    mcnemar_exact,
    paired_bootstrap,
    paired_margin_test,
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


def spread(n: int = 100, seed: int = 0) -> torch.Tensor:
    """n fixed numbers of mean exactly 0 and standard deviation exactly 1."""
    values = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (values - values.mean()) / values.std()


def test_a_difference_of_six_on_every_image_passes_a_margin_of_five():
    second = torch.linspace(0, 80, 100, dtype=torch.float64)  # per-image scores in points
    result = paired_margin_test(second + 6, second, margin=5)
    assert result["difference"] == pytest.approx(6)
    assert result["margin"] == 5 and result["alternative"] == "greater"
    assert result["ci"]["one_sided95"] == pytest.approx(6)
    assert result["ci"]["two_sided95"] == pytest.approx([6, 6])
    assert result["p_value"] == 0 and result["samples"] == 10_000
    assert format_p_value(result["p_value"], result["samples"]) == "p < 0.0001"
    # ... and the same six points do not pass a margin of seven
    assert paired_margin_test(second + 6, second, margin=7)["p_value"] == 1


def test_a_difference_of_six_with_wide_spread_is_significant_against_zero_not_against_five():
    second = torch.full((100,), 50.0, dtype=torch.float64)
    first = second + 6 + 20 * spread()  # standard error 2 points
    two_sided = paired_bootstrap(first, second)
    assert two_sided["ci95"][0] > 0 and two_sided["p_value"] < 0.05  # 6 differs from 0 ...
    result = paired_margin_test(first, second, margin=5)
    assert result["difference"] == pytest.approx(6)
    assert result["ci"]["one_sided95"] < 5 and result["p_value"] > 0.05  # ... not from 5
    assert 0.2 < result["p_value"] < 0.5  # about P(Z < -0.5) = 0.31
    assert result["ci"]["two_sided95"] == two_sided["ci95"]  # the same resamplings


def test_non_inferiority_within_three_points_of_a_tight_difference_of_minus_one():
    second = torch.full((100,), 70.0, dtype=torch.float64)
    first = second - 1 + 0.5 * spread()
    result = paired_margin_test(first, second, margin=-3)
    assert result["difference"] == pytest.approx(-1)
    assert result["ci"]["one_sided95"] > -3 and result["p_value"] < 1 / result["samples"]
    # a one-point margin is not met: the difference is -1 itself
    assert paired_margin_test(first, second, margin=-1 + 0.2)["p_value"] > 0.95


def test_the_margin_test_is_symmetric_and_its_bound_and_p_value_agree():
    second = torch.full((60,), 0.5, dtype=torch.float64)
    first = second + 0.03 + 0.1 * spread(60, seed=1)
    for margin in (-0.02, 0.0, 0.01, 0.02, 0.03, 0.05):
        greater = paired_margin_test(first, second, margin, samples=2000, seed=3)
        less = paired_margin_test(second, first, -margin, samples=2000, seed=3,
                                  alternative="less")
        assert less["difference"] == -greater["difference"]
        assert less["p_value"] == greater["p_value"]
        assert less["ci"]["one_sided95"] == pytest.approx(-greater["ci"]["one_sided95"])
        # rejecting at 0.05 is the same as the one-sided bound beyond the margin
        assert (greater["p_value"] < 0.05) == (greater["ci"]["one_sided95"] > margin)
        assert (less["p_value"] < 0.05) == (less["ci"]["one_sided95"] < -margin)
    # against a margin of 0 the two one-sided p-values make the paired bootstrap's two-sided one
    two_sided = paired_bootstrap(first, second, samples=2000, seed=3)
    above = paired_margin_test(first, second, 0, samples=2000, seed=3)["p_value"]
    below = paired_margin_test(first, second, 0, samples=2000, seed=3, alternative="less")
    assert two_sided["p_value"] == pytest.approx(min(1, 2 * min(above, below["p_value"])))


def test_bad_margin_test_arguments_are_refused_by_name():
    scores = torch.zeros(5)
    for margin in (float("nan"), float("inf"), "5", True):
        with pytest.raises(ValueError, match="margin"):
            paired_margin_test(scores, scores, margin)
    with pytest.raises(ValueError, match="alternative"):
        paired_margin_test(scores, scores, 0.05, alternative="two-sided")
    with pytest.raises(ValueError, match="samples"):
        paired_margin_test(scores, scores, 0.05, samples=0)
    with pytest.raises(ValueError, match="one shape"):
        paired_margin_test(scores, torch.zeros(4), 0.05)


def test_p_values_print_honestly():
    assert format_p_value(0.0, samples=10_000) == "p < 0.0001"
    assert format_p_value(0.00005, samples=10_000) == "p < 0.0001"
    assert format_p_value(0.0, samples=2000, name="") == "< 0.0005"
    assert format_p_value(0.0144, samples=10_000) == "p = 0.014"
    assert format_p_value(0.0574) == "p = 0.057"
    assert format_p_value(3.6734e-40) == "p = 3.7e-40"  # an exact test's tiny p, not "0"
    assert format_p_value(0.0) == "p < 1e-300"  # an exact p that underflowed
    assert format_p_value(1.0, name="") == "1"
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="p_value"):
            format_p_value(bad)


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
    assert "margin_test" not in result
    with_margin = compare_stored(tmp_path, "reads", "zero", "pgd", margin=0.75)
    assert with_margin["margin_test"]["margin"] == 0.75
    assert with_margin["margin_test"]["ci"]["two_sided95"] == with_margin["mean"]["ci95"]
    assert with_margin["margin_test"]["p_value"] < 0.05  # 0.9 +- 0.05, above 0.75
    assert compare_stored(tmp_path, "reads", "zero", "pgd",
                          margin=0.95)["margin_test"]["p_value"] > 0.5
    with pytest.raises(ValueError, match="no stored batches"):
        compare_stored(tmp_path, "reads", "absent", "pgd")


def test_two_defences_evaluated_in_two_folders_are_paired_only_on_the_same_images(tmp_path):
    labels = torch.arange(40) % 10
    images = ((labels.float() + 0.5) / 10).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    for name, model, n in (("a", ReadsTheLabel(), 40), ("b", AlwaysZero(), 40),
                           ("c", AlwaysZero(), 32)):
        evaluate_models({name: model}, (images, labels), ["pgd:eps=0.001,steps=1,eot=1"], n=n,
                        batch_size=16, runs=2, output_dir=tmp_path / name, progress=False)
    result = compare_stored(tmp_path / "a", "a", "b", "pgd", second_dir=tmp_path / "b")
    assert result["worst_case"]["only_first"] == 36
    assert result["mean"]["difference"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="differ in data_fingerprint, n"):
        compare_stored(tmp_path / "a", "a", "c", "pgd", second_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="no run.json"):
        compare_stored(tmp_path / "a", "a", "b", "pgd", second_dir=tmp_path)


def test_a_defence_evaluated_on_fewer_images_is_paired_on_those(tmp_path):
    """n_per_model: "zero" runs on the first 32 of the 48 images only (its record says so, and
    the stored batches stay valid for a later run on all of them); compare_stored pairs it with
    the other on those 32 when asked, and refuses the two unequal tables otherwise."""
    labels = torch.arange(48) % 10
    images = ((labels.float() + 0.5) / 10).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    models = {"reads": ReadsTheLabel(), "zero": AlwaysZero()}
    attack = ["pgd:eps=0.001,steps=1,eot=1"]
    report = evaluate_models(models, (images, labels), attack, n=48, batch_size=16, runs=2,
                             output_dir=tmp_path, progress=False, n_per_model={"zero": 32})
    assert {(r["model"], r["n"]) for r in report["records"]} == {("reads", 48), ("zero", 32)}
    assert report["settings"]["n_per_model"] == {"zero": 32}
    assert correct_table(tmp_path, "zero", "pgd")[1].shape == (2, 32)
    result = compare_stored(tmp_path, "reads", "zero", "pgd", images=32)
    assert result["n"] == 32 and result["worst_case"]["only_first"] == 28  # 32 less 4 of class 0
    with pytest.raises(ValueError, match="not evaluated on the same images"):
        compare_stored(tmp_path, "reads", "zero", "pgd")
    with pytest.raises(ValueError, match="only 32 of the first 48"):
        compare_stored(tmp_path, "reads", "zero", "pgd", images=48)
    with pytest.raises(ValueError, match="images must be a positive int"):
        compare_stored(tmp_path, "reads", "zero", "pgd", images=0)
    whole = evaluate_models(models, (images, labels), attack, n=48, batch_size=16, runs=2,
                            output_dir=tmp_path, progress=False)  # the rest, resumed
    assert {r["n"] for r in whole["records"]} == {48}
    assert compare_stored(tmp_path, "reads", "zero", "pgd")["n"] == 48


@pytest.mark.parametrize("limits, message", [
    ({"absent": 16}, "names models that are not evaluated"),
    ({"zero": 20}, "multiple of batch_size"),
    ({"zero": 0}, "must be a positive int"),
    ([("zero", 16)], "must be a dict"),
])
def test_n_per_model_is_checked_before_anything_runs(limits, message):
    labels = torch.arange(48) % 10
    images = torch.zeros(48, 1, 8, 8)
    with pytest.raises(ValueError, match=message):
        evaluate_models({"zero": AlwaysZero()}, (images, labels), ["pgd:eps=0.001,steps=1"],
                        n=48, batch_size=16, runs=2, progress=False, n_per_model=limits)


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
