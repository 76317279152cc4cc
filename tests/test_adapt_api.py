"""Adapting a purifier from Python (purifyguard.train.adapt.adapt_purifier) to any classifier in
memory: timm, torchvision and a module of one's own, behind the input handling of the deployed
PurifiedModel; the command line running the same code; data, options and input sizes checked
before any work. Tiny networks and a few optimizer steps on 16 images, one thread."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

from purifyguard import PurifiedModel, Purifier
from purifyguard.data import ImageTensorDataset
from purifyguard.guidance_network_format import (
    create_guidance_network,
    load_guidance_network,
    save_guidance_network,
)
from purifyguard.train import adapt, inputs
from purifyguard.train.__main__ import main as train_main
from purifyguard.train.adapt import adapt_purifier, build_parser, scale_learning_rate
from purifyguard.train.options import parse_with_config

ROOT = Path(__file__).parent.parent
RAW_INPUT = {"mean": [0.0], "std": [1.0], "input_size": [1, 28, 28]}
CLASSES = tuple(f"class {k}" for k in range(10))
FEW = {"optimizer_steps": 2, "batch_size": 4, "attack_steps": 1, "progress": False,
       "log_every": 1}


def tiny_purifier(scale: float = 5.0, schedule: str = "constant") -> Purifier:
    """A 1x28x28 purifier with adversarial guidance: a tiny denoiser and a tiny timm network."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=(8, 16, 16),
        layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    network = create_guidance_network("resnet10t", num_classes=10, in_chans=1,
                                      channels=[8, 16, 32, 64], pretrained_cfg_overlay=RAW_INPUT)
    return Purifier(unet, DDPMScheduler(num_train_timesteps=1000), network, t_star=20,
                    sampler="ddim", n_steps=4, guidance="adversarial", guidance_scale=scale,
                    scale_schedule=schedule)


def images(channels: int, side: int, count: int = 16) -> ImageTensorDataset:
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (count, channels, side, side), generator=generator)
    return ImageTensorDataset(pixels.to(torch.uint8), torch.arange(count) % 10, CLASSES)


def tiny_timm_classifier(**overlay) -> nn.Module:
    torch.manual_seed(2)
    return timm.create_model("resnet10t", num_classes=10, in_chans=1, channels=[8, 16, 32, 64],
                             **overlay).eval()


class OwnClassifier(nn.Module):
    """A classifier of one's own: no timm or torchvision config, [0, 1] images as they are."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Linear(8 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: nn.Module) -> list[str]:
    return [name for name, value in module.state_dict().items()
            if not torch.equal(value.cpu(), before[name])]


def assert_adapted(given: Purifier, network_before: dict, adapted: Purifier) -> None:
    """A new purifier with trained guidance; the given one as it was; the defended settings."""
    assert adapted is not given and adapted.guidance_network is not given.guidance_network
    assert any(name.startswith("conv1") for name in changed(network_before,
                                                            adapted.guidance_network))
    assert not changed(network_before, given.guidance_network)
    assert adapted.config.guidance_scale != given.config.guidance_scale
    assert float(given.guidance_scale) == given.config.guidance_scale
    assert (adapted.config.sampler, adapted.config.n_steps) == ("ddim", 4)
    assert "adaptation" in adapted.config.extra


# --- any classifier, in memory -------------------------------------------------------------------


def test_a_timm_classifier_in_memory_and_the_default_scale_rate_moves_a_scale_of_400(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    purifier = tiny_purifier(scale=400.0, schedule="variance")  # the bundled purifier's scale
    before = snapshot(purifier.guidance_network)
    classifier = tiny_timm_classifier(pretrained_cfg_overlay=RAW_INPUT)
    flags = [p.requires_grad for p in classifier.parameters()]

    adapted = adapt_purifier(classifier, purifier, images(1, 28), **{**FEW, "optimizer_steps": 1})

    assert_adapted(purifier, before, adapted)
    # The default rate is 1 % of the starting scale, and Adam's first step is its rate: the
    # scale moves by 4 (the old fixed 0.01, with Adam's epsilon above the scale's 1e-9 gradient,
    # moved it by about 0.001).
    assert scale_learning_rate(None, 400.0) == 4.0 and scale_learning_rate(None, 0.5) == 0.01
    assert abs(adapted.config.guidance_scale - 400.0) == pytest.approx(4.0, abs=0.05)
    assert adapted.config.extra["adaptation"]["scale learning rate"] == 4.0
    assert [p.requires_grad for p in classifier.parameters()] == flags  # given back as it was
    logits = PurifiedModel(classifier, adapted)(images(1, 28, 4).tensors()[0])
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    assert not list(tmp_path.iterdir())  # without output_dir nothing is written


def test_a_torchvision_resnet18_through_its_deployed_purified_model(tmp_path):
    """RGB 32x32 images in front of a grey 28x28 purifier: the PurifiedModel converts channels
    and resizes, with the classifier's own mean and std, as deployed."""
    purifier = tiny_purifier()
    before = snapshot(purifier.guidance_network)
    torch.manual_seed(4)
    resnet = torchvision.models.resnet18(num_classes=10)
    handling = {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616),
                "input_size": 32}
    deployed = PurifiedModel(resnet, purifier, **handling)

    adapted = adapt_purifier(deployed, data=images(3, 32), output_dir=tmp_path / "run", **FEW)

    assert_adapted(purifier, before, adapted)
    assert deployed.purifier is purifier  # the given pipeline keeps its purifier
    saved = Purifier.from_pretrained(tmp_path / "run" / "final")
    assert saved.config.guidance_scale == adapted.config.guidance_scale
    assert not changed(snapshot(adapted.guidance_network), saved.guidance_network)
    record = saved.config.extra["adaptation"]
    assert "explicit mean/std" in record["classifier input"] and "input size 32" in (
        record["classifier input"])
    assert record["command"].startswith("adapt_purifier(torchvision ResNet")
    logits = PurifiedModel(resnet, adapted, **handling)(images(3, 32, 2).tensors()[0])
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_a_classifier_of_ones_own(tmp_path):
    purifier = tiny_purifier()
    before = snapshot(purifier.guidance_network)
    classifier = OwnClassifier()
    classifier.head.requires_grad_(False)  # used frozen, and given back with these flags

    adapted = adapt_purifier(classifier, purifier, images(1, 28), **FEW)

    assert_adapted(purifier, before, adapted)
    assert [p.requires_grad for p in classifier.parameters()] == [True, True, False, False]
    logits = PurifiedModel(classifier, adapted)(images(1, 28, 2).tensors()[0])
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


# --- the command line runs the same code ---------------------------------------------------------


def test_the_command_line_and_the_function_agree(tmp_path, fashion_mnist_here):
    tiny_purifier().save_pretrained(tmp_path / "purifier")
    save_guidance_network(tiny_timm_classifier(pretrained_cfg_overlay=RAW_INPUT),
                          tmp_path / "classifier")
    adapt.main(["--purifier", str(tmp_path / "purifier"), "--classifier",
                str(tmp_path / "classifier"), "--output-dir", str(tmp_path / "cli"),
                "--optimizer-steps", "2", "--sampler-steps", "2", "--batch-size", "4",
                "--attack-steps", "1", "--no-progress", "--log-every", "1"])
    adapted = adapt_purifier(load_guidance_network(tmp_path / "classifier"),
                             str(tmp_path / "purifier"), "fashion-mnist",
                             output_dir=tmp_path / "python", sampler_steps=2, **FEW)

    cli = Purifier.from_pretrained(tmp_path / "cli" / "final")
    assert cli.config.guidance_scale == adapted.config.guidance_scale != 5.0
    assert not changed(snapshot(cli.guidance_network), adapted.guidance_network)
    # The same options under the same keys; only how the classifier was named differs.
    saved = [json.loads((tmp_path / run / "args.json").read_text()) for run in ("cli", "python")]
    for key in ("steps", "train_steps", "batch_size", "attack_steps", "scale_lr", "seed", "data"):
        assert saved[0][key] == saved[1][key], key
    assert (saved[0]["steps"], saved[0]["train_steps"]) == (2, 2)


# --- checked before any work ---------------------------------------------------------------------


@pytest.fixture
def no_fashion_mnist(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("PURIFYGUARD_FASHION_MNIST", raising=False)
    monkeypatch.setattr("purifyguard.data._DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    return tmp_path


def test_missing_data_is_one_clear_error_before_any_work(no_fashion_mnist, capsys):
    out = no_fashion_mnist / "run"
    # The purifier and classifier do not exist either: the data is checked first.
    with pytest.raises(SystemExit) as stopped:
        train_main(["adapt", "--purifier", "no-such", "--classifier", "no-such",
                    "--output-dir", str(out)])
    assert stopped.value.code == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("purifyguard train adapt: error: ")
    for needed in ("Fashion-MNIST not found", "--data-root", "dataset-fashion-mnist",
                   "PURIFYGUARD_FASHION_MNIST"):
        assert needed in error, needed
    assert not out.exists()

    empty = no_fashion_mnist / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        train_main(["adapt", "--purifier", "p", "--classifier", "c", "--data-root", str(empty)])
    assert f"--data-root {empty}" in capsys.readouterr().err

    with pytest.raises(ValueError, match="data_root=<folder>"):
        adapt_purifier(OwnClassifier(), "no-such", "fashion-mnist")


def test_the_example_says_where_the_data_is_missing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "fine_tune.py"), "--data-root", str(empty),
         "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "--data-root" in result.stderr, result.stderr
    assert "dataset-fashion-mnist" in result.stderr
    assert not (tmp_path / "out" / "classifier").exists()


def test_a_recorded_input_size_other_than_the_data_is_refused(tmp_path):
    """timm's save_for_hf records timm's ImageNet input size (176 for resnet10t): reloaded, the
    classifier would be deployed at that size, not at the 28x28 the data has."""
    classifier = tiny_timm_classifier()
    timm.models.save_for_hf(classifier, tmp_path / "hf", safe_serialization=True,
                            model_args={"in_chans": 1, "channels": [8, 16, 32, 64]})
    reloaded = load_guidance_network(tmp_path / "hf")
    data = images(1, 28)

    with pytest.raises(ValueError, match=r"176x176.*28x28.*input_size=28") as refused:
        adapt_purifier(reloaded, tiny_purifier(), data, output_dir=tmp_path / "run", **FEW)
    assert "save_for_hf" in str(refused.value)
    assert not (tmp_path / "run").exists()

    argv = ["--purifier", "p", "--classifier", str(tmp_path / "hf")]
    args = parse_with_config(build_parser(), argv)
    pipeline = inputs.classifier_from_options(args, "classifier", data)
    option = inputs.flags_of("classifier")
    with pytest.raises(ValueError, match="--classifier-input-size 28"):
        inputs.check_pipeline(pipeline, data, option, explicit_size=False)
    args = parse_with_config(build_parser(), [*argv, "--classifier-input-size", "28"])
    pipeline = inputs.classifier_from_options(args, "classifier", data)
    inputs.check_pipeline(pipeline, data, option, explicit_size=True)
    assert pipeline.input_size == 28
    args = parse_with_config(build_parser(), [*argv, "--classifier-input-size", "56"])
    pipeline = inputs.classifier_from_options(args, "classifier", data)
    with pytest.warns(UserWarning, match=r"56x56 images \(input_size 56, from the value given"):
        inputs.check_pipeline(pipeline, data, option, explicit_size=True)


def test_a_classifier_that_does_not_fit_the_data_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="takes 1-channel images, the training images have 3"):
        adapt_purifier(OwnClassifier(), tiny_purifier(), images(3, 28),
                       output_dir=tmp_path / "run", **FEW)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options, named", [
    ({"optimizer_steps": 0}, "optimizer_steps=0"),
    ({"clean_weight": 2}, "clean_weight=2"),
    ({"log_evry": 1}, "unknown options ['log_evry']"),
    ({"steps": 3}, "name the same option"),
    ({"classifier_mean": [0.5]}, "as the argument ['mean']"),
    ({"resume": True}, "resume=True needs the output_dir"),
])
def test_python_options_are_checked_like_flags(options, named, tmp_path):
    with pytest.raises(ValueError) as refused:
        adapt_purifier(OwnClassifier(), tiny_purifier(), images(1, 28), **{**FEW, **options})
    assert named in str(refused.value)


def test_the_function_defaults_are_the_command_line_defaults():
    parser = build_parser()
    dests = {"optimizer_steps": "steps", "sampler_steps": "train_steps"}
    keywords = ("optimizer_steps", "sampler_steps", "batch_size", "lr", "scale_lr", "eps",
                "attack_steps", "clean_weight", "seed")
    for name in keywords:
        default = inspect.signature(adapt_purifier).parameters[name].default
        assert default == parser.get_default(dests.get(name, name)), name


# --- option names that say what they count -----------------------------------------------------


def test_old_option_names_still_work_and_the_misleading_one_says_what_it_counts(capsys):
    required = ["--purifier", "p", "--classifier", "c"]
    args = parse_with_config(build_parser(), [*required, "--train-steps", "3", "--steps", "5"])
    assert (args.train_steps, args.steps) == (3, 5)
    note = capsys.readouterr().err
    assert "--train-steps is the old name of --sampler-steps" in note
    assert "not the length of the run (that is --optimizer-steps)" in note
    args = parse_with_config(build_parser(), [*required, "--sampler-steps", "4",
                                              "--optimizer-steps", "6"])
    assert (args.train_steps, args.steps) == (4, 6) and not capsys.readouterr().err
    help_text = " ".join(build_parser().format_help().split())
    assert "not the length of the run, which is --optimizer-steps" in help_text


# --- resumable as the command is -----------------------------------------------------------------


def test_a_python_run_with_an_output_dir_resumes_like_the_command(tmp_path):
    from purifyguard.train.run import read_metrics

    data, purifier, classifier = images(1, 28), tiny_purifier(), OwnClassifier()
    straight = adapt_purifier(classifier, purifier, data, output_dir=tmp_path / "straight",
                              **{**FEW, "optimizer_steps": 3})
    adapt_purifier(classifier, purifier, data, output_dir=tmp_path / "cut", **FEW)
    resumed = adapt_purifier(classifier, purifier, data, output_dir=tmp_path / "cut",
                             resume=True, **{**FEW, "optimizer_steps": 3})

    assert [line["step"] for line in read_metrics(tmp_path / "cut")] == [1, 2, 3]
    assert resumed.config.guidance_scale == straight.config.guidance_scale
    assert not changed(snapshot(straight.guidance_network), resumed.guidance_network)
    with pytest.raises(ValueError, match="--lr"):  # a resumed run is the same run
        adapt_purifier(classifier, purifier, data, output_dir=tmp_path / "cut", resume=True,
                       lr=1e-3, **{**FEW, "optimizer_steps": 4})


# --- the guidance routine's teacher: any classifier, torchvision too -----------------------------


def test_the_guidance_routine_takes_a_torchvision_teacher(tmp_path, monkeypatch):
    from PIL import Image
    from safetensors.torch import save_file

    from purifyguard.train import guidance

    for label in ("cat", "dog"):
        folder = tmp_path / "data" / label
        folder.mkdir(parents=True)
        for k in range(4):
            pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{k}.png")
    torch.manual_seed(5)
    save_file(torchvision.models.resnet18(num_classes=2).state_dict(),
              tmp_path / "teacher.safetensors")
    seen = []
    forward = PurifiedModel.forward

    def spy(self, x):
        seen.append((type(self.classifier).__module__, self.normalize.extra_repr()))
        return forward(self, x)

    monkeypatch.setattr(PurifiedModel, "forward", spy)
    guidance.main([
        "--data", "imagefolder", "--data-root", str(tmp_path / "data"), "--in-chans", "3",
        "--num-classes", "2", "--model", "resnet10t", "--model-kwargs",
        '{"channels": [8, 16, 32, 64]}', "--beta", "0", "--pgd-steps", "0",
        "--optimizer-steps", "2", "--batch-size", "4", "--eval-images", "4", "--no-progress",
        "--output-dir", str(tmp_path / "run"), "--teacher", "torchvision:resnet18",
        "--teacher-checkpoint", str(tmp_path / "teacher.safetensors"),
        "--teacher-mean", "0.5,0.5,0.5", "--teacher-std", "0.25,0.25,0.25",
        "--teacher-input-size", "32",
    ])

    assert seen and {module.split(".")[0] for module, _ in seen} == {"torchvision"}
    assert seen[0][1] == "mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]"
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
