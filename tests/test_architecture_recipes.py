"""docs/architecture.md's "how to add" recipes, followed as written: a toy sampler, a toy
registered purifier (the toy attack's recipe is in tests/test_attack_registry.py)."""

from __future__ import annotations

import pytest
import torch

import purifyguard
from purifyguard import PurifiedModel, PurifierConfig, registry
from purifyguard.samplers import Sampler, register_sampler, sampler_names, unregister_sampler


@pytest.fixture
def one_shot_sampler():
    """The recipe's toy sampler: jump from t* straight to the denoiser's estimate of clean data."""

    @register_sampler("one-shot")
    class OneShotSampler(Sampler):
        def indices(self, t_star, n_steps):
            return [(t_star - 1, -1)]

        def step(self, schedule, x_t, eps_hat, index, prev, eta):
            return schedule.predict_x0(x_t, eps_hat, index), torch.zeros_like(x_t)

        def stochastic(self, eta):
            return False

        def n_evaluations(self, t_star, n_steps):
            return 1

    yield OneShotSampler
    unregister_sampler("one-shot")


def test_a_registered_sampler_runs_by_name(one_shot_sampler, make_purifier, images):
    assert "one-shot" in sampler_names()
    one_shot = make_purifier(t_star=5, sampler="one-shot")
    assert one_shot.config.nfe == 1
    # One DDIM step from t* - 1 to clean data is the same jump: x_prev = x0_hat.
    one_ddim_step = make_purifier(t_star=5, sampler="ddim", n_steps=1)
    torch.testing.assert_close(one_shot.purify(images, seed=3), one_ddim_step.purify(images, seed=3))
    assert one_shot.last_nfe == 1


def test_an_unregistered_sampler_is_refused_by_name():
    with pytest.raises(ValueError, match="sampler must be one of .*'ddim'.*got 'one-shot'"):
        PurifierConfig(sampler="one-shot")


def test_registering_a_sampler_twice_or_a_non_sampler_is_refused(one_shot_sampler):
    with pytest.raises(ValueError, match="already registered as 'one-shot'"):
        register_sampler("one-shot")(type("Other", (Sampler,), {}))
    with pytest.raises(ValueError, match="decorates a Sampler subclass"):
        register_sampler("not-a-sampler")(object)
    with pytest.raises(ValueError, match="lower-case"):
        register_sampler("One Shot")


@pytest.fixture
def toy_purifier_entry(make_purifier):
    """The recipe's registered purifier, removed again afterwards."""
    tiny = make_purifier(t_star=2)

    @purifyguard.register_purifier("toy-grey-28", channels=1, resolution=28,
                                   description="a two-step toy purifier")
    def load_toy():
        return tiny

    yield tiny
    registry._REGISTRY.pop("toy-grey-28")


def test_a_registered_purifier_loads_by_name_in_front_of_a_classifier(toy_purifier_entry, images):
    assert "toy-grey-28" in purifyguard.list_purifiers()
    assert purifyguard.load_purifier("toy-grey-28") is toy_purifier_entry
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    model = PurifiedModel(classifier, purifier="toy-grey-28", mean=(0.0,), std=(1.0,),
                          input_size=28)
    assert model.purifier is toy_purifier_entry
    assert model(images).shape == (4, 10)
