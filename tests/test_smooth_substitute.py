"""Smooth-substitute gradients (purifyguard/evaluation/smooth_substitute.py): the real defence
forward, a smooth stand-in of its guidance network backward, on the same purification noise.

The purifier here is tiny and guided by a tiny ReLU + max-pool network whose activations are
O(1) (TINY_SCALE, constant schedule): the guidance moves the purified images by L-inf 0.04, L2
0.29 on average (the bundled purifier's: 0.18, 0.58), so smoothing it is not a no-op."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import make_guidance_network, make_unet
from test_evaluation import tiny_classifier
from torch import nn

import purifyguard
from purifyguard import PurifiedModel, Purifier
from purifyguard.evaluation import AttackSpec, parse_attack, validate_report
from purifyguard.evaluation.attacks import attacked_model, default_attacks, run_attack
from purifyguard.evaluation.smooth_substitute import (
    LogSumExpPool2d,
    SmoothActivation,
    SmoothSubstituteModel,
    forward_distance,
    piecewise_linear_modules,
    smooth_copy,
    smooth_substitute,
    substitute_record,
)
from purifyguard.evaluation.store import batch_key

TINY_SCALE = 10.0


def tiny_relu_network(gain: float = 4.0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A ReLU network with a max-pool stem whose activations are O(1) (gain on the convs)."""
    torch.manual_seed(0)
    network = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    with torch.no_grad():
        for module in network:
            if isinstance(module, nn.Conv2d):
                module.weight.mul_(gain)
    return network.to(dtype).eval()


def guided_model(dtype: torch.dtype = torch.float32, **settings) -> PurifiedModel:
    settings = {"t_star": 5, "guidance": "adversarial", "guidance_scale": TINY_SCALE,
                "scale_schedule": "constant", **settings}
    purifier = Purifier(make_unet().to(dtype), guidance_network=tiny_relu_network(dtype=dtype),
                        **settings)
    return PurifiedModel(tiny_classifier().to(dtype), purifier, mean=(0.5,), std=(0.5,))


@pytest.fixture(scope="module")
def model() -> PurifiedModel:
    return guided_model()


def batch(n: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Images inside (0.1, 0.9), so small moves never touch the [0, 1] clamps."""
    generator = torch.Generator().manual_seed(1234)
    x = 0.1 + 0.25 * torch.rand(n, 1, 28, 28, generator=generator)
    x[:, :, 8:20, 8:20] += 0.5
    return x.to(dtype)


# --- (a) the smooth copy ----------------------------------------------------------------------


@pytest.mark.parametrize("network", [make_guidance_network(), tiny_relu_network()],
                         ids=["timm-resnet10t", "sequential"])
@pytest.mark.parametrize("pool", ["lse", "avg"])
def test_the_smooth_copy_has_no_relu_or_max_pool_and_leaves_the_network_alone(network, pool):
    before = {k: v.clone() for k, v in network.state_dict().items()}
    replaced = piecewise_linear_modules(network)
    assert replaced and any("pool" in name or name == "2" for name in replaced)
    x = batch(2)
    with torch.no_grad():
        reference = network(x)
    smooth = smooth_copy(network, "softplus", 10.0, pool)
    kinds = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
    assert not [m for m in smooth.modules() if isinstance(m, kinds)]
    assert piecewise_linear_modules(smooth) == []
    activations = [m for m in smooth.modules() if isinstance(m, SmoothActivation)]
    assert len(activations) == sum(isinstance(m, nn.ReLU) for m in network.modules())
    pools = [m for m in smooth.modules() if isinstance(m, (LogSumExpPool2d, nn.AvgPool2d))]
    assert len(pools) >= sum(isinstance(m, nn.MaxPool2d) for m in network.modules())
    # The original keeps its modules, weights and outputs; the copy shares no tensor with it.
    assert piecewise_linear_modules(network) == replaced
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    with torch.no_grad():
        assert torch.equal(network(x), reference)
        assert not torch.equal(smooth(x), reference)
    assert not {p.data_ptr() for p in smooth.parameters()} & {
        p.data_ptr() for p in network.parameters()}
    assert not smooth.training and not any(p.requires_grad for p in smooth.parameters())


def test_sharper_copies_tend_to_the_network_with_lse_pooling():
    network = tiny_relu_network(dtype=torch.float64)
    x = batch(2, torch.float64)
    with torch.no_grad():
        reference = network(x)
        gaps = [float((smooth_copy(network, "softplus", beta)(x) - reference).abs().max())
                for beta in (10.0, 100.0, 1e4)]
        silu = float((smooth_copy(network, "silu", 1e4)(x) - reference).abs().max())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2 and silu < 1e-2, (gaps, silu)


def test_log_sum_exp_pooling_lies_between_the_mean_and_the_max():
    x = torch.randn(2, 3, 14, 15, dtype=torch.float64)
    for settings in ({"kernel_size": 3, "stride": 2, "padding": 1},
                     {"kernel_size": 2, "ceil_mode": True}, {"kernel_size": (2, 3), "stride": 1}):
        exact = nn.MaxPool2d(**settings)(x)
        assert torch.allclose(LogSumExpPool2d(**settings, beta=1e5)(x), exact, atol=1e-4)
        mean = nn.AvgPool2d(**settings, count_include_pad=False)(x)
        assert torch.allclose(LogSumExpPool2d(**settings, beta=1e-7)(x), mean, atol=1e-5)


# --- (b) the stand-in's gradient is its own forward's --------------------------------------------


def test_the_substitute_gradient_matches_finite_differences_of_its_own_forward():
    """float64, noise fixed (fixed_noise): central differences of the stand-in's purified images
    (a random linear functional of them) along random directions against autograd."""
    real = guided_model(torch.float64, fixed_noise=True, sampler="ddim", n_steps=3)
    attacked = smooth_substitute(real)
    stand_in = attacked.substitute
    assert isinstance(stand_in, PurifiedModel) and stand_in.purifier.config.fixed_noise
    x = batch(2, torch.float64)
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(x.shape, generator=generator, dtype=torch.float64)

    def f(images: torch.Tensor) -> torch.Tensor:
        return (stand_in.purify(images) * weights).sum()

    point = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(f(point), point)
    step = 1e-5
    for _ in range(3):
        direction = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            numeric = (f(x + step * direction) - f(x - step * direction)) / (2 * step)
        analytic = (gradient * direction).sum()
        assert abs(float(analytic - numeric)) <= 1e-6 * abs(float(numeric)) + 1e-9, (
            float(analytic), float(numeric))
    # The guidance moves the images: without it the gradient would be another one.
    unguided = real.with_purifier(real.purifier.with_settings(guidance="none"))
    point = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad((unguided.purify(point) * weights).sum(), point)
    assert (plain - gradient).norm() > 1e-3 * gradient.norm()


# --- (c) the stand-in's forward stays close to the real one ---------------------------------------


def test_the_forward_distance_is_small_and_shrinks_as_beta_grows(model):
    """Measured on these 4 images, LSE pooling, the same noise for both (seed 0): the purified
    images of the stand-in and the real model differ by (L-inf mean, L2 mean) 0.034, 0.23 at
    beta 10; 0.020, 0.12 at 100; 0.015, 0.050 at 1000. For scale: the guidance itself moves the
    images by 0.038, 0.29 (guided against unguided, same noise), other noise by 0.077, 0.65.
    Bounds: 1.5 x the measured figures."""
    x = batch()
    with torch.no_grad():
        torch.manual_seed(0)
        guided = model.purify(x)
        torch.manual_seed(0)
        unguided = model.with_purifier(model.purifier.with_settings(guidance="none")).purify(x)
        torch.manual_seed(1)
        redrawn = model.purify(x)
    effect = (guided - unguided).flatten(1).norm(dim=1).mean()
    other_noise = (guided - redrawn).flatten(1).norm(dim=1).mean()
    betas = (10.0, 100.0, 1000.0)
    distances = [forward_distance(model, smooth_substitute(model, beta=beta).substitute, x, seed=0)
                 for beta in betas]
    linf = [d["purified_linf_mean"] for d in distances]
    l2 = [d["purified_l2_mean"] for d in distances]
    assert 0.2 < effect < 0.4 and other_noise > 0.5, (effect, other_noise)
    assert linf[0] > linf[1] > linf[2] > 0 and l2[0] > l2[1] > l2[2] > 0, (linf, l2)
    for measured, bound in zip(linf, (0.051, 0.030, 0.023)):
        assert measured < bound, linf
    for measured, bound in zip(l2, (0.35, 0.18, 0.075)):
        assert measured < bound, l2
    assert l2[0] < effect and l2[2] < 0.25 * effect
    d = distances[0]
    assert d["n"] == 4 and d["agreement"] == 1.0 and d["logits_linf_max"] < 0.02
    assert d["purified_linf_max"] >= d["purified_linf_mean"]
    # avg pooling does not tend to max pooling: a sharper beta barely helps it.
    avg = [forward_distance(model, smooth_substitute(model, beta=beta, pool="avg").substitute,
                            x, seed=0)["purified_l2_mean"] for beta in (10.0, 1000.0)]
    assert avg[1] > 0.9 * avg[0] and avg[1] > 2 * l2[2], avg


# --- (d) straight-through: the real value, the stand-in's gradient, the same noise ---------------


def gradient_of(function, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, input gradient of a fixed random linear functional of it), noise from seed."""
    torch.manual_seed(seed)
    point = x.clone().requires_grad_(True)
    output = function(point)
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(99))
    (gradient,) = torch.autograd.grad((output * weights).sum(), point)
    return output.detach(), gradient


def test_the_output_is_the_real_models_and_the_gradient_the_substitutes(model):
    x = batch()
    attacked = smooth_substitute(model)
    assert isinstance(attacked, SmoothSubstituteModel) and not attacked.plain
    assert attacked.description["activation"] == "softplus"
    output, gradient = gradient_of(attacked, x, seed=3)
    after_attacked = torch.rand(3)
    torch.manual_seed(3)
    with torch.no_grad():
        real = model(x)
    after_real = torch.rand(3)
    substitute_output, substitute_gradient = gradient_of(attacked.substitute, x, seed=3)
    assert torch.equal(output, real)  # exactly the real value
    assert torch.equal(gradient, substitute_gradient)  # exactly the stand-in's gradient
    assert torch.equal(after_attacked, after_real)  # the stream goes on as after a real call
    assert not torch.equal(substitute_output, real)  # the stand-in is another function...
    _, real_gradient = gradient_of(model, x, seed=3)
    assert not torch.allclose(gradient, real_gradient)  # ...with another gradient
    assert attacked.logit_distance["count"] == 4
    assert 0 < attacked.logit_distance["max"] == pytest.approx(
        float((real - substitute_output).abs().amax()), rel=1e-5)
    # Without a graph only the real model runs: the same value, the same stream.
    torch.manual_seed(3)
    with torch.no_grad():
        assert torch.equal(attacked(x), real)
    assert torch.equal(torch.rand(3), after_real)


def test_with_the_real_model_as_substitute_it_is_the_plain_model(model):
    """The noise is shared: a stand-in equal to the real model (another object, same networks)
    gives the plain model's output and gradient; unshared noise would not."""
    x = batch()
    twin = model.with_purifier(model.purifier.with_settings())
    attacked = SmoothSubstituteModel(model, twin)
    assert not attacked.plain
    output, gradient = gradient_of(attacked, x, seed=5)
    plain_output, plain_gradient = gradient_of(model, x, seed=5)
    assert torch.allclose(output, plain_output, atol=1e-5, rtol=1e-5)
    assert torch.equal(gradient, plain_gradient)
    _, other_gradient = gradient_of(model, x, seed=6)
    assert not torch.allclose(other_gradient, gradient, atol=1e-3)


def test_the_purification_is_straight_through_too_and_graft_runs(model):
    x = batch(2)
    attacked = smooth_substitute(model)
    _, gradient = gradient_of(attacked.purify, x, seed=2)
    purified, substitute_gradient = gradient_of(attacked.substitute.purify, x, seed=2)
    torch.manual_seed(2)
    point = x.clone().requires_grad_(True)
    through = attacked.purify(point).detach()
    torch.manual_seed(2)
    with torch.no_grad():
        assert torch.equal(through, model.purify(x))
    assert not torch.equal(through, purified)
    assert torch.equal(gradient, substitute_gradient)
    assert attacked.classify == model.classify and attacked.n_samples == 1
    spec = parse_attack("apgd-eot:eps=0.1,steps=2,eot=2,graft=true,select_draws=0,"
                        "substitute=smooth")
    adversarial = run_attack(spec, attacked_model(spec, model, None), x, torch.tensor([0, 1]),
                             seed=0)
    assert (adversarial - x).abs().max() <= 0.1 + 1e-6


def test_without_a_guidance_network_the_attack_is_plain(model):
    x, labels = batch(2), torch.tensor([0, 1])
    for plain_model in (model.with_purifier(model.purifier.with_settings(guidance="none")),
                        model.with_purifier(None), tiny_classifier()):
        wrapped = smooth_substitute(plain_model)
        assert wrapped.plain and "plain" in wrapped.description["substitute"]
        with_option = parse_attack("pgd:eps=0.1,steps=2,eot=1,substitute=smooth")
        without = parse_attack("pgd:eps=0.1,steps=2,eot=1")
        attacker = attacked_model(with_option, plain_model, None)
        assert isinstance(attacker, SmoothSubstituteModel) and attacker.plain
        assert torch.equal(run_attack(with_option, attacker, x, labels, seed=4),
                           run_attack(without, plain_model, x, labels, seed=4))
        assert substitute_record(attacker)["forward_distance"] is None


def test_a_given_guidance_network_or_model_is_the_stand_in(model):
    network = smooth_copy(model.purifier.guidance_network, "gelu", 3.0, "avg")
    given = smooth_substitute(model, guidance_network=network)
    assert given.substitute.purifier.guidance_network is network
    assert given.substitute.purifier.unet is model.purifier.unet
    assert "given guidance network" in given.description["substitute"]
    whole = smooth_substitute(model, substitute=given.substitute)
    assert whole.substitute is given.substitute
    assert model.purifier.guidance_network is not network  # the real model is untouched
    assert piecewise_linear_modules(model.purifier.guidance_network)


# --- (e) the attack option ------------------------------------------------------------------------


def test_the_option_stays_out_of_the_batch_keys_until_it_is_set():
    assert batch_key("m", default_attacks()[0], 3, "v") == "m@v|apgd-eot#006f297f|3"
    assert batch_key("m", default_attacks()[1], 3, "v") == "m@v|pgd#206ba66d|3"
    spec = parse_attack("apgd-eot:eps=0.1,steps=20,eot=2,substitute=smooth")
    assert (spec.substitute, spec.substitute_activation) == ("smooth", "softplus")
    assert spec.gradient_mode == "smooth substitute (softplus, beta=10.0, lse pool)"
    # Each differentiated stand-in pass comes with a real pass without a graph: counted.
    assert spec.to_dict()["crafting_forward_passes"] == 20 * 2
    assert spec.to_dict()["gradient_evaluations"] == 20 * 2
    plain = spec.replace(substitute=None)
    assert plain.to_dict() == parse_attack("apgd-eot:eps=0.1,steps=20,eot=2").to_dict()
    keys = {text: batch_key("m", parse_attack("apgd-eot:eps=0.1,steps=20,eot=2" + text), 0)
            for text in ("", ",substitute=smooth", ",substitute=silu",
                         ",substitute=smooth,substitute_beta=20",
                         ",substitute=smooth,substitute_pool=avg")}
    assert len(set(keys.values())) == len(keys)
    # "smooth" is softplus: the same attack, the same key.
    assert batch_key("m", parse_attack("pgd:substitute=smooth"), 0) == batch_key(
        "m", parse_attack("pgd:substitute=softplus"), 0)
    assert parse_attack("pgd:substitute=none").substitute is None
    surrogate = parse_attack("pgd:gradient=surrogate,substitute=gelu,substitute_beta=2")
    assert surrogate.gradient_mode == (
        "surrogate(ddim, 5 steps) + smooth substitute (gelu, beta=2.0, lse pool)")


@pytest.mark.parametrize("text, message", [
    ("bpda:substitute=smooth", "substitute='smooth' is an option of apgd-eot, pgd, not of 'bpda'"),
    ("autoattack-rand:substitute=smooth", "option of apgd-eot, pgd, not of 'autoattack-rand'"),
    ("transfer:substitute=silu", "option of apgd-eot, pgd, not of 'transfer'"),
    ("square:substitute=gelu", "option of apgd-eot, pgd, not of 'square'"),
    ("pgd:substitute=relu", "substitute must be one of"),
    ("pgd:substitute=smooth,substitute_beta=0", "substitute_beta must be"),
    ("pgd:substitute=smooth,substitute_pool=max", "substitute_pool must be one of"),
    ("apgd-eot:substitute_beta=20", "set substitute"),
])
def test_the_option_is_refused_where_it_does_not_apply(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_attack(text)


def test_evaluate_runs_apgd_with_a_smooth_substitute_and_records_it(model, caplog):
    x = batch(4)
    with torch.no_grad():
        torch.manual_seed(0)
        labels = model(x).argmax(1)
    text = "apgd-eot:eps=0.1,steps=2,eot=1,select_draws=1,substitute=smooth"
    with caplog.at_level(logging.INFO, logger="purifyguard.evaluation.smooth_substitute"):
        report = purifyguard.evaluate(model, (x, labels), [text], n=4, batch_size=4, runs=1,
                                      progress=False)
    (record,) = report["records"]
    assert record["attack"]["gradient_mode"] == (
        "smooth substitute (softplus, beta=10.0, lse pool)")
    assert record["perturbation"]["within_eps"]
    validate_report(json.loads(json.dumps(report)))
    # The forward distance was measured on the attacked batch (see substitute_record).
    measured = [r for r in caplog.records if "forward distance on 4 images" in r.getMessage()]
    assert len(measured) == 1 and "purified_linf_mean" in measured[0].getMessage()
    # What the harness can put into the batch record: the attacked model's own record.
    spec = parse_attack(text)
    attacker = attacked_model(spec, model, None)
    run_attack(spec, attacker, x, labels, seed=0)
    recorded = substitute_record(attacker)
    assert (recorded["activation"], recorded["beta"], recorded["pool"]) == ("softplus", 10.0, "lse")
    assert 0 < recorded["forward_distance"]["purified_linf_mean"] < 0.051
    assert recorded["logit_distance_during_attack"]["count"] == 2 * 4  # 2 iterations x 4 images
    assert substitute_record(model) is None


def test_an_attack_spec_with_the_option_builds_like_the_default():
    spec = AttackSpec("pgd", substitute="silu", substitute_beta=5, substitute_pool="avg")
    assert isinstance(spec.substitute_beta, float)
    assert spec.replace(substitute="gelu").gradient_mode.startswith("smooth substitute (gelu")
