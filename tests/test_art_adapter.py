"""The ART adapter: a purifier as an ART preprocessing defence whose gradients are the
PurifiedModel's own, in "full" and "bpda" mode, and on which ART's own attacks run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from conftest import make_guidance_network, make_unet
from torch import nn

from purifyguard import PurifiedModel, Purifier

MEAN, STD = (0.5,), (0.25,)


@pytest.fixture(scope="module")
def art():
    return pytest.importorskip("art", reason="adversarial-robustness-toolbox is not installed")


@pytest.fixture(scope="module")
def classifier() -> nn.Module:
    torch.manual_seed(7)
    return timm.create_model(
        "resnet10t", channels=(8, 16, 32, 64), num_classes=10, in_chans=1
    ).eval()


@pytest.fixture(scope="module")
def model(classifier) -> PurifiedModel:
    """A tiny guided purifier with fixed noise, so two purifications of one input agree."""
    purifier = Purifier(
        make_unet(), guidance_network=make_guidance_network(), t_star=5, sampler="ddpm",
        guidance="adversarial", guidance_scale=50.0, fixed_noise=True, noise_seed=3,
    )
    return PurifiedModel(classifier, purifier, mean=MEAN, std=STD)


def one_hot(y: torch.Tensor) -> np.ndarray:
    """ART's loss_gradient wants one-hot labels when its preprocessing runs in torch."""
    return np.eye(10, dtype=np.float32)[y.numpy()]


def reference_gradient(model: PurifiedModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    nn.functional.cross_entropy(model(x), y).backward()
    return x.grad


def test_loss_gradient_in_full_mode_is_the_purified_models_gradient(art, model, images):
    from art.estimators.classification import PyTorchClassifier

    from purifyguard.adapters.art import PurifierDefence

    # Built by hand, as a user with a bare Purifier would.
    estimator = PyTorchClassifier(
        model=nn.Sequential(model.normalize, model.classifier), loss=nn.CrossEntropyLoss(),
        input_shape=(1, 28, 28), nb_classes=10, clip_values=(0.0, 1.0),
        preprocessing_defences=[PurifierDefence(model.purifier, gradient="full")],
        device_type="cpu",
    )
    y = torch.tensor([0, 3, 5, 9])
    expected = reference_gradient(model.with_purifier(
        model.purifier.with_settings(gradient_mode="full")), images, y)

    gradient = estimator.loss_gradient(images.numpy(), one_hot(y))

    assert np.abs(gradient).max() > 0
    np.testing.assert_allclose(gradient, expected.numpy(), rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        logits = model(images).numpy()
    np.testing.assert_allclose(estimator.predict(images.numpy()), logits, rtol=1e-4, atol=1e-5)


def test_loss_gradient_in_bpda_mode_is_the_identity_backward(art, model, images):
    from purifyguard.adapters.art import art_classifier

    estimator = art_classifier(model, gradient="bpda", device_type="cpu")
    bpda = model.with_purifier(model.purifier.with_settings(gradient_mode="bpda"))
    full = model.with_purifier(model.purifier.with_settings(gradient_mode="full"))
    y = torch.tensor([1, 2, 3, 4])

    gradient = estimator.loss_gradient(images.numpy(), one_hot(y))

    np.testing.assert_allclose(
        gradient, reference_gradient(bpda, images, y).numpy(), rtol=1e-4, atol=1e-7
    )
    assert not np.allclose(gradient, reference_gradient(full, images, y).numpy(), atol=1e-6)
    defence = estimator.preprocessing_defences[0]
    x = images.clone().requires_grad_()
    assert defence.estimate_forward(x) is x  # ART's chained path: the identity as well
    defence.set_params(gradient="full")
    assert defence.purifier.config.gradient_mode == "full"
    np.testing.assert_allclose(
        estimator.loss_gradient(images.numpy(), one_hot(y)),
        reference_gradient(full, images, y).numpy(), rtol=1e-4, atol=1e-7,
    )


def test_art_pgd_runs_on_the_defended_classifier_within_eps(art, model, images):
    from art.attacks.evasion import ProjectedGradientDescent

    from purifyguard.adapters.art import art_classifier

    estimator = art_classifier(model, gradient="full", device_type="cpu")
    attack = ProjectedGradientDescent(
        estimator, norm=np.inf, eps=0.1, eps_step=0.025, max_iter=2, batch_size=4,
        num_random_init=1, verbose=False,
    )
    x = images.numpy()

    x_adv = attack.generate(x, y=np.array([0, 1, 2, 3]))

    assert x_adv.shape == x.shape
    assert np.abs(x_adv - x).max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert np.abs(x_adv - x).max() > 0


def test_defence_purifies_large_inputs_in_batches(art, model, images):
    from purifyguard.adapters.art import PurifierDefence

    defence = PurifierDefence(model.purifier, batch_size=3, device_type="cpu")
    calls = []
    hook = model.purifier.unet.register_forward_hook(
        lambda module, inputs, output: calls.append(inputs[0].shape[0])
    )
    x = torch.cat([images, images[:1]])
    try:
        purified, labels = defence.forward(x, "labels")
    finally:
        hook.remove()

    assert purified.shape == x.shape and labels == "labels"
    assert set(calls) == {3, 2}


def test_defence_rejects_unknown_gradients_and_missing_purifiers(art, model, classifier):
    from purifyguard.adapters.art import PurifierDefence

    with pytest.raises(ValueError, match="gradient must be one of"):
        PurifierDefence(model.purifier, gradient="surrogate")
    with pytest.raises(ValueError, match="no purifier"):
        PurifierDefence(PurifiedModel(classifier, purifier=False, mean=MEAN, std=STD))


def test_without_art_the_adapter_names_the_package_and_nothing_else_imports_art():
    code = (
        "import sys\n"
        "import purifyguard, purifyguard.evaluation, purifyguard.adapters.robustbench\n"
        "assert not [m for m in sys.modules if m == 'art' or m.startswith('art.')]\n"
        "sys.modules['art'] = None\n"
        "try:\n"
        "    import purifyguard.adapters.art\n"
        "except ImportError as error:\n"
        "    assert 'pip install adversarial-robustness-toolbox' in str(error), error\n"
        "else:\n"
        "    raise SystemExit('imported without ART')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# --- issue 24, item 5: ART arrays and arguments that did not fit, refused by name ---------------

def test_a_channels_last_array_is_refused_as_channels_last(art, model, images):
    """Before: "images of 28x1 pixels are too small", from deep inside the purifier."""
    from purifyguard.adapters.art import PurifierDefence, art_classifier

    estimator = art_classifier(model, gradient="bpda", device_type="cpu")
    channels_last = images.permute(0, 2, 3, 1).numpy()  # (4, 28, 28, 1)
    with pytest.raises(ValueError, match=r"shape \(4, 28, 28, 1\), which looks channels-last "
                                         r"\(N, H, W, C\); ART arrays must be channels-first "
                                         r"\(N, C, H, W\)"):
        estimator.predict(channels_last)
    for purifier in (model, model.purifier):
        with pytest.raises(ValueError, match="looks channels-last"):
            PurifierDefence(purifier, device_type="cpu").forward(images.permute(0, 2, 3, 1))


def test_channels_first_false_transposes_as_arts_own_preprocessors_do(art, model, images):
    from purifyguard.adapters.art import PurifierDefence

    first = PurifierDefence(model.purifier, device_type="cpu")
    last = PurifierDefence(model.purifier, channels_first=False, device_type="cpu")
    purified, _ = last.forward(images.permute(0, 2, 3, 1))
    assert purified.shape == (4, 28, 28, 1)
    torch.testing.assert_close(purified.permute(0, 3, 1, 2), first.forward(images)[0])


@pytest.mark.parametrize("kwargs,message", [
    ({"batch_size": "64"}, "batch_size must be an integer >= 1, got '64'"),
    ({"batch_size": 2.5}, "batch_size must be an integer >= 1, got 2.5"),
    ({"batch_size": True}, "batch_size must be an integer >= 1, got True"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"channels_first": "no"}, "channels_first must be True or False"),
])
def test_defence_checks_the_type_of_its_arguments(art, model, kwargs, message):
    from purifyguard.adapters.art import PurifierDefence

    with pytest.raises(ValueError, match=message):
        PurifierDefence(model.purifier, device_type="cpu", **kwargs)
    defence = PurifierDefence(model.purifier, device_type="cpu")
    with pytest.raises(ValueError, match=message):
        defence.set_params(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"input_shape": (3, 28, 28)}, (r"input_shape \(3, 28, 28\) has 3 channels, but the "
                                    r"classifier takes 1-channel images")),
    ({"input_shape": (28, 28, 1)}, r"input_shape \(28, 28, 1\) looks channels-last \(H, W, C\)"),
    ({"input_shape": (1, 28)}, "input_shape must be \\(channels, height, width\\)"),
    ({"input_shape": (1, 4, 4)}, (r"input_shape \(1, 4, 4\) does not fit the model: images "
                                  r"of 4x4 pixels are too small")),
    ({"nb_classes": 7}, "nb_classes=7, but the classifier gives 10 logits per image"),
    ({"channels_first": False}, "channels_first must be True"),
])
def test_art_classifier_checks_input_shape_against_the_model(art, model, kwargs, message):
    from purifyguard.adapters.art import art_classifier

    with pytest.raises(ValueError, match=message):
        art_classifier(model, device_type="cpu", **kwargs)


def test_art_classifier_checks_an_mlps_input_shape(art):
    from purifyguard.adapters.art import art_classifier

    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    model = PurifiedModel(mlp, purifier=False, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"input_shape \(1, 32, 32\) does not fit the model: the "
                                         r"classifier's first layer, nn.Linear\(in_features=784\)"):
        art_classifier(model, input_shape=(1, 32, 32), device_type="cpu")
    assert art_classifier(model, input_shape=(1, 28, 28), device_type="cpu").nb_classes == 10
