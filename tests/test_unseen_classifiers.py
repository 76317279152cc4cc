"""benchmarks/unseen_classifiers.py: one purifier in front of classifiers it never saw, clean and
under attack, beside what TRADES training of each classifier's architecture would cost."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from purifyguard.evaluation.attacks import parse_attack
from purifyguard.guidance_network_format import create_guidance_network, save_guidance_network
from purifyguard.train import guidance as routine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import unseen_classifiers

RAW_INPUT = {"mean": [0.0], "std": [1.0], "input_size": [1, 28, 28]}
TINY_RESNET = ("resnet10t", {"channels": [8, 16, 32, 64], "num_classes": 10, "in_chans": 1,
                             "pretrained_cfg_overlay": RAW_INPUT})
TINY_VIT = ("vit_tiny_patch16_224", {"img_size": 28, "patch_size": 7, "depth": 1,
                                     "embed_dim": 16, "num_heads": 2, "num_classes": 10,
                                     "in_chans": 1, "pretrained_cfg_overlay": RAW_INPUT})


@pytest.fixture
def tiny_inputs(tmp_path, make_purifier) -> dict[str, str]:
    """Two tiny classifiers of two families (a ResNet and a ViT) and a tiny purifier with
    conftest's networks, saved as folders."""
    torch.manual_seed(0)
    for name, (architecture, kwargs) in (("resnet", TINY_RESNET), ("vit", TINY_VIT)):
        save_guidance_network(create_guidance_network(architecture, **kwargs).eval(),
                              tmp_path / name)
    make_purifier().save_pretrained(tmp_path / "purifier",
                                    guidance_kwargs={"channels": (8, 16, 32, 64)})
    return {name: str(tmp_path / name) for name in ("resnet", "vit", "purifier")}


def quick_options(inputs: dict[str, str], output_dir: Path) -> list[str]:
    return ["--classifiers", f"resnet={inputs['resnet']}", f"vit={inputs['vit']}",
            "--purifier", inputs["purifier"], "--quick", "--train-batch-size", "8",
            "--threads", "1", "--output-dir", str(output_dir)]


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist_here")
def test_a_quick_run_writes_every_figure_and_resumes(tmp_path, tiny_inputs):
    output_dir = tmp_path / "unseen"
    result = unseen_classifiers.main(quick_options(tiny_inputs, output_dir))
    written = json.loads((output_dir / "unseen-classifiers.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["command"].startswith("python benchmarks/unseen_classifiers.py --classifiers")
    assert (written["n"], written["clean_n"], written["runs"], written["seed"]) == (4, 4, 1, 0)
    assert written["attack"]["steps"] == 1 and written["attack"]["reduced"]
    assert {"hardware", "device", "threads", "cpu_count"} <= set(written["machine"])
    assert [(row["name"], row["family"], row["architecture"]) for row in written["classifiers"]] == [
        ("resnet", "ResNet", "resnet10t"), ("vit", "VisionTransformer", "vit_tiny_patch16_224")]
    for row in written["classifiers"]:
        assert row["parameters"] > 0
        clean = row["clean"]
        assert clean["n"] == 4 and 0 <= clean["bare"] <= 1 and 0 <= clean["purified"] <= 1
        assert clean["cost"]["difference"] == pytest.approx(clean["bare"] - clean["purified"])
        for model in ("bare", "purified"):
            robust = row["robust"][model]["robust_accuracy"]
            assert robust["n"] == 4 and 0 <= robust["worst_case"] <= robust["mean"] <= 1
            assert "within_submissions" in robust
        cost = row["trades_cost"]
        assert [len(cost["seconds_per_step"][kind]) for kind in ("plain", "trades")] == [1, 1]
        assert cost["trades_step_cost"] == pytest.approx(
            cost["plain_images_per_s"] / cost["trades_images_per_s"])
        assert cost["trades_run_hours"] == pytest.approx(
            6000 * 8 / cost["trades_images_per_s"] / 3600)
    section = unseen_classifiers.unseen_classifiers_section(written)
    assert "| resnet | ResNet / resnet10t |" in section
    assert "| vit | VisionTransformer / vit_tiny_patch16_224 |" in section

    # run again: every clean and attacked batch is read back, none is computed twice
    stored = {folder: (output_dir / folder / "batches-0.jsonl").read_text()
              for folder in ("clean", "robust")}
    again = unseen_classifiers.main(quick_options(tiny_inputs, output_dir))
    assert {folder: (output_dir / folder / "batches-0.jsonl").read_text()
            for folder in stored} == stored
    assert [row["clean"] for row in again["classifiers"]] == [
        row["clean"] for row in result["classifiers"]]


def test_the_trades_steps_are_the_routines_and_the_hours_follow_the_rate(monkeypatch):
    calls = []

    def adversary(model, x, eps, steps, step_size):
        calls.append((eps, steps, step_size, model.training))
        return x.clone()

    monkeypatch.setattr(routine, "trades_adversary", adversary)
    images, labels = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    ticks = []
    cost = unseen_classifiers.training_throughput(
        *TINY_RESNET, images, labels, steps=2, warmup_steps=1, trades_steps=100, device="cpu",
        on_step=lambda: ticks.append(1))
    # one adversary per TRADES step (warm-up included), in the routine's settings
    assert calls == [(0.1, 10, 0.025, True)] * 3
    assert len(ticks) == 3
    assert [len(cost["seconds_per_step"][kind]) for kind in ("plain", "trades")] == [2, 2]
    assert cost["trades_images_per_s"] == pytest.approx(
        2 * 4 / sum(cost["seconds_per_step"]["trades"]))
    assert cost["trades_run_hours"] == pytest.approx(100 * 4 / cost["trades_images_per_s"] / 3600)
    assert cost["plain_run_hours"] == pytest.approx(100 * 4 / cost["plain_images_per_s"] / 3600)
    assert unseen_classifiers.hours(6000, 128, 64.0) == pytest.approx(6000 * 2 / 3600)


def hand_made_result(attack: str = "apgd-eot:steps=20,eot=2,eps=0.1",
                     device: str = "cpu") -> dict:
    summary = {"mean": 0.5, "worst_case": 0.4}
    row = {
        "name": "mobilenetv3", "family": "MobileNetV3", "architecture": "mobilenetv3_small_100",
        "parameters": 1_528_106,
        "clean": {"n": 10000, "bare": 0.8579, "purified": 0.8312,
                  "cost": {"difference": 0.0267, "ci95": [0.0221, 0.0314]}},
        "robust": {"bare": {"robust_accuracy": {"mean": 0.0, "worst_case": 0.0}},
                   "purified": {"robust_accuracy": summary}},
        "trades_cost": {"trades_step_cost": 7.04, "trades_run_hours": 12.345},
    }
    return {
        "purifier": "fashion-mnist-agdm", "attack": parse_attack(attack).to_dict(),
        "n": 256, "clean_n": 10000, "runs": 10, "seed": 0, "classifiers": [row],
        "throughput": {"steps": 10, "warmup_steps": 2, "batch_size": 128,
                       "recipe": unseen_classifiers.TRADES_RECIPE, "trades_run_steps": 6000},
        "machine": {"hardware": "CPU x86_64, 1 torch threads, torch 2.5", "device": device},
    }


def test_the_markdown_section_has_one_row_per_classifier_and_says_what_was_measured():
    section = unseen_classifiers.unseen_classifiers_section(hand_made_result())
    assert ("| mobilenetv3 | MobileNetV3 / mobilenetv3_small_100 | 1.53 M | 85.8 | 83.1 | "
            "2.7 [2.2, 3.1] | 0.0 | 50.0 (40.0) | 7.0x | 12.3 |") in section
    text = section.splitlines()[0]
    for words in ("fashion-mnist-agdm", "first 10000 Fashion-MNIST test images",
                  "apgd-eot (L-inf eps 0.1, 20 iterations x EOT 2)",
                  "first 256 test images, R = 10 purifications, seed 0",
                  "**reduced** attack, below the protocol's reference, run on a CPU",
                  "beta 6, 10-step PGD at eps 0.1, step 0.025",
                  "CPU x86_64, 1 torch threads", "6000 steps x 128"):
        assert words in text, words


def test_a_reference_attack_is_not_called_reduced():
    result = hand_made_result("apgd-eot:steps=200,eot=20,eps=0.1", device="cuda")
    text = unseen_classifiers.unseen_classifiers_section(result)
    assert "200 iterations x EOT 20" in text and "reduced" not in text


@pytest.mark.parametrize("options, message", [
    (["--classifiers", "mobilenet"], "--classifiers 'mobilenet': expected NAME=CLASSIFIER"),
    (["--classifiers", "a=no/such/folder"],
     "--classifiers 'a=no/such/folder': no/such/folder is neither a folder nor a bundled"),
    (["--classifiers", "a=fashion-mnist-resnet18", "a=fashion-mnist-resnet18-trades"],
     "the name 'a' is given twice"),
    (["--classifiers", "a=fashion-mnist-resnet18", "--attack", "pgd:steps=many"],
     "--attack 'pgd:steps=many': .*steps"),
    (["--classifiers", "a=fashion-mnist-resnet18", "--data-root", "no/such/folder"],
     "--data-root no/such/folder: expected a folder"),
])
def test_a_bad_argument_is_named_before_anything_loads(monkeypatch, tmp_path, options, message):
    monkeypatch.setattr(unseen_classifiers, "load_inputs", lambda *a: pytest.fail("work began"))
    with pytest.raises(SystemExit, match=message):
        unseen_classifiers.main([*options, "--output-dir", str(tmp_path)])


@pytest.mark.parametrize("option, value, expected", [
    ("--n", "0", "expected an integer >= 1, got '0'"),
    ("--runs", "two", "expected an integer, got 'two'"),
    ("--throughput-steps", "0", "expected an integer >= 1"),
    ("--warmup-steps", "-1", "expected an integer >= 0"),
    ("--threads", "0", "expected a positive integer or 'auto'"),
])
def test_a_bad_number_is_refused_by_the_parser_naming_its_option(capsys, option, value,
                                                                  expected):
    with pytest.raises(SystemExit):
        unseen_classifiers.build_parser().parse_args(
            ["--classifiers", "a=fashion-mnist-resnet18", option, value])
    assert f"argument {option}: {expected}" in capsys.readouterr().err


def test_a_purifier_that_does_not_load_is_named_before_any_measurement(monkeypatch, tmp_path):
    monkeypatch.setattr(unseen_classifiers, "training_throughput",
                        lambda *a, **k: pytest.fail("work began"))
    with pytest.raises(SystemExit, match="--purifier no-such-purifier: .*neither a registered"):
        unseen_classifiers.main(["--classifiers", "a=fashion-mnist-resnet18", "--purifier",
                                 "no-such-purifier", "--output-dir", str(tmp_path)])


@pytest.mark.usefixtures("fashion_mnist_here")
def test_more_images_than_the_test_set_holds_are_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(unseen_classifiers, "training_throughput",
                        lambda *a, **k: pytest.fail("work began"))
    with pytest.raises(SystemExit, match="--clean-n 20000: expected at most the 10000 test "
                                         "images"):
        unseen_classifiers.main(["--classifiers", "a=fashion-mnist-resnet18", "--clean-n",
                                 "20000", "--output-dir", str(tmp_path)])
