"""The bundled Fashion-MNIST weights (trained on the real data set) and the demo that uses them."""

from __future__ import annotations

import logging

import torch
import torchattacks

from purifyguard import PurifiedModel, bundled_classifier, bundled_test_images
from purifyguard.cli import main
from purifyguard.registry import load_purifier


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def test_the_default_purifier_of_the_bundled_classifier_keeps_it_accurate(caplog):
    images, labels, _ = bundled_test_images()
    images, labels = images[:64], labels[:64]
    classifier = bundled_classifier()
    with caplog.at_level(logging.INFO, logger="purifyguard"):
        model = PurifiedModel(classifier)
    assert "fashion-mnist-agdm" in caplog.text
    assert model.purifier.config.guidance == "adversarial"
    torch.manual_seed(0)
    # Measured at write time on these 64 images: about 0.92 bare and 0.85 purified.
    assert accuracy(model.with_purifier(None), images, labels) > 0.85
    assert accuracy(model, images, labels) > 0.75


def test_purification_undoes_adversarial_examples_crafted_on_the_classifier():
    """A transfer attack (not adaptive): PGD on the bare classifier breaks it, the purifier
    recovers most of the images. This checks the trained weights, not robustness."""
    images, labels, _ = bundled_test_images()
    images, labels = images[:64], labels[:64]
    model = PurifiedModel(bundled_classifier(), "fashion-mnist-ddpm")
    bare = model.with_purifier(None)
    torch.manual_seed(0)
    adversarial = torchattacks.PGD(bare, eps=0.1, alpha=0.025, steps=10)(images, labels)
    assert accuracy(bare, adversarial, labels) < 0.2
    assert accuracy(model, adversarial, labels) > 0.5


def test_the_demo_prints_a_labelled_table_and_writes_the_picture(tmp_path, capsys):
    main(["demo", "--n", "32", "--steps", "5", "--adaptive-n", "4", "--adaptive-steps", "1",
          "--runs", "1", "--output-dir", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out
    assert "white-box on the classifier (no defence to attack)" in printed
    assert "transfer, not adaptive" in printed
    assert "full gradient through purifier + classifier (reduced from 200 x 20)" in printed
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    for part in ("undefended", "transfer", "adaptive"):
        assert (tmp_path / part / "report.json").exists()


def test_the_bundled_purifiers_share_one_denoiser_and_differ_only_in_guidance():
    """DiffPure-style and ours are the same denoiser, t* and steps; only the guidance differs, so
    the benchmark's comparison of the two isolates the guidance."""
    ours, unguided = load_purifier("fashion-mnist-agdm"), load_purifier("fashion-mnist-ddpm")
    for name, weight in ours.unet.state_dict().items():
        assert torch.equal(weight, unguided.unet.state_dict()[name]), name
    same = ("t_star", "sampler", "n_steps", "eta", "resolution", "channels", "training_data")
    assert all(getattr(ours.config, key) == getattr(unguided.config, key) for key in same)
    assert ours.guidance_network is not None and unguided.guidance_network is None
