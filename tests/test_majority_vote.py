"""A deployed vote over k fresh purifications: the class most of them predict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from purifyguard import PurifiedModel, Purifier
from purifyguard.purified_model import majority_vote


def test_the_vote_answers_the_majority_class_not_the_largest_mean_logit():
    # Three purifications: two say class 0 narrowly, one says class 1 by far.
    logits = torch.tensor([[[1.0, 0.9, 0.0]], [[1.0, 0.9, 0.0]], [[0.0, 9.0, 0.0]]])
    mean = logits.mean(0)
    assert mean.argmax(-1).item() == 1
    voted = majority_vote(logits, mean)
    assert voted.argmax(-1).item() == 0
    assert voted.exp()[0, 0].item() == pytest.approx(2 / 3, abs=1e-3)


def test_a_tie_goes_to_the_larger_mean_logit():
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])
    assert majority_vote(logits, logits.mean(0)).argmax(-1).item() == 0


def test_a_voting_model_outputs_vote_shares_with_the_mean_logits_gradient(make_purifier, images):
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    purifier = make_purifier(t_star=3)
    voting = PurifiedModel(classifier, purifier, mean=(0.0,), std=(1.0,), n_samples=3,
                           aggregate="vote")
    averaging = PurifiedModel(classifier, purifier, mean=(0.0,), std=(1.0,), n_samples=3)
    x = images.clone().requires_grad_(True)
    torch.manual_seed(0)
    out = voting(x)
    shares = out.exp().sum(-1)
    assert torch.allclose(shares, torch.ones_like(shares), atol=1e-2)  # log vote shares
    (gradient,) = torch.autograd.grad(out[:, 0].sum(), x)
    y = images.clone().requires_grad_(True)
    torch.manual_seed(0)
    (expected,) = torch.autograd.grad(averaging(y)[:, 0].sum(), y)
    torch.testing.assert_close(gradient, expected)


def test_aggregate_is_checked_and_saved(make_purifier, unet, tmp_path):
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    with pytest.raises(ValueError, match="aggregate must be one of"):
        PurifiedModel(classifier, make_purifier(t_star=2), mean=(0.0,), std=(1.0,),
                      aggregate="median")
    model = PurifiedModel(classifier, Purifier(unet, t_star=2), mean=(0.0,), std=(1.0,),
                          n_samples=4, aggregate="vote")
    model.save_pretrained(tmp_path / "voting")
    loaded = PurifiedModel.from_pretrained(
        tmp_path / "voting", classifier=nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)))
    assert (loaded.n_samples, loaded.aggregate) == (4, "vote")
