"""PurifiedModel: one nn.Module from [0, 1] images to logits, right for any classifier."""

from __future__ import annotations

import pytest
import timm
import timm.data
import torch
import torchattacks
import torchvision
from diffusers import UNet2DModel

import purifyguard
from purifyguard import PurifiedModel, Purifier, registry


def small_cnn(channels: int = 1, num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """A classifier of unknown family (no normalisation of its own), any input size."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(), torch.nn.Linear(8 * 16, num_classes),
    ).eval()


def shapes_seen_by(module: torch.nn.Module, run) -> list[tuple[int, ...]]:
    shapes = []
    hook = module.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    try:
        run()
    finally:
        hook.remove()
    return shapes


# ---- the attack contract -------------------------------------------------------------------


def test_torchattacks_pgd_runs_on_a_purified_model_within_eps(make_purifier, images):
    model = PurifiedModel(small_cnn(), make_purifier(t_star=3, guidance="pixel", guidance_scale=1.0))
    labels = torch.tensor([0, 1, 2, 3])
    eps = 0.1
    attack = torchattacks.PGD(model, eps=eps, alpha=0.04, steps=3, random_start=True)
    adversarial = attack(images, labels)
    assert adversarial.shape == images.shape
    assert (adversarial - images).abs().max() <= eps + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert (adversarial - images).abs().max() > eps / 2  # the attack moved the images
    assert not model.training  # torchattacks leaves the model in the mode it found it


# ---- normalisation read off the classifier -------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("resnet10t", {"channels": (8, 16, 32, 64)}),  # ImageNet statistics
        ("vit_tiny_patch16_224", {"depth": 1, "img_size": 32, "patch_size": 8}),  # mean = std = 0.5
    ],
)
def test_timm_classifier_gets_its_own_normalisation(name, kwargs):
    classifier = timm.create_model(name, num_classes=10, **kwargs).eval()
    expected = timm.data.resolve_model_data_config(classifier)
    model = PurifiedModel(classifier, purifier=False)
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor(expected["mean"]))
    torch.testing.assert_close(model.normalize.std.flatten(), torch.tensor(expected["std"]))
    assert "timm" in model.normalization_source
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(expected["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(expected["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), classifier((x - mean) / std))


def test_torchvision_classifier_without_weights_mean_or_std_is_refused():
    """torchvision models do not record their weights: nothing is guessed (issue 24 removed the
    silent ImageNet statistics at 224), the error says what to pass."""
    classifier = torchvision.models.resnet18(num_classes=10).eval()
    with pytest.raises(ValueError, match=r"weights=.*mean=.*std=.*input_size="):
        PurifiedModel(classifier, purifier=False)
    model = PurifiedModel(classifier, purifier=False, mean=(0.5,), std=(0.5,), input_size=32)
    assert (model.normalization_source, model.input_size) == ("explicit mean/std", 32)


def test_torchvision_classifier_gets_the_normalisation_of_its_weights():
    classifier = torchvision.models.resnet18(num_classes=10).eval()
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    transforms = weights.transforms()
    model = PurifiedModel(classifier, purifier=False, weights=weights)
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor(transforms.mean))
    torch.testing.assert_close(model.normalize.std.flatten(), torch.tensor(transforms.std))
    assert model.normalization_source == f"weights {weights}"
    assert model.input_size == 224
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(transforms.mean).view(1, 3, 1, 1)
    std = torch.tensor(transforms.std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), classifier((x - mean) / std))


def test_grey_torchvision_classifier_gets_grey_statistics():
    """A torchvision ResNet with a 1-channel stem (the usual Fashion-MNIST recipe): the RGB
    statistics of its weights become their average, instead of broadcasting a grey batch to 3
    channels and failing in the first convolution."""
    classifier = torchvision.models.resnet18(num_classes=10).eval()
    classifier.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    transforms = weights.transforms()
    model = PurifiedModel(classifier, purifier=False, weights=weights)
    mean, std = sum(transforms.mean) / 3, sum(transforms.std) / 3
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor([mean]))
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), classifier((x - mean) / std))


def test_explicit_mean_and_std_override_the_model_config():
    classifier = timm.create_model("resnet10t", channels=(8, 16, 32, 64), num_classes=10).eval()
    model = PurifiedModel(classifier, purifier=False, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    assert model.normalization_source == "explicit mean/std"
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor((0.1, 0.2, 0.3)).view(1, 3, 1, 1)
    std = torch.tensor((0.4, 0.5, 0.6)).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), classifier((x - mean) / std))


def test_a_single_mean_and_std_apply_to_every_channel():
    model = PurifiedModel(small_cnn(3), purifier=False, mean=(0.5,), std=(0.25,))
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))


def test_weights_enum_overrides_the_model_config():
    classifier = torchvision.models.resnet18(num_classes=10).eval()
    weights = torchvision.models.EfficientNet_B3_Weights.DEFAULT  # crop 300, not 224
    transforms = weights.transforms()
    model = PurifiedModel(classifier, purifier=False, weights=weights)
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor(transforms.mean))
    assert "weights" in model.normalization_source
    assert model.input_size == transforms.crop_size[0] == 300


def test_unknown_model_family_is_not_normalised():
    classifier = small_cnn()
    model = PurifiedModel(classifier, purifier=False)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), classifier(x))


# ---- channels and resolution between classifier and purifier -------------------------------


def test_rgb_classifier_with_a_grey_purifier_at_another_resolution(make_purifier):
    purifier = make_purifier(t_star=3)
    model = PurifiedModel(small_cnn(3), purifier)
    x = torch.rand(5, 3, 32, 32)
    seen = shapes_seen_by(purifier.unet, lambda: model(x))
    assert set(seen) == {(5, 1, 28, 28)}
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()
    purified = model.purify(x, seed=0)
    assert purified.shape == x.shape
    assert purified.min() >= 0 and purified.max() <= 1
    # grey -> RGB repeats the channel: the purified image is grey.
    torch.testing.assert_close(purified[:, 0], purified[:, 1])


def test_grey_classifier_with_an_rgb_purifier():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )
    purifier = Purifier(unet, t_star=2)
    model = PurifiedModel(small_cnn(1), purifier)
    x = torch.rand(3, 1, 28, 28)
    seen = shapes_seen_by(unet, lambda: model(x))
    assert set(seen) == {(3, 3, 16, 16)}
    assert model(x).shape == (3, 10)
    assert model.purify(x).shape == x.shape


def test_gradients_flow_through_conversion_and_resizing(make_purifier):
    model = PurifiedModel(small_cnn(3), make_purifier(t_star=2))
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---- sampling, the bare classifier ---------------------------------------------------------


def test_n_samples_averages_the_logits_of_independent_purifications(make_purifier, images):
    purifier = make_purifier(t_star=3, fixed_noise=True, noise_seed=4)
    classifier = small_cnn()
    model = PurifiedModel(classifier, purifier, n_samples=3)
    with torch.no_grad():
        logits = model(images)
        assert logits.shape == (4, 10)
        torch.testing.assert_close(model(images), logits)  # fixed noise: deterministic
        # The three copies are purified in one batch, each with its own noise.
        copies = model.purify(images.repeat(3, 1, 1, 1), seed=4).view(3, *images.shape)
        assert not torch.allclose(copies[0], copies[1])
        assert not torch.allclose(copies[1], copies[2])
        per_copy = torch.stack([model.classify(copy) for copy in copies])
        torch.testing.assert_close(logits, per_copy.mean(0))
        single = PurifiedModel(classifier, purifier, n_samples=1)(images)
        assert not torch.allclose(logits, single)


def test_n_samples_keeps_each_image_with_its_own_logits(make_purifier, images):
    """With the identity purifier (t* = 0) averaging changes nothing: a reshape that mixed
    images across the batch would."""
    classifier = small_cnn()
    model = PurifiedModel(classifier, make_purifier(t_star=0), n_samples=3)
    with torch.no_grad():
        torch.testing.assert_close(model(images), classifier(images))


def test_purifier_false_gives_the_bare_classifier(images):
    classifier = small_cnn()
    model = PurifiedModel(classifier, purifier=False)
    assert not model.defended
    with torch.no_grad():
        torch.testing.assert_close(model(images), classifier(images))
    assert PurifiedModel.undefended(classifier).purifier is None


# ---- default purifier selection ------------------------------------------------------------


@pytest.fixture
def empty_registry(monkeypatch):
    """A fresh registry for the test; the global one comes back afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", {})


def test_default_purifier_is_the_registered_match(empty_registry, make_purifier):
    tiny = make_purifier(t_star=2)

    @purifyguard.register_purifier(
        "tiny-grey-28", channels=1, resolution=28, description="test", default=True
    )
    def load_tiny() -> Purifier:
        return tiny

    @purifyguard.register_purifier(
        "tiny-rgb-32", channels=3, resolution=32, description="not a default", default=False
    )
    def load_other() -> Purifier:
        raise AssertionError("a non-default purifier was loaded")

    assert purifyguard.list_purifiers() == ["tiny-grey-28", "tiny-rgb-32"]
    model = PurifiedModel(small_cnn(1))
    assert model.purifier is tiny
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert PurifiedModel(small_cnn(1), "tiny-grey-28").purifier is tiny


def test_no_default_purifier_lists_the_registered_names(empty_registry, make_purifier):
    purifyguard.register_purifier(
        "tiny-grey-28", channels=1, resolution=28, description="test", default=True
    )(lambda: make_purifier())
    with pytest.raises(ValueError, match="tiny-grey-28"):
        PurifiedModel(small_cnn(3))
    with pytest.raises(ValueError, match="tiny-grey-28"):
        PurifiedModel(small_cnn(1), "no-such-purifier")


def test_the_global_registry_is_untouched_by_these_tests():
    assert "tiny-grey-28" not in purifyguard.list_purifiers()
