"""The command line: fast help and listing (no model code imported), every option documented
with its default, renamed options that keep their old names, and the classifiers and devices
`evaluate` / `compare` / `demo` accept (issue 11)."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import purifyguard
from purifyguard.cli import build_parser, main
from purifyguard.data import FASHION_MNIST_CLASSES, ImageTensorDataset
from purifyguard.evaluation import cli as evaluation_cli
from purifyguard.train.__main__ import ROUTINES
from purifyguard.train.options import defining_options, parse_with_config

ASSETS = Path(purifyguard.__file__).parent / "assets"
HEAVY = ("torchattacks", "diffusers", "timm", "torch", "torchvision", "accelerate")


# --- speed: building the options imports no model code -----------------------------------------


def modules_loaded_by(code: str) -> dict[str, bool]:
    """Which heavy packages a fresh interpreter has imported after running `code`."""
    script = (f"import json, sys\n{code}\n"
              f"print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [
    ["--help"], ["list"], ["list", "--help"], ["demo", "--help"], ["evaluate", "--help"],
    ["compare", "--help"], ["train", "--help"], ["--version"],
])
def test_help_and_list_import_no_model_code(argv):
    loaded = modules_loaded_by(
        "from purifyguard.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    )
    assert not any(loaded.values()), f"purifyguard {' '.join(argv)} imported " + ", ".join(
        name for name, imported in loaded.items() if imported)


def test_importing_the_package_and_reading_the_registry_is_light():
    loaded = modules_loaded_by(
        "import purifyguard, purifyguard.evaluation\n"
        "from purifyguard.registry import default_purifier_name, list_purifiers\n"
        "assert 'fashion-mnist-agdm' in list_purifiers(), list_purifiers()\n"
        "assert default_purifier_name(1, 28) == 'fashion-mnist-agdm'"
    )
    assert not any(loaded.values()), loaded


def test_list_prints_every_registered_purifier(capsys):
    main(["list"])
    printed = capsys.readouterr().out
    assert "fashion-mnist-agdm (default): 1x28x28" in printed
    assert "cifar10-ddpm (default): 3x32x32" in printed
    assert "fashion-mnist-ddpm: 1x28x28" in printed


def test_the_public_names_load_on_first_use():
    from purifyguard import (  # noqa: F401 (importable as before)
        PurifiedModel,
        Purifier,
        PurifierConfig,
        bundled_classifier,
        bundled_test_images,
        evaluate,
        list_purifiers,
        load_purifier,
        register_purifier,
    )
    from purifyguard.evaluation import harness

    assert set(purifyguard.__all__) == set(purifyguard._EXPORTS)
    assert set(purifyguard.__all__) <= set(dir(purifyguard))
    assert purifyguard.evaluate is harness.evaluate
    assert PurifiedModel.__module__ == "purifyguard.purified_model"
    with pytest.raises(AttributeError, match="no attribute 'Purifer'"):
        purifyguard.Purifer  # noqa: B018

    evaluation = importlib.import_module("purifyguard.evaluation")
    assert set(evaluation.__all__) == set(evaluation._EXPORTS) <= set(dir(evaluation))
    importlib.import_module("purifyguard.evaluation.compare")  # the submodule of the same name
    from purifyguard.evaluation import compare

    assert callable(compare) and compare.__name__ == "compare"
    assert evaluation.compare is compare


# --- every option says what it does and what it defaults to -------------------------------------


def all_parsers() -> dict[str, argparse.ArgumentParser]:
    """purifyguard, each of its commands, and each training routine."""
    main_parser = build_parser()
    parsers = {"purifyguard": main_parser}
    for action in main_parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help, f"purifyguard {choice.dest} has no one-line help"
            parsers.update({f"purifyguard {name}": sub for name, sub in action.choices.items()})
    for routine in ROUTINES:
        module = importlib.import_module(f"purifyguard.train.{routine}")
        parsers[f"purifyguard train {routine}"] = module.build_parser()
    return parsers


def test_every_option_has_help_that_shows_its_default():
    parsers = all_parsers()
    assert set(parsers) >= {"purifyguard demo", "purifyguard evaluate", "purifyguard compare",
                            "purifyguard list", "purifyguard train diffusion",
                            "purifyguard train guidance", "purifyguard train adapt"}
    for name, parser in parsers.items():
        assert parser.description and parser.description.strip(), f"{name} has no description"
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            flags = "/".join(action.option_strings) or action.dest
            assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, (
                f"{name} {flags} has no help")
            shown = formatter._expand_help(action)
            if action.option_strings and action.nargs != 0 and not action.required:
                assert "default" in shown, f"{name} {flags} does not say its default: {shown!r}"
        parser.format_help()  # every help string formats


def test_defaults_are_shown_as_they_would_be_typed():
    parsers = all_parsers()
    diffusion = parsers["purifyguard train diffusion"].format_help()
    assert "(default: 32,64,64)" in diffusion and "(default: 1000)" in diffusion
    compare = " ".join(parsers["purifyguard compare"].format_help().split())
    assert "(default: none pixel adversarial)" in compare


def test_train_help_lists_each_routine_on_one_line(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--help"])
    assert stopped.value.code == 0
    printed = capsys.readouterr().out
    for routine, what in ROUTINES.items():
        assert re.search(rf"^  {routine} +{re.escape(what)}$", printed, re.MULTILINE), routine
    assert all(routine in build_parser().format_help() for routine in ROUTINES)


def test_the_light_option_choices_match_the_library():
    from purifyguard.data import DATASETS
    from purifyguard.evaluation.compare import GUIDANCE_VARIANTS

    assert evaluation_cli.DATASETS == DATASETS
    assert evaluation_cli.GUIDANCE_VARIANTS == GUIDANCE_VARIANTS


# --- renamed options keep their old names ---------------------------------------------------------

RENAMED = [  # (parser, new flag, old flag, dest, required options)
    ("purifyguard train diffusion", "--optimizer-steps", "--steps", "steps", []),
    ("purifyguard train guidance", "--optimizer-steps", "--steps", "steps", []),
    ("purifyguard train adapt", "--optimizer-steps", "--steps", "steps",
     ["--purifier", "p", "--classifier", "c"]),
    ("purifyguard train adapt", "--sampler-steps", "--train-steps", "train_steps",
     ["--purifier", "p", "--classifier", "c"]),
    ("purifyguard evaluate", "--attack-steps", "--steps", "steps",
     ["--classifier", "c", "--output-dir", "o"]),
    ("purifyguard compare", "--attack-steps", "--steps", "steps",
     ["--classifier", "c", "--output-dir", "o"]),
    ("purifyguard demo", "--attack-steps", "--steps", "steps", []),
]


@pytest.mark.parametrize("name, new, old, dest, required", RENAMED)
def test_a_renamed_option_keeps_its_old_name_and_dest(name, new, old, dest, required):
    parser = all_parsers()[name]
    action = next(a for a in parser._actions if new in a.option_strings)
    assert action.option_strings[0] == new and old in action.option_strings
    assert action.dest == dest
    assert getattr(parser.parse_args([*required, new, "7"]), dest) == 7
    assert getattr(parser.parse_args([*required, old, "7"]), dest) == 7


def recorded_training_commands() -> list[str]:
    """Every `purifyguard train ...` command the bundled model cards record."""
    commands = set()
    for readme in ASSETS.rglob("README.md"):
        commands.update(re.findall(r"command \| `(purifyguard train [^`]+)`",
                                   readme.read_text()))

    def strings(value):
        if isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, str):
            yield value

    for config in ASSETS.rglob("purifier_config.json"):
        commands.update(s for s in strings(json.loads(config.read_text()))
                        if s.startswith("purifyguard train "))
    return sorted(commands)


def test_the_commands_in_the_model_cards_still_parse():
    commands = recorded_training_commands()
    routines = {c.split()[2] for c in commands}
    # the bundled models' cards: diffusion and guidance (adapt when an adapted purifier ships)
    assert len(commands) >= 4 and {"diffusion", "guidance"} <= routines <= set(ROUTINES), commands
    parsers = all_parsers()
    for command in commands:
        words = shlex.split(command)
        args = parse_with_config(parsers[f"purifyguard train {words[2]}"], words[3:])
        assert args.steps == int(words[words.index("--steps") + 1]), command
        if "--train-steps" in words:
            assert args.train_steps == int(words[words.index("--train-steps") + 1]), command
        assert "steps" in defining_options(args)  # the key the checkpoint manifests hold


def test_config_files_take_the_dest_or_any_flag_name(tmp_path, capsys):
    from purifyguard.train.adapt import build_parser

    required = ["--purifier", "p", "--classifier", "c"]
    config = tmp_path / "options.yaml"
    for text, expected in [("steps: 7\ntrain_steps: 3\n", (7, 3)),
                           ("optimizer-steps: 8\nsampler_steps: 4\n", (8, 4)),
                           ("train-steps: 5\n", (1000, 5))]:
        config.write_text(text)
        args = parse_with_config(build_parser(), ["--config", str(config), *required])
        assert (args.steps, args.train_steps) == expected, text
        assert "optimizer_steps" not in vars(args) and "sampler_steps" not in vars(args)
    config.write_text("steps: 7\noptimizer_steps: 8\n")
    with pytest.raises(SystemExit) as refused:
        parse_with_config(build_parser(), ["--config", str(config), *required])
    assert refused.value.code == 2
    assert "steps and optimizer_steps name the same option" in capsys.readouterr().err


# --- evaluate / compare: the classifier names and --device ----------------------------------------


class Stop(Exception):
    """Ends a command-line run once its model is built."""


class Tiny(nn.Module):
    """A small RGB classifier standing in for a RobustBench model."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


def rgb_data(classes: int = 10) -> ImageTensorDataset:
    images = (torch.rand(4, 3, 32, 32) * 255).to(torch.uint8)
    return ImageTensorDataset(images, torch.arange(4) % classes,
                              tuple(f"class {i}" for i in range(classes)))


def evaluated(monkeypatch, options: list[str], data=None) -> tuple[nn.Module, dict]:
    """The model and settings `purifyguard evaluate <options>` hands to evaluate()."""
    if data is None:
        images = (torch.rand(4, 1, 28, 28) * 255).to(torch.uint8)
        data = ImageTensorDataset(images, torch.arange(4), FASHION_MNIST_CLASSES)
    monkeypatch.setattr(evaluation_cli, "_test_split", lambda name, root: data)
    calls = []

    def capture(model, *args, **kwargs):
        calls.append((model, kwargs))
        raise Stop

    monkeypatch.setattr(evaluation_cli, "evaluate", capture)
    parser = argparse.ArgumentParser()
    evaluation_cli.add_arguments(parser)
    with pytest.raises(Stop):
        evaluation_cli.run(parser.parse_args([*options, "--output-dir", "unused"]))
    return calls[0]


def test_a_robustbench_name_goes_to_the_robustbench_loader(monkeypatch, tmp_path):
    robustbench = pytest.importorskip("purifyguard.adapters.robustbench")
    asked = []

    def load(name, *, model_dir=None):
        asked.append((name, model_dir))
        return Tiny()

    monkeypatch.setattr(robustbench, "load_robustbench_model", load, raising=False)
    name = "robustbench:cifar10/Linf/Zhang2019Theoretically"
    model, _ = evaluated(monkeypatch, ["--classifier", name, "--purifier", "none",
                                       "--robustbench-dir", str(tmp_path)], rgb_data())
    assert asked == [(name, tmp_path)]
    assert isinstance(model.classifier, Tiny)
    # RobustBench models normalise their [0, 1] input themselves: nothing is added in front.
    assert model.normalize.mean.flatten().tolist() == [0.0] * 3
    assert model.normalize.std.flatten().tolist() == [1.0] * 3
    with pytest.raises(ValueError, match="RobustBench's own weights"):
        evaluated(monkeypatch, ["--classifier", name, "--pretrained"], rgb_data())


def test_a_torchvision_name_loads_a_checkpoint_or_its_default_weights(monkeypatch, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    weights = tmp_path / "squeezenet.safetensors"
    network = torchvision.models.squeezenet1_1(num_classes=10)
    save_file(network.state_dict(), weights)
    # A torchvision checkpoint does not say how the model wants its input: nothing is guessed
    # (issue 24 removed the silent ImageNet statistics), --mean/--std say it.
    options = ["--checkpoint", str(weights), "--purifier", "none"]
    with pytest.raises(ValueError, match="torchvision models do not record.*pass --mean and "
                                         "--std \\(and --input-size\\)"):
        evaluated(monkeypatch, ["--classifier", "squeezenet1_1", *options], rgb_data())
    normalization = ["--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]
    for name in ("squeezenet1_1", "torchvision:squeezenet1_1"):  # timm has no squeezenet
        model, _ = evaluated(monkeypatch, ["--classifier", name, *options, *normalization],
                             rgb_data())
        assert type(model.classifier).__name__ == "SqueezeNet"
        assert all(torch.equal(value, network.state_dict()[key])
                   for key, value in model.classifier.state_dict().items())
        assert model.normalization_source == "explicit mean/std"
    model, _ = evaluated(monkeypatch, ["--classifier", "squeezenet1_1", *options, *normalization,
                                       "--input-size", "32"], rgb_data())
    assert model.input_size == 32

    # --pretrained: the DEFAULT weights, whose own transforms give the normalisation (a stand-in
    # builder here, so that nothing is downloaded).
    built = []

    def get_model(name, weights=None, **kwargs):
        built.append((name, weights))
        return torchvision.models.squeezenet1_1(**kwargs)

    monkeypatch.setattr(torchvision.models, "get_model", get_model)
    default = torchvision.models.get_model_weights("squeezenet1_1").DEFAULT
    model, _ = evaluated(monkeypatch, ["--classifier", "torchvision:squeezenet1_1",
                                       "--pretrained", "--purifier", "none"], rgb_data(1000))
    assert built == [("squeezenet1_1", default)]
    assert model.normalization_source == f"weights {default}"
    with pytest.raises(ValueError, match="predicts the 1000 classes"):
        evaluated(monkeypatch, ["--classifier", "torchvision:squeezenet1_1", "--pretrained"],
                  rgb_data(10))


def test_an_unknown_classifier_name_lists_what_is_accepted(monkeypatch):
    with pytest.raises(ValueError, match="timm or torchvision model name.*robustbench:"):
        evaluated(monkeypatch, ["--classifier", "no-such-net", "--checkpoint", "x.safetensors"])
    with pytest.raises(ValueError, match="torchvision has no classification model"):
        evaluated(monkeypatch, ["--classifier", "torchvision:no_such_net", "--pretrained"])


def test_device_goes_to_the_evaluation(monkeypatch, capsys):
    bundled = ["--classifier", "fashion-mnist-resnet18", "--purifier", "none"]
    _, settings = evaluated(monkeypatch, [*bundled, "--device", "cpu"])
    assert settings["device"] == torch.device("cpu")
    _, settings = evaluated(monkeypatch, bundled)
    assert "device" not in settings  # accelerate's device for this process: cuda if available
    parser = argparse.ArgumentParser()
    evaluation_cli.add_arguments(parser)
    with pytest.raises(SystemExit) as refused:
        parser.parse_args([*bundled, "--output-dir", "o", "--device", "gpu"])
    assert refused.value.code == 2 and "--device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            evaluated(monkeypatch, [*bundled, "--device", "cuda"])


def test_device_under_accelerate_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")
    assert evaluation_cli.evaluation_device("cpu") == torch.device("cpu")
    import os

    assert os.environ["ACCELERATE_USE_CPU"] == "true"  # the process group runs on the CPU
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="each process runs on its own GPU"):
            evaluation_cli.evaluation_device("cuda:0")


def test_evaluate_runs_on_the_device_it_is_given(monkeypatch, tmp_path, capsys):
    images = (torch.rand(4, 1, 28, 28) * 255).to(torch.uint8)
    data = ImageTensorDataset(images, torch.arange(4), FASHION_MNIST_CLASSES)
    monkeypatch.setattr(evaluation_cli, "_test_split", lambda name, root: data)
    main(["evaluate", "--classifier", "fashion-mnist-resnet18", "--purifier", "none",
          "--attack", "pgd:steps=1,eot=1", "--n", "4", "--runs", "1", "--batch-size", "4",
          "--device", "cpu", "--no-progress", "--output-dir", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["device"] == "cpu"
    assert "| fashion-mnist-resnet18 |" in capsys.readouterr().out


def test_the_demo_passes_its_device_on(monkeypatch, tmp_path, capsys):
    from purifyguard.evaluation import harness

    calls = []

    def fake_evaluate(model, data, attacks, **settings):
        calls.append(settings)
        figures = {"mean": 0.5, "ci95_mean": [0.4, 0.6], "worst_case": 0.4}
        return {"records": [{"model": settings["model_name"], "n": 4,
                             "clean_accuracy": figures, "robust_accuracy": figures}]}

    monkeypatch.setattr(harness, "evaluate", fake_evaluate)
    main(["demo", "--n", "4", "--steps", "1", "--adaptive-n", "2", "--adaptive-steps", "1",
          "--device", "cpu", "--output-dir", str(tmp_path), "--no-progress"])
    assert len(calls) == 3 and all(c["device"] == torch.device("cpu") for c in calls)
    assert "PGD-1" in capsys.readouterr().out
