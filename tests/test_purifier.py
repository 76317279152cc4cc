"""Purifier behaviour: shapes, NFE, randomness, gradients in every mode, and what guidance does."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import make_guidance_network, make_unet
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention

from purifyguard.config import GUIDANCE_MODES, SAMPLERS

# Scales that move the sample visibly with these tiny networks: pixel guidance with the
# variance schedule (s_t = s * beta_t), adversarial with a constant s_t (the untrained guidance
# network's feature gradients are small).
SCALES = {
    "none": {"guidance_scale": 0.0},
    "pixel": {"guidance_scale": 100.0, "scale_schedule": "variance"},
    "adversarial": {"guidance_scale": 20.0, "scale_schedule": "constant"},
}


def guided(make_purifier, guidance: str, **settings):
    return make_purifier(guidance=guidance, **SCALES[guidance], **settings)


def tiny_classifier(seed: int = 0) -> torch.nn.Module:
    """A 1x28x28 -> 10 classifier to put behind the purifier in gradient tests."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, stride=2), torch.nn.Tanh(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 13 * 13, 10),
    )


def input_gradient(function, x: torch.Tensor) -> torch.Tensor:
    """The vector-Jacobian product of function at x with a fixed vector: a linear loss, so two
    processes with the same Jacobian give the same gradient whatever their values."""
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    x = x.clone().requires_grad_()
    (function(x) * weights).sum().backward()
    return x.grad


# ---- output, NFE, identity ----------------------------------------------------------------


@pytest.mark.parametrize("sampler,guidance", list(itertools.product(SAMPLERS, GUIDANCE_MODES)))
def test_output_keeps_shape_and_lies_in_unit_range(make_purifier, images, sampler, guidance):
    purifier = guided(make_purifier, guidance, sampler=sampler, n_steps=3 if sampler == "ddim" else None)
    purified = purifier.purify(images, seed=0)
    assert purified.shape == images.shape
    assert purified.dtype == images.dtype
    assert purified.min() >= 0 and purified.max() <= 1
    assert not torch.equal(purified, images)


@pytest.mark.parametrize("guidance", GUIDANCE_MODES)
def test_ddpm_evaluates_the_denoiser_t_star_times(make_purifier, images, guidance):
    purifier = guided(make_purifier, guidance, t_star=7, sampler="ddpm")
    purifier.purify(images)
    assert purifier.last_nfe == purifier.config.nfe == 7


@pytest.mark.parametrize("guidance", GUIDANCE_MODES)
def test_ddim_evaluates_the_denoiser_k_times(make_purifier, images, guidance):
    purifier = guided(make_purifier, guidance, t_star=7, sampler="ddim", n_steps=3)
    purifier.purify(images)
    assert purifier.last_nfe == purifier.config.nfe == 3


def test_nfe_counts_the_denoiser_calls(make_purifier, images):
    """last_nfe is not a bookkeeping guess: it equals the calls that reach the UNet."""
    purifier = make_purifier(t_star=6, sampler="ddim", n_steps=4)
    calls = []
    hook = purifier.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        purifier.purify(images)
    finally:
        hook.remove()
    assert len(calls) == purifier.last_nfe == 4


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_t_star_zero_returns_the_input_unchanged(make_purifier, images, sampler):
    purifier = make_purifier(t_star=0, sampler=sampler)
    assert torch.equal(purifier.purify(images), images)
    assert purifier.last_nfe == purifier.config.nfe == 0


# ---- randomness ----------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_seed_same_output_different_seed_different_output(make_purifier, images, sampler):
    purifier = make_purifier(sampler=sampler, n_steps=3 if sampler == "ddim" else None)
    assert torch.equal(purifier.purify(images, seed=3), purifier.purify(images, seed=3))
    assert not torch.allclose(purifier.purify(images, seed=3), purifier.purify(images, seed=4))


def test_a_generator_gives_the_same_output_as_its_seed(make_purifier, images):
    purifier = make_purifier()
    generator = torch.Generator().manual_seed(11)
    assert torch.equal(purifier.purify(images, generator=generator), purifier.purify(images, seed=11))


def test_fixed_noise_is_deterministic_without_a_seed(make_purifier, images):
    purifier = make_purifier(fixed_noise=True)
    assert torch.equal(purifier.purify(images), purifier.purify(images))


def test_default_is_stochastic(make_purifier, images):
    purifier = make_purifier()
    assert not purifier.config.fixed_noise
    assert not torch.allclose(purifier.purify(images), purifier.purify(images))


# ---- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("sampler,guidance", list(itertools.product(SAMPLERS, GUIDANCE_MODES)))
def test_full_gradients_are_finite_and_non_zero(make_purifier, images, sampler, guidance):
    purifier = guided(make_purifier, guidance, sampler=sampler, n_steps=3 if sampler == "ddim" else None)
    gradient = input_gradient(lambda x: purifier.purify(x, seed=0), images)
    assert torch.isfinite(gradient).all()
    assert gradient.abs().sum() > 0


@pytest.mark.parametrize(
    "variant",
    [{"guidance_on": "x_t"}, {"distance": "cosine"}, {"class_weight": 1.0},
     {"guidance_on": "x_t", "class_weight": 0.5}],
)
def test_adversarial_guidance_variants_purify_and_differentiate(make_purifier, images, variant):
    # A constant scale: the untrained guidance network's feature gradients are small, and a
    # variance-scaled step (s * beta_t ~ 1e-4 s) would move the sample by ~1e-7 only.
    purifier = make_purifier(
        guidance="adversarial", guidance_scale=20.0, scale_schedule="constant", **variant
    )
    purified = purifier.purify(images, seed=0)
    assert purified.min() >= 0 and purified.max() <= 1
    unguided = make_purifier(guidance="none").purify(images, seed=0)
    assert (purified - unguided).abs().max() > 1e-4  # the guidance changes the sample
    gradient = input_gradient(lambda x: purifier.purify(x, seed=0), images)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


@pytest.mark.parametrize("guidance", GUIDANCE_MODES)
def test_checkpointing_gives_the_same_gradients(make_purifier, images, guidance):
    plain = guided(make_purifier, guidance, checkpointing=False)
    checkpointed = guided(make_purifier, guidance, checkpointing=True)
    expected = input_gradient(lambda x: plain.purify(x, seed=5), images)
    actual = input_gradient(lambda x: checkpointed.purify(x, seed=5), images)
    assert torch.isfinite(actual).all() and actual.abs().sum() > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


def test_double_backward_through_attention_with_guidance_on_x0_hat(make_purifier, images):
    """docs/method.md, section 3: the default CPU attention kernel has no double backward. The
    gradient of a full-mode attack must flow through the guidance gradient, itself a backward
    through the UNet's attention blocks."""
    purifier = guided(make_purifier, "adversarial", guidance_on="x0_hat")
    assert any(isinstance(m, Attention) for m in purifier.unet.modules()), "UNet has no attention"
    classifier = tiny_classifier()
    x = images.clone().requires_grad_()
    loss = F.cross_entropy(classifier(purifier.purify(x, seed=0)), torch.tensor([0, 1, 2, 3]))
    (gradient,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0
    # The guidance term's own dependence on x_in is part of that gradient: without it the
    # gradient differs (the attack sees the guidance, not only the denoiser).
    unguided = make_purifier(guidance="none")
    x2 = images.clone().requires_grad_()
    loss2 = F.cross_entropy(classifier(unguided.purify(x2, seed=0)), torch.tensor([0, 1, 2, 3]))
    (gradient_unguided,) = torch.autograd.grad(loss2, x2)
    assert not torch.allclose(gradient, gradient_unguided)


@pytest.mark.parametrize("guidance", GUIDANCE_MODES)
def test_bpda_gradient_is_the_classifier_gradient_at_the_purified_point(
    make_purifier, images, guidance
):
    purifier = guided(make_purifier, guidance, gradient_mode="bpda")
    classifier = tiny_classifier()
    x = images.clone().requires_grad_()
    purified = purifier.purify(x, seed=9)
    classifier(purified).square().sum().backward()

    point = purifier.purify(images, seed=9).requires_grad_()
    classifier(point).square().sum().backward()
    torch.testing.assert_close(purified.detach(), point.detach())
    torch.testing.assert_close(x.grad, point.grad)


@pytest.mark.parametrize("guidance", GUIDANCE_MODES)
def test_surrogate_forward_is_the_defended_process_backward_is_the_surrogate(
    make_purifier, images, guidance
):
    settings = {"t_star": 8, "sampler": "ddpm"}
    purifier = guided(
        make_purifier, guidance, gradient_mode="surrogate", surrogate_sampler="ddim",
        surrogate_steps=2, **settings,
    )
    x = images.clone().requires_grad_()
    output = purifier.purify(x, seed=2)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    (output * weights).sum().backward()

    defended = guided(make_purifier, guidance, **settings)
    torch.testing.assert_close(output.detach(), defended.purify(images, seed=2))

    # The surrogate draws its noise after the defended process, from the same generator.
    surrogate = guided(make_purifier, guidance, t_star=8, sampler="ddim", n_steps=2)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        defended.purify(images, generator=generator)
    expected = input_gradient(lambda z: surrogate.purify(z, generator=generator), images)
    torch.testing.assert_close(x.grad, expected)
    full = input_gradient(lambda z: defended.purify(z, seed=2), images)
    assert not torch.allclose(x.grad, full)  # the surrogate is a different process


# ---- what the adversarial guidance does ----------------------------------------------------


def test_adversarial_guidance_keeps_the_latent_representation_closer_to_the_input(
    make_purifier, images, guidance_network
):
    """Same seed, same noise: the only difference is the guidance term.

    The UNet is untrained, so this does not measure purification quality. It checks that the
    guidance is wired with the right sign and strength: at small t, x0_hat is close to x_t
    (sqrt(1 - abar_t) is small), so descending grad L moves the sample toward the input's
    features whatever the denoiser predicts. A flipped sign, a guidance computed on the wrong
    tensor, or a scale that never reaches the step makes the distance no smaller (or larger),
    and the test fails.
    """

    def feature_distance(purified: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = guidance_network.forward_head(
                guidance_network.forward_features(purified), pre_logits=True
            )
            target = guidance_network.forward_head(
                guidance_network.forward_features(images), pre_logits=True
            )
        return (features - target).pow(2).sum(1)

    settings = {"t_star": 10, "sampler": "ddpm"}
    unguided = make_purifier(guidance="none", **settings)
    adversarial = make_purifier(
        guidance="adversarial", guidance_scale=20.0, scale_schedule="constant", **settings
    )
    baseline = feature_distance(unguided.purify(images, seed=0))
    distance = feature_distance(adversarial.purify(images, seed=0))
    assert (distance < baseline).all(), (distance, baseline)
    assert distance.mean() < 0.5 * baseline.mean(), (distance, baseline)


def test_another_denoiser_keeps_the_schedule_the_guidance_and_the_settings(make_purifier,
                                                                          images):
    purifier = guided(make_purifier, "adversarial", sampler="ddim", n_steps=3)
    longer_trained = make_unet(seed=7)
    swapped = purifier.with_denoiser(longer_trained, n_steps=2)
    assert swapped.unet is longer_trained and swapped.guidance_network is purifier.guidance_network
    assert swapped.config.replace(n_steps=3) == purifier.config
    assert swapped.schedule.scheduler_config == purifier.schedule.scheduler_config
    assert not torch.equal(swapped.purify(images, seed=0), purifier.purify(images, seed=0))
    with pytest.raises(ValueError, match="unet must be a diffusers UNet2DModel, got str"):
        purifier.with_denoiser("fashion-mnist-ddpm")
    larger_images = UNet2DModel(sample_size=32, in_channels=1, out_channels=1,
                                block_out_channels=(8, 8), norm_num_groups=4,
                                down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(ValueError, match="config.resolution=28 contradicts the denoiser"):
        purifier.with_denoiser(larger_images)


def test_another_guidance_network_keeps_the_denoiser_and_the_settings(make_purifier, images):
    purifier = guided(make_purifier, "adversarial", sampler="ddim", n_steps=3)
    other_network = make_guidance_network(seed=7)
    swapped = purifier.with_guidance_network(other_network, guidance_scale=10.0)
    assert swapped.unet is purifier.unet and swapped.guidance_network is other_network
    assert swapped.config.replace(guidance_scale=20.0) == purifier.config
    assert swapped.config.guidance_scale == 10.0
    assert not torch.equal(swapped.purify(images, seed=0), purifier.purify(images, seed=0))
    with pytest.raises(ValueError, match="guidance_network must be an nn.Module, got str"):
        purifier.with_guidance_network("resnet18")
