"""Evaluation never runs code from a file, never leaves a half-written file, refuses a folder in
use and every bad argument with an error naming it, and the command line reads a classifier
folder's own settings (issue 10, evaluation side)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from safetensors.torch import load_file
from torch import nn

from purifyguard import PurifiedModel
from purifyguard.data import FASHION_MNIST_CLASSES, ImageTensorDataset
from purifyguard.evaluation import (
    AttackSpec,
    OutputFolderInUse,
    compare,
    evaluate,
    harness,
    parse_attack,
    run_sanity_checks,
)
from purifyguard.evaluation import cli as evaluation_cli
from purifyguard.guidance_network_format import create_guidance_network, save_guidance_network

ATTACK = "pgd:steps=1,eot=1"
QUICK = {"n": 4, "batch_size": 4, "runs": 1, "progress": False}


class Counting(nn.Module):
    """A tiny classifier on [0, 1] images that counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 13 * 13, 10))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


def batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.rand(n, 1, 28, 28, generator=generator), torch.arange(n) % 10


@pytest.fixture
def purified(make_purifier) -> PurifiedModel:
    return PurifiedModel(Counting(), make_purifier(t_star=2), mean=(0.5,), std=(0.5,))


# --- no code from a file -----------------------------------------------------------------------


class Planted:
    """A pickle that, once loaded, writes a marker file: the code a planted .pt would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_grid_images_are_safetensors_and_a_planted_pickle_never_runs(
    purified, tmp_path, monkeypatch
):
    evaluate(purified, batch(), [ATTACK], output_dir=tmp_path, **QUICK)
    stored = tmp_path / "adversarial" / "model--pgd--batch0.safetensors"
    assert load_file(stored)["adversarial"].shape == (4, 1, 28, 28)
    assert (tmp_path / "grid-model-pgd.png").stat().st_size > 0

    # A rerun draws the grid from the stored batch: a pickle planted under the old .pt name is
    # ignored, and one put in place of the safetensors file is refused, never unpickled.
    marker = tmp_path / "marker"
    planted = tmp_path / "adversarial" / "model--pgd--batch0.pt"
    torch.save(Planted(marker), planted)

    def no_torch_load(*args, **kwargs):
        raise AssertionError("evaluation must never call torch.load")

    monkeypatch.setattr(torch, "load", no_torch_load)
    (tmp_path / "grid-model-pgd.png").unlink()
    evaluate(purified, batch(), [ATTACK], output_dir=tmp_path, **QUICK)
    assert (tmp_path / "grid-model-pgd.png").stat().st_size > 0
    stored.write_bytes(planted.read_bytes())
    with pytest.raises(ValueError, match="batch0.safetensors"):
        evaluate(purified, batch(), [ATTACK], output_dir=tmp_path, **QUICK)
    assert not marker.exists()


# --- faults ------------------------------------------------------------------------------------


def test_report_and_run_json_are_replaced_whole_or_not_at_all(purified, tmp_path, monkeypatch):
    from purifyguard import files

    evaluate(purified, batch(), [ATTACK], output_dir=tmp_path, **QUICK)
    real_replace = files.os.replace

    for failing in ("run.json", "report.json", "report.md"):
        before = (tmp_path / failing).read_bytes()
        refused = []

        def replace(source, target, failing=failing, refused=refused):
            if Path(target).name == failing:
                refused.append(failing)
                raise OSError(28, "No space left on device")
            return real_replace(source, target)

        monkeypatch.setattr(files.os, "replace", replace)
        with pytest.raises(OSError, match="No space"):
            evaluate(purified, batch(), [ATTACK], output_dir=tmp_path, **QUICK)
        monkeypatch.undo()
        assert refused == [failing] and (tmp_path / failing).read_bytes() == before, failing

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    before = (tmp_path / "run.json").read_bytes()
    monkeypatch.setattr(files.os, "fsync", full_disk)  # the disk fills during the first write
    with pytest.raises(OSError, match="No space"):
        evaluate(purified, batch(), [ATTACK], output_dir=tmp_path, **QUICK)
    monkeypatch.undo()
    assert (tmp_path / "run.json").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
    json.loads((tmp_path / "report.json").read_text())


def test_an_unreadable_run_json_names_the_file_and_the_way_out(purified, tmp_path):
    evaluate(purified, batch(), [ATTACK], output_dir=tmp_path, **QUICK)
    (tmp_path / "run.json").write_text("")
    with pytest.raises(ValueError, match=r"run\.json is empty(.|\n)*resume=False"):
        evaluate(purified, batch(), [ATTACK], output_dir=tmp_path, **QUICK)
    report = evaluate(purified, batch(), [ATTACK], output_dir=tmp_path, resume=False, **QUICK)
    assert report["records"][0]["n"] == 4
    assert json.loads((tmp_path / "run.json").read_text())["n"] == 4


def test_a_folder_in_use_is_refused_at_once(purified, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(harness, "run_attack", lambda *args: calls.append(args))
    with FileLock(str(tmp_path / ".lock"), timeout=0), pytest.raises(OutputFolderInUse,
                                                                      match="in use"):
        evaluate(purified, batch(), [ATTACK], output_dir=tmp_path, **QUICK)
    assert calls == [] and purified.classifier.calls == 0
    assert not list(tmp_path.glob("batches-*.jsonl")) and not (tmp_path / "run.json").exists()
    monkeypatch.undo()
    evaluate(purified, batch(), [ATTACK], output_dir=tmp_path, **QUICK)  # free again
    assert (tmp_path / "report.json").exists()


@pytest.mark.parametrize("line, problem", [
    ({"model": "model", "attack": "clean", "batch": 0}, "no 'key'"),
    ("predictions", "'predictions' must be a 1 x 4"),
])
def test_a_stored_line_that_is_not_a_batch_names_the_file_and_line(
    purified, tmp_path, line, problem
):
    evaluate(purified, batch(), [ATTACK], output_dir=tmp_path, **QUICK)
    stored = tmp_path / "batches-0.jsonl"
    records = [json.loads(x) for x in stored.read_text().splitlines()]
    if line == "predictions":
        line = {**records[0], "predictions": [[0, 1]]}
    with open(stored, "a") as file:
        file.write(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=rf"batches-0\.jsonl, line 3: .*{problem}"):
        evaluate(purified, batch(), [ATTACK], output_dir=tmp_path, **QUICK)


# --- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, named", [
    ({"n": -5}, "n"), ({"n": 0}, "n"), ({"n": 2.5}, "n"), ({"n": True}, "n"),
    ({"batch_size": 0}, "batch_size"), ({"runs": 0}, "runs"), ({"seed": "abc"}, "seed"),
    ({"sanity_n": 0}, "sanity_n"), ({"attacks": []}, "attacks"), ({"attacks": [3]}, "attacks"),
    ({"output_dir": 5}, "output_dir"), ({"class_names": "abc"}, "class_names"),
    ({"model_name": "a/b"}, "model_name"), ({"resume": "no"}, "resume"),
    ({"data": (torch.rand(4, 1, 28, 28), torch.arange(3))}, "labels"),
    ({"data": (torch.rand(4, 28, 28), torch.arange(4))}, "4-D"),
    ({"data": (2 * torch.rand(4, 1, 28, 28), torch.arange(4))}, r"\[0, 1\]"),
    ({"data": (torch.rand(4, 1, 28, 28), torch.rand(4))}, "labels"),
    ({"model": "resnet18"}, "model"),
])
def test_bad_arguments_are_refused_before_any_model_call(changes, named):
    model = Counting()
    arguments = {"model": model, "data": batch(), "attacks": [ATTACK], **QUICK, **changes}
    with pytest.raises(ValueError, match=named):
        evaluate(**arguments)
    assert model.calls == 0


def test_compare_and_the_sanity_checks_check_their_arguments_first():
    model = Counting()
    with pytest.raises(ValueError, match="defences"):
        compare({}, batch(), [ATTACK], **QUICK)
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        compare({"a": model}, batch(), [ATTACK], **{**QUICK, "n": 0})
    with pytest.raises(ValueError, match="runs"):
        run_sanity_checks(model, batch(), [ATTACK], n=4, runs=-1)
    with pytest.raises(ValueError, match="n must be"):
        run_sanity_checks(model, batch(), [ATTACK], n=-5)
    assert model.calls == 0


@pytest.mark.parametrize("text, named", [
    ("pgd:steps=2.5", "steps"), ("pgd:eot=0", "eot"), ("pgd:eps=-0.1", "eps"),
    ("pgd:eps=nan", "eps"), ("pgd:eps=inf", "eps"), ("pgd:step_size=0", "step_size"),
    ("pgd:norm=l3", "norm"), ("pgd:epsilon=0.1", "epsilon"), ("pgd:random_start=maybe",
                                                              "random_start"),
    ("pgd:eps", "not key=value"), ("pgd:eps=0.1,eps=0.2", "twice"), ("fgsm", "kind"),
    ("square:n_queries=0", "n_queries"), ("pgd:gradient=half", "gradient"),
    ("pgd:surrogate_sampler=euler", "surrogate_sampler"), ("pgd:name=../x", "name"),
])
def test_attack_strings_are_checked_setting_by_setting(text, named):
    with pytest.raises(ValueError, match=named):
        parse_attack(text)


@pytest.mark.parametrize("fields, named", [
    ({"steps": 2.5}, "steps"), ({"eps": "0.1"}, "eps"), ({"eps": float("inf")}, "eps"),
    ({"eot": 0}, "eot"), ({"random_start": "no"}, "random_start"),
    ({"surrogate_steps": 0}, "surrogate_steps"), ({"checkpointing": 1}, "checkpointing"),
])
def test_attack_specs_check_every_field(fields, named):
    with pytest.raises(ValueError, match=named):
        AttackSpec("pgd", **fields)
    assert AttackSpec("pgd", eps=1).eps == 1.0 and isinstance(AttackSpec("pgd", eps=1).eps, float)


# --- command line ------------------------------------------------------------------------------


class Stop(Exception):
    """Ends a command-line run once its model is built."""


def command_line_model(monkeypatch, options: list[str]) -> PurifiedModel:
    """The model `purifyguard evaluate <options>` would evaluate, on a small stand-in data set."""
    images = (torch.rand(8, 1, 28, 28) * 255).to(torch.uint8)
    data = ImageTensorDataset(images, torch.arange(8) % 10, FASHION_MNIST_CLASSES)
    monkeypatch.setattr(evaluation_cli, "_test_split", lambda name, root: data)
    built = []

    def capture(model, *args, **kwargs):
        built.append(model)
        raise Stop

    monkeypatch.setattr(evaluation_cli, "evaluate", capture)
    parser = argparse.ArgumentParser()
    evaluation_cli.add_arguments(parser)
    with pytest.raises(Stop):
        evaluation_cli.run(parser.parse_args([*options, "--output-dir", "unused"]))
    return built[0]


@pytest.fixture
def classifier_folder(tmp_path) -> Path:
    """A timm classifier saved by purifyguard, trained (say) on inputs normalised by 0.3 / 0.6."""
    torch.manual_seed(0)
    network = create_guidance_network(
        "resnet10t", channels=(8, 16, 32, 64), num_classes=10, in_chans=1,
        pretrained_cfg_overlay={"mean": (0.3,), "std": (0.6,), "input_size": (1, 28, 28)},
    )
    save_guidance_network(network.eval(), tmp_path / "classifier")
    return tmp_path / "classifier"


def test_the_command_line_uses_a_classifier_folders_normalisation(
    monkeypatch, classifier_folder
):
    weights = str(classifier_folder / "model.safetensors")
    for options in (["--classifier", str(classifier_folder)],
                    ["--classifier", "resnet10t", "--checkpoint", weights]):
        model = command_line_model(monkeypatch, [*options, "--purifier", "none"])
        assert model.normalize.mean.flatten().tolist() == pytest.approx([0.3]), options
        assert model.normalize.std.flatten().tolist() == pytest.approx([0.6]), options
        saved = load_file(weights)
        assert all(torch.equal(saved[k], v) for k, v in model.classifier.state_dict().items())
    with pytest.raises(ValueError, match="resnet18.*resnet10t"):
        command_line_model(monkeypatch, ["--classifier", "resnet18", "--checkpoint", weights,
                                         "--purifier", "none"])
    bundled = command_line_model(monkeypatch, ["--classifier", "fashion-mnist-resnet18",
                                               "--purifier", "none"])
    assert bundled.normalize.mean.flatten().tolist() == [0.0]
    assert bundled.normalize.std.flatten().tolist() == [1.0]


def test_purifier_settings_from_the_command_line_are_typed(monkeypatch, tmp_path, make_purifier):
    make_purifier(fixed_noise=True).save_pretrained(
        tmp_path / "purifier", guidance_kwargs={"channels": (8, 16, 32, 64)})
    base = ["--classifier", "fashion-mnist-resnet18", "--purifier", str(tmp_path / "purifier")]
    off = command_line_model(monkeypatch, [*base, "--purifier-setting", "fixed_noise=False"])
    assert off.purifier.config.fixed_noise is False
    on = command_line_model(monkeypatch, [*base, "--purifier-setting", "fixed_noise=true",
                                          "--purifier-setting", "n_steps=none"])
    assert on.purifier.config.fixed_noise is True and on.purifier.config.n_steps is None
    with pytest.raises(ValueError, match="fixed_noise"):
        command_line_model(monkeypatch, [*base, "--purifier-setting", "fixed_noise=maybe"])
    assert [evaluation_cli.parse_value(v) for v in ("20", "0.5", "NULL", "ddim", "False")] == [
        20, 0.5, None, "ddim", False,
    ]


@pytest.mark.parametrize("option", [["--n", "0"], ["--batch-size", "-1"], ["--runs", "0"],
                                    ["--sanity-n", "0"], ["--dataset", "mnist"]])
def test_command_line_numbers_and_data_sets_are_checked_by_argparse(option, capsys):
    parser = argparse.ArgumentParser()
    evaluation_cli.add_arguments(parser)
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(["--classifier", "resnet10t", "--output-dir", "x", *option])
    assert stopped.value.code == 2 and option[0] in capsys.readouterr().err


def test_a_missing_data_root_is_a_clear_error(tmp_path, capsys):
    from purifyguard.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["evaluate", "--classifier", "fashion-mnist-resnet18", "--data-root",
              str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert stopped.value.code == 1 and "--data-root" in error and "nowhere" in error
    assert "Traceback" not in error
