"""Bad inputs and bad settings raise a ValueError that names the problem, before any network runs."""

from __future__ import annotations

import pytest
import torch

from purifyguard import PurifiedModel, Purifier, PurifierConfig


@pytest.fixture
def unet_calls(unet):
    """Counts the calls that reach the session's UNet: a bad input must never get there."""
    calls = []
    hook = unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    yield calls
    hook.remove()


def grey_classifier(channels: int = 1) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(4, 10),
    )


@pytest.mark.parametrize(
    "bad,message",
    [
        (torch.rand(1, 28, 28), "4-D"),
        (torch.rand(28, 28), "4-D"),
        (torch.rand(1, 1, 1, 28, 28), "4-D"),
        (torch.rand(2, 1, 28, 28) * 255, r"\[0, 1\]"),
        (torch.rand(2, 1, 28, 28) - 0.5, r"\[0, 1\]"),
        (torch.full((2, 1, 28, 28), float("nan")), "NaN or Inf"),
        (torch.rand(2, 1, 28, 28).index_fill_(3, torch.tensor([3]), float("inf")), "NaN or Inf"),
        (torch.randint(0, 2, (2, 1, 28, 28)), "floating point"),
        (torch.rand(2, 2, 28, 28), r"shape \(N, 1, 28, 28\)"),
        (torch.rand(2, 3, 28, 28), r"shape \(N, 1, 28, 28\)"),
        (torch.rand(2, 1, 32, 32), r"shape \(N, 1, 28, 28\)"),
    ],
)
def test_purifier_rejects_bad_images_before_the_unet(make_purifier, unet_calls, bad, message):
    purifier = make_purifier()
    with pytest.raises(ValueError, match=message):
        purifier.purify(bad)
    assert unet_calls == []


def test_a_valid_batch_does_reach_the_unet(make_purifier, unet_calls):
    """The control for the tests above: the call counter does see the UNet's calls."""
    make_purifier(t_star=2).purify(torch.rand(2, 1, 28, 28))
    assert len(unet_calls) == 2


def test_a_tiny_range_overshoot_is_tolerated_and_clamped(make_purifier):
    purifier = make_purifier(t_star=0)
    x = torch.rand(2, 1, 28, 28)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 1 + 1e-4, -1e-4
    purified = purifier.purify(x)
    assert purified.min() >= 0 and purified.max() <= 1


@pytest.mark.parametrize(
    "bad,message",
    [
        (torch.rand(2, 2, 28, 28), "2 channels"),
        (torch.rand(2, 1, 28, 28) + 1, r"\[0, 1\]"),
        (torch.rand(1, 28, 28), "4-D"),
    ],
)
def test_purified_model_rejects_bad_images(make_purifier, unet_calls, bad, message):
    model = PurifiedModel(grey_classifier(3), make_purifier())
    with pytest.raises(ValueError, match=message):
        model(bad)
    assert unet_calls == []


@pytest.mark.parametrize("channels", [2, 4])
def test_channel_counts_that_cannot_be_converted(make_purifier, unet_calls, channels):
    """A 2- or 4-channel classifier in front of a grey purifier: only 1 <-> 3 converts."""
    model = PurifiedModel(grey_classifier(channels), make_purifier())
    with pytest.raises(ValueError, match=f"cannot convert {channels}-channel"):
        model(torch.rand(2, channels, 28, 28))
    assert unet_calls == []


@pytest.mark.parametrize("t_star", [1001, 5000, -1])
def test_t_star_out_of_range(unet, t_star):
    with pytest.raises(ValueError, match="t_star"):
        Purifier(unet, t_star=t_star)


def test_t_star_out_of_range_names_the_schedule_length(unet):
    with pytest.raises(ValueError, match=r"\[0, 1000\]"):
        Purifier(unet, t_star=1001)
    assert Purifier(unet, t_star=1000).config.t_star == 1000


def test_t_star_beyond_a_short_schedule(unet):
    with pytest.raises(ValueError, match="schedule has 50 steps"):
        Purifier(unet, {"num_train_timesteps": 50}, t_star=60)


def test_ddim_steps_beyond_t_star(unet):
    with pytest.raises(ValueError, match=r"n_steps=8 exceeds t_star=5"):
        Purifier(unet, t_star=5, sampler="ddim", n_steps=8)
    with pytest.raises(ValueError, match="n_steps"):
        PurifierConfig(t_star=5, sampler="ddim", n_steps=0)


def test_surrogate_steps_beyond_t_star(unet):
    with pytest.raises(ValueError, match="surrogate_steps"):
        Purifier(unet, t_star=3, gradient_mode="surrogate", surrogate_steps=5)


def test_adversarial_guidance_needs_a_guidance_network(unet):
    with pytest.raises(ValueError, match="guidance network"):
        Purifier(unet, guidance="adversarial", guidance_scale=1.0)


def test_a_guidance_network_without_features_to_read(unet):
    """Any nn.Module classifier guides (features: the input of its last nn.Linear); one without
    an nn.Linear needs guidance_layer, and a guidance_layer must exist."""
    Purifier(unet, guidance_network=grey_classifier(), guidance="adversarial")
    no_linear = torch.nn.Sequential(torch.nn.Conv2d(1, 10, 3), torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten())
    with pytest.raises(ValueError, match="no nn.Linear layer.*guidance_layer"):
        Purifier(unet, guidance_network=no_linear, guidance="adversarial")
    with pytest.raises(ValueError, match="guidance_layer 'layer9' is not a layer"):
        Purifier(unet, guidance_network=grey_classifier(), guidance="adversarial",
                 guidance_layer="layer9")


@pytest.mark.parametrize(
    "setting,value",
    [("sampler", "euler"), ("guidance", "classifier"), ("gradient_mode", "exact"),
     ("eta", 1.5), ("guidance_scale", -1.0)],
)
def test_unknown_or_out_of_range_settings_name_the_setting(unet, setting, value):
    with pytest.raises(ValueError, match=setting):
        Purifier(unet, **{setting: value})


def test_unknown_setting_names(unet):
    with pytest.raises(ValueError, match="t_stars"):
        Purifier(unet, t_stars=5)


def test_purified_model_arguments():
    with pytest.raises(ValueError, match="n_samples"):
        PurifiedModel(grey_classifier(), purifier=False, n_samples=0)
    with pytest.raises(ValueError, match="both mean and std"):
        PurifiedModel(grey_classifier(), purifier=False, mean=(0.5,))
    with pytest.raises(ValueError, match="nn.Module"):
        PurifiedModel(lambda x: x, purifier=False)
