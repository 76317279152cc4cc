"""cifar10-agdm: published weights loaded by the code online users run (the Hub cache and
robustbench's loader), here offline on random weights of the same architectures; the error
that says what to pre-fetch; CIFAR-10 folders; and the CIFAR-10 benchmark in its tiny mode."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image
from torch import nn

from purifyguard import PurifiedModel, load_purifier
from purifyguard import cifar10 as recipes
from purifyguard.cifar10 import DENOISER, RECIPES, load_cifar10_purifier
from purifyguard.data import (
    CIFAR10_CLASSES,
    cifar10_label,
    cifar10_training_split,
    load_dataset,
    validation_split,
)
from purifyguard.evaluation.example_selection import fingerprint, select_examples
from purifyguard.registry import default_purifier_name, registered

ROOT = Path(__file__).parent.parent
# google/ddpm-cifar10-32's config.json on the Hub (35.7M parameters).
DDPM_CIFAR10_32 = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-6, "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "mid_block_scale_factor": 1,
    "center_input_sample": False, "time_embedding_type": "positional",
}
# Its legacy scheduler_config.json.
LEGACY_SCHEDULER = {
    "_class_name": "GaussianDDPMScheduler", "_diffusers_version": "0.0.4", "beta_start": 0.0001,
    "beta_end": 0.02, "beta_schedule": "linear", "timesteps": 1000, "trained_betas": None,
    "variance_type": "fixed_large", "clip_sample": True,
}
GUIDANCE = RECIPES["cifar10-agdm"].guidance_network


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def robustbench_zoo():
    from purifyguard.adapters.robustbench import robustbench_modules

    try:
        return robustbench_modules()
    except ImportError as error:
        pytest.skip(f"robustbench is needed for its model zoo: {error}")


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """No network: an empty Hub cache (HF_HUB_OFFLINE=1) and robustbench model folder, under
    tmp_path; robustbench's downloader fails as it would without a connection."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("PURIFYGUARD_CACHE", str(tmp_path / "purifyguard"))
    rb = robustbench_zoo()

    def no_network(*args, **kwargs):
        raise ConnectionError("no network in the tests")

    monkeypatch.setattr(rb.utils, "download_gdrive_new", no_network)
    return tmp_path


def publish_denoiser(hub_cache: Path, staging: Path) -> UNet2DModel:
    """Random weights in google/ddpm-cifar10-32's flat Hub layout, as the Hub cache holds it."""
    torch.manual_seed(0)
    unet = UNet2DModel(**DDPM_CIFAR10_32)
    unet.save_pretrained(staging, safe_serialization=True)
    (staging / "scheduler_config.json").write_text(json.dumps(LEGACY_SCHEDULER))
    repo = hub_cache / ("models--" + DENOISER.replace("/", "--"))
    shutil.copytree(staging, repo / "snapshots" / ("e" * 40))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("e" * 40)
    return unet


def publish_guidance_network(model_dir: Path) -> nn.Module:
    """Random weights of robustbench's own Zhang2019Theoretically architecture (WideResNet-34-10)
    as a state dict where its loader looks: <model_dir>/cifar10/Linf/<name>.pt."""
    rb = robustbench_zoo()
    entry = rb.model_dicts[rb.BenchmarkDataset("cifar10")][rb.ThreatModel("Linf")]
    torch.manual_seed(1)
    network = entry["Zhang2019Theoretically"]["model"]()
    path = model_dir / "cifar10" / "Linf" / "Zhang2019Theoretically.pt"
    path.parent.mkdir(parents=True)
    torch.save(network.state_dict(), path)
    return network


def small_classifier() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10)).eval()


@pytest.mark.slow
def test_cifar10_agdm_loads_published_weights_offline_and_purifies_with_full_gradients(offline):
    unet = publish_denoiser(offline / "hub", offline / "staging")
    network = publish_guidance_network(offline / "purifyguard" / "robustbench")

    model = PurifiedModel(small_classifier(), "cifar10-agdm", mean=(0.0,) * 3, std=(1.0,) * 3)

    purifier = model.purifier
    config = purifier.config
    assert (config.t_star, config.sampler, config.n_steps) == (100, "ddim", 10)
    assert (config.guidance, config.distance, config.guidance_scale) == (
        "adversarial", "cosine", RECIPES["cifar10-agdm"].guidance_scale)
    assert (purifier.channels, purifier.resolution) == (3, 32)
    assert config.extra["diffusion_model"] == DENOISER
    assert config.extra["guidance_network"] == GUIDANCE
    assert torch.equal(purifier.unet.state_dict()["conv_in.weight"], unet.conv_in.weight)
    loaded = purifier.guidance_network.state_dict()
    assert type(purifier.guidance_network).__name__ == "WideResNet"
    assert all(torch.equal(loaded[k], v) for k, v in network.state_dict().items())

    # Two DDIM steps instead of ten keep the double backward affordable on a CPU.
    model = model.with_purifier(purifier.with_settings(n_steps=2))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images.requires_grad_(True)
    logits = model(images)
    assert logits.shape == (2, 10)
    logits.logsumexp(1).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_without_the_weights_the_error_names_both_downloads_and_the_prefetch(offline):
    with pytest.raises(FileNotFoundError) as caught:
        load_purifier("cifar10-agdm")
    message = str(caught.value)
    assert "hf download google/ddpm-cifar10-32" in message
    assert "diffusion_pytorch_model.safetensors" in message
    assert "robustbench:cifar10/Linf/Zhang2019Theoretically" in message
    expected = offline / "purifyguard" / "robustbench" / "cifar10" / "Linf"
    assert str(expected / "Zhang2019Theoretically.pt") in message
    assert "load_robustbench_model('robustbench:cifar10/Linf/Zhang2019Theoretically')" in message
    assert message.count("missing") >= 2


def test_a_missing_denoiser_alone_is_named_as_missing(offline, monkeypatch):
    """The guidance network is here (a stand-in: building it is not what is tested)."""
    monkeypatch.setattr(recipes, "_guidance_network", lambda recipe, model_dir: small_classifier())
    with pytest.raises(FileNotFoundError) as caught:
        load_cifar10_purifier("cifar10-agdm")
    message = str(caught.value)
    assert "google/ddpm-cifar10-32 from the Hugging Face Hub" in message
    assert "hf download google/ddpm-cifar10-32" in message
    assert str(offline / "hub") in message


def test_the_cifar10_recipes_are_registered_but_not_the_default():
    for name, t_star in (("cifar10-agdm", 100), ("cifar10-agdm-l2", 75)):
        entry = registered(name)
        assert (entry.channels, entry.resolution, entry.default) == (3, 32, False)
        settings = RECIPES[name].settings()
        assert settings["t_star"] == t_star and settings["extra"]["guidance_scale_status"] == (
            "not yet swept")
    assert default_purifier_name(3, 32) == "cifar10-ddpm"  # needs no robustbench


@pytest.mark.parametrize(("arguments", "message"), [
    ({"name": "cifar10-agdm-linf"}, "name must be one of"),
    ({"model_dir": 3}, "model_dir must be a folder path"),
])
def test_load_cifar10_purifier_checks_its_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        load_cifar10_purifier(**arguments)


# --- CIFAR-10 folders ----------------------------------------------------------------------------


def class_tree(root: Path, per_class: int = 2, suffix: str = ".png", split: str = "test",
               blue: int = 0) -> Path:
    """CIFAR-10's ten class folders under root/<split>/ (root itself for split ""), images
    coloured by class and index; `blue` tells the images of two splits apart."""
    for label, name in enumerate(CIFAR10_CLASSES):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), (label * 25, i * 100 % 256, blue)).save(
                folder / f"{i:04d}{suffix}")
    return root


def test_a_tree_of_class_folders_reads_as_cifar10_with_classes_interleaved(tmp_path):
    root = class_tree(tmp_path / "tree")
    test = load_dataset("cifar10", root, train=False, download=False)

    assert len(test) == 20
    assert [test[i][1] for i in range(12)] == [*range(10), 0, 1]
    image, label = test[3]
    assert image.shape == (3, 32, 32) and label == 3
    assert abs(float(image[0].mean()) - 75 / 255) < 1e-6
    assert cifar10_label(root) == "cifar10-imagefolder"
    assert cifar10_label(class_tree(tmp_path / "jpeg", suffix=".jpg")) == "cifar10-jpeg"
    assert cifar10_label(tmp_path / "elsewhere") == "cifar10"


def test_a_tree_with_other_classes_is_refused(tmp_path):
    root = class_tree(tmp_path / "tree", per_class=1)
    (root / "test" / "zebra").mkdir()
    with pytest.raises(ValueError, match="exactly CIFAR-10's ten class folders"):
        load_dataset("cifar10", root, train=False, download=False)


def test_the_training_split_is_read_only_from_a_copy_that_keeps_it_apart(tmp_path):
    split = class_tree(class_tree(tmp_path / "split"), per_class=3, split="train", blue=200)
    training = cifar10_training_split(split, download=False)
    assert len(training) == 30 and all(training[i][0][2].mean() > 0.7 for i in range(30))

    flat = class_tree(tmp_path / "flat", split="")
    for root in (flat, split / "test"):  # either split's folder alone cannot say which it is
        with pytest.raises(ValueError, match="no train/ and test/ split"):
            cifar10_training_split(root, download=False)


def cifar10_jpeg(tmp_path: Path) -> Path:
    """The cifar10-jpeg copy (PURIFYGUARD_CIFAR10_JPEG: its .tar.gz or extracted folder)."""
    source = os.environ.get("PURIFYGUARD_CIFAR10_JPEG")
    if not source or not Path(source).exists():
        pytest.skip("set PURIFYGUARD_CIFAR10_JPEG to the cifar10-jpeg copy (.tar.gz or folder)")
    if Path(source).is_dir():
        return Path(source)
    with tarfile.open(source) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith("test/")]
        archive.extractall(tmp_path / "cifar10-jpeg", members=members, filter="data")
    return tmp_path / "cifar10-jpeg"


def test_the_cifar10_jpeg_copy_reads_as_cifar10_jpeg(tmp_path):
    root = cifar10_jpeg(tmp_path)
    test = load_dataset("cifar10", root, train=False, download=False)
    assert len(test) == 10_000 and cifar10_label(root) == "cifar10-jpeg"
    assert [test[i][1] for i in range(10)] == list(range(10))


# --- the benchmark ---------------------------------------------------------------------------------


def benchmark_module():
    """benchmarks/cifar10.py, under a name no other module has."""
    name = "cifar10_benchmark"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "cifar10.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_the_tiny_benchmark_follows_the_protocol_and_writes_its_page_where_asked(tmp_path,
                                                                                  capsys):
    """apgd-eot primary with pgd-eot beside it, R as set, the headline leading the page, and
    ours at the scale the held-out sweep chose."""
    benchmark = benchmark_module()
    page = tmp_path / "page.md"
    benchmark.main(["--tiny", "--n", "2", "--runs", "3", "--guidance-scale", "100", "3200",
                    "--output-dir", str(tmp_path / "run"), "--docs", str(page)])

    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "benchmark.json").read_text())
    records = results["report"]["records"]
    assert {record["model"] for record in records} == {
        "undefended", "trades", "diffpure", "gdmp", "ours"}
    assert [r["attack"]["name"] for r in records if r["model"] == "ours"] == [
        "apgd-eot", "pgd-eot", "autoattack-rand", "bpda-eot"]
    assert results["primary"] == "apgd-eot" and results["report"]["settings"]["runs"] == 3
    assert results["budget"] == "tiny" and results["data"] == "random-images"

    sweep = results["scale_sweep"]
    assert [row["scale"] for row in sweep["rows"]] == [100, 3200]
    assert sweep["attack"]["name"] == "apgd-eot" and sweep["runs"] == 3
    assert sweep["data_fingerprint"] != results["report"]["settings"]["data_fingerprint"]
    assert (tmp_path / "run" / "scale-sweep" / "sweep.json").exists()
    chosen = sweep["chosen"]
    assert results["guidance_scale"] == {"value": chosen, "source": "sweep"}
    assert results["settings"]["guidance_scale"] == chosen
    assert results["descriptions"]["ours"].startswith(
        f"adversarial guidance in the TRADES network's features (cifar10-agdm), scale {chosen:g}")

    assert set(results["headline"]) == set(results["costs"])
    assert {result["runs"] for result in results["headline"].values()} == {3}
    assert [item["second"] for item in results["headline_paired"]] == [
        "undefended", "trades", "diffpure", "gdmp"]
    text = page.read_text()
    assert "Tiny check run" in text and "# CIFAR-10 benchmark" in printed
    assert "R = 3 purifications per verdict" in text and "the primary attack apgd-eot" in text
    assert (text.index("## Results") < text.index("### Headline")
            < text.index("| defence | NFE |") < text.index("## Guidance scale, chosen on held-out"))
    assert f"Guidance scale of ours: **{chosen:g}**, the most robust in the sweep" in text
    assert f"| {chosen:g} |" in text and "| chosen |" in text

    rewritten = tmp_path / "again.md"
    benchmark.main(["--from-json", str(tmp_path / "run" / "benchmark.json"),
                    "--docs", str(rewritten)])
    assert rewritten.read_text() == text


def test_the_scale_sweep_reads_held_out_training_images_never_test_images(tmp_path):
    root = class_tree(class_tree(tmp_path / "tree"), per_class=3, split="train", blue=200)
    benchmark = benchmark_module()
    benchmark.main(["--tiny", "--n", "2", "--data-root", str(root), "--defences", "ours",
                    "--guidance-scale", "100", "3200", "--sweep-n", "3", "--validation-size",
                    "12", "--validation-seed", "1", "--no-headline",
                    "--output-dir", str(tmp_path / "run")])

    results = json.loads((tmp_path / "run" / "benchmark.json").read_text())
    sweep = results["scale_sweep"]
    held_out = validation_split(load_dataset("cifar10", root, train=True), 12, seed=1)[1]
    images, labels = select_examples(held_out, 3, seed=0)
    assert (images[:, 2] > 0.7).all()  # blue: training images; the test images have none
    assert sweep["data_fingerprint"] == fingerprint(images, labels)
    assert sweep["held_out"] == {"size": 12, "seed": 1} and sweep["split"] == "train"
    test = load_dataset("cifar10", root, train=False)
    test_images = torch.stack([test[i][0] for i in range(2)])
    assert (test_images[:, 2] == 0).all()
    assert results["report"]["settings"]["data_fingerprint"] == fingerprint(
        test_images, torch.tensor([test[i][1] for i in range(2)]))
    assert "held out from the training split of cifar10-imagefolder" in benchmark.cifar10_page(
        results)


def test_the_tiny_benchmark_on_the_cifar10_jpeg_copy_names_it(tmp_path):
    root = cifar10_jpeg(tmp_path)
    benchmark = benchmark_module()
    benchmark.main(["--tiny", "--n", "2", "--data-root", str(root), "--defences", "undefended",
                    "ours", "--output-dir", str(tmp_path / "run")])
    results = json.loads((tmp_path / "run" / "benchmark.json").read_text())
    assert results["data"] == "cifar10-jpeg"
    assert {record["model"] for record in results["report"]["records"]} == {"undefended", "ours"}


@pytest.mark.parametrize(("argv", "message"), [
    (["--reduced"], "--data-root is required"),
    (["--tiny", "--guidance-scale", "nan"], "--guidance-scale must be a finite number >= 0"),
    (["--tiny", "--n", "0"], "--n must be an integer >= 1, got 0"),
    (["--data-root", ".", "--runs", "3"], "--runs must be >= 5"),
    (["--data-root", "no/such/folder"], "--data-root must be an existing folder"),
    (["--tiny", "--guidance-scale", "100", "100"], "--guidance-scale must list distinct scales"),
    (["--tiny", "--guidance-scale", "100", "200", "--defences", "undefended"],
     "--defences undefended leaves ours out"),
    (["--tiny", "--sweep-n", "0"], "--sweep-n must be an integer >= 1, got 0"),
    (["--tiny", "--validation-size", "0"], "--validation-size must be an integer >= 1, got 0"),
    (["--tiny", "--validation-seed", "-1"], "--validation-seed must be an integer >= 0, got -1"),
    (["--tiny", "--headline-attacks", "apgd-eot:eps=0.1"],
     "--headline-attacks must attack this run's threat model (--norm linf, eps 0.0313725)"),
    (["--tiny", "--headline-attacks", "nonsense"], "--headline-attacks 'nonsense': attack kind"),
])
def test_the_benchmark_checks_its_options(argv, message, capsys):
    with pytest.raises(SystemExit):
        benchmark_module().main(argv)
    assert message in capsys.readouterr().err


def test_the_sweep_refuses_a_copy_without_a_training_split_and_too_large_a_hold_out(
        tmp_path, capsys):
    flat = class_tree(tmp_path / "flat", split="")
    split = class_tree(class_tree(tmp_path / "split"), split="train")
    for root, extra, message in ((flat, [], "no train/ and test/ split"),
                                 (split, ["--validation-size", "999"],
                                  "--validation-size: validation size must lie in [1, 19]")):
        with pytest.raises(SystemExit):
            benchmark_module().main(["--tiny", "--data-root", str(root), "--guidance-scale",
                                     "100", "200", *extra])
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(("scales", "source", "sweeps"), [
    ([], "recipe", False), (["800"], "given", False), (["800", "1600"], "sweep", True)])
def test_only_several_guidance_scales_are_swept(scales, source, sweeps):
    benchmark = benchmark_module()
    argv = ["--tiny"] + (["--guidance-scale", *scales] if scales else [])
    args = benchmark.resolve(benchmark.build_parser().parse_args(argv))
    assert args.scale_source == source and benchmark.sweeping(args) == sweeps
    assert args.guidance_scale == ([float(s) for s in scales] or [RECIPES["cifar10-agdm"]
                                                                  .guidance_scale])


def test_budgets_follow_the_protocol():
    budgets = benchmark_module().BUDGETS
    assert (budgets["reference"].n, budgets["reference"].steps, budgets["reference"].eot) == (
        512, 200, 20)
    assert (budgets["reduced"].n, budgets["reduced"].steps, budgets["reduced"].eot) == (128, 20, 4)
    assert budgets["reference"].runs == budgets["reduced"].runs == 10
    assert budgets["reference"].sweep_n == budgets["reduced"].sweep_n == 128
