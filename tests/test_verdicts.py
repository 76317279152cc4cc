"""Verdicts from R purifications, checked on hand-made tables of right (1) and wrong (0) answers."""

from __future__ import annotations

import itertools

import pytest
import torch

from purifyguard.evaluation.verdict import accuracy_within, majority_accuracy

# 4 runs x 5 examples: example 0 always right, 1 wrong once, 2 wrong twice, 3 wrong three
# times, 4 always wrong.
TABLE = torch.tensor([
    [1, 0, 0, 0, 0],
    [1, 1, 0, 0, 0],
    [1, 1, 1, 0, 0],
    [1, 1, 1, 1, 0],
], dtype=torch.bool)


def test_one_submission_is_the_mean_and_all_runs_the_worst_case():
    assert accuracy_within(TABLE, 1) == pytest.approx(TABLE.float().mean().item())
    assert accuracy_within(TABLE, 4) == pytest.approx(0.2)  # only example 0 survives every run


def test_within_n_submissions_is_the_chance_that_n_fresh_runs_are_all_right():
    """Against brute force: every N-subset of the R runs, equally likely."""
    for n in (2, 3):
        subsets = list(itertools.combinations(range(4), n))
        expected = sum(TABLE[list(s)].all(0).float().mean().item() for s in subsets) / len(subsets)
        assert accuracy_within(TABLE, n) == pytest.approx(expected)
    # Example 1 (right in 3 of 4 runs) survives 2 submissions with probability C(3,2)/C(4,2).
    assert accuracy_within(TABLE[:, 1:2], 2) == pytest.approx(3 / 6)


def test_more_submissions_never_raise_accuracy():
    values = [accuracy_within(TABLE, n) for n in range(1, 5)]
    assert values == sorted(values, reverse=True)


def test_the_majority_vote_counts_a_tie_as_wrong():
    # right in 4, 3, 2, 1, 0 of 4 runs: majority for the first two only (2 of 4 is a tie)
    assert majority_accuracy(TABLE) == pytest.approx(2 / 5)
    assert majority_accuracy(TABLE[:3]) == pytest.approx(2 / 5)  # 3 runs: right in 3, 2, 1, 0, 0


@pytest.mark.parametrize("n", [0, 5])
def test_submissions_outside_the_runs_are_refused(n):
    with pytest.raises(ValueError, match=r"submissions must lie in \[1, 4\]"):
        accuracy_within(TABLE, n)
