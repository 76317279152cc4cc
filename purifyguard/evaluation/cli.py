"""`purifyguard evaluate` and `purifyguard compare`: the command-line front of evaluation.

The model: a classifier behind a purifier (--purifier: a registered name, a folder or a Hub repo
id, "none" for the bare classifier; default: the registered default for the classifier's input),
with optional purifier changes (--purifier-setting t_star=20). The classifier (--classifier) is
- a bundled classifier (fashion-mnist-resnet18, fashion-mnist-resnet18-trades) or a classifier
  folder as purifyguard writes it (config.json with the timm architecture and its create_model
  kwargs, normalisation included, + model.safetensors), also named by --checkpoint
  FOLDER/model.safetensors;
- a timm name with --checkpoint FILE.safetensors or --pretrained; normalisation: timm's
  pretrained config for that name;
- a torchvision name (torchvision.models.list_models(); "torchvision:NAME" when timm has the
  name too) with --checkpoint or --pretrained (its DEFAULT weights, whose normalisation is used);
- robustbench:<dataset>/<threat model>/<model>, a RobustBench model-zoo model, which takes [0, 1]
  images and normalises them itself.
--mean/--std override the normalisation. Attacks: --attack repeated, in the syntax of
attacks.parse_attack, or the protocol's set at --norm/--eps/--attack-steps/--eot.

Building the options imports no model code (torch, timm, torchattacks, diffusers load when the
command runs), so `purifyguard evaluate --help` answers at once. The classifier is built by
classifier_loading.py.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from purifyguard.evaluation.classifier_loading import (
    TORCHVISION_PREFIX,
    LoadedClassifier,
    check_fits,
    load_classifier,  # noqa: F401  (re-exported: it was defined here)
    resolve_classifier,
)
from purifyguard.option_types import positive_float, positive_int

if TYPE_CHECKING:
    import torch
    from torch import nn

COMMANDS = ("evaluate", "compare")
# Light copies of purifyguard.data.DATASETS and purifyguard.evaluation.compare.GUIDANCE_VARIANTS
# (those modules import torch); tests/test_cli.py checks that they match.
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder")
GUIDANCE_VARIANTS = ("none", "pixel", "adversarial")

DESCRIPTIONS = {
    "evaluate": """\
Clean and robust accuracy of one defence, a classifier behind a purifier, under adaptive attacks.
Writes report.json, report.md and image grids to --output-dir; a rerun resumes from the batches
already there.

--classifier is one of
  fashion-mnist-resnet18             a bundled classifier (or fashion-mnist-resnet18-trades)
  FOLDER                             a classifier folder: config.json + model.safetensors
  resnet18                           a timm name, with --checkpoint FILE.safetensors or --pretrained
  torchvision:resnet18               a torchvision name (plain when timm lacks it, e.g. vit_b_16),
                                     with --checkpoint or --pretrained (its DEFAULT weights)
  robustbench:cifar10/Linf/MODEL     a RobustBench model-zoo model (it normalises its input)

example:
  purifyguard evaluate --classifier fashion-mnist-resnet18 --purifier fashion-mnist-agdm \\
      --attack "pgd:eps=0.1,steps=200,eot=20" --n 512 --runs 5 --output-dir runs/eval
""",
    "compare": """\
Several defences side by side on the same images, attacks and seeds: the undefended classifier,
an adversarially trained classifier (--robust-classifier) and the purifier with each guidance
mode (--guidance). Options and classifier names as for `purifyguard evaluate`.

example:
  purifyguard compare --classifier fashion-mnist-resnet18 \\
      --robust-classifier fashion-mnist-resnet18-trades --purifier fashion-mnist-agdm \\
      --guidance-scale pixel=1 --output-dir runs/compare
""",
}

# Run-time names, imported on first use (PEP 562); tests may replace them (monkeypatch).
_LATE = {
    "evaluate": "purifyguard.evaluation.harness",
    "compare": "purifyguard.evaluation.compare",
    "build_defences": "purifyguard.evaluation.compare",
    "default_attacks": "purifyguard.evaluation.attacks",
    "parse_attack": "purifyguard.evaluation.attacks",
    "markdown_table": "purifyguard.evaluation.report",
}


def __getattr__(name: str) -> Any:
    if name not in _LATE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LATE[name]), name)
    globals()[name] = value
    return value


def _late(*names: str) -> tuple[Any, ...]:
    """The run-time functions, through this module's attributes (so a replaced one is used)."""
    module = sys.modules[__name__]
    return tuple(getattr(module, name) for name in names)


def device_name(value: Any) -> str:
    """argparse type of --device: a torch device string (cpu, cuda, cuda:1, mps, ...)."""
    import torch

    try:
        return str(torch.device(str(value).strip()))
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expected a device such as cpu, cuda or cuda:1, got {value!r}") from None


def add_device_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--device", type=device_name,
                        help="where the models run: cpu, cuda, cuda:1, ... (default: cuda if "
                             "available, else cpu; under accelerate launch, each process's own "
                             "GPU)")


def evaluation_device(requested: str | None) -> torch.device | None:
    """The device of --device for evaluate()'s device=, checked (ValueError); None leaves the
    choice to accelerate: this process's GPU if there is one, else the CPU. Under accelerate
    launch (several processes), --device cpu moves the whole process group to the CPU and a
    GPU index is refused: each process takes its own GPU."""
    if requested is None:
        return None
    import torch

    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: CUDA is not available here; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {requested}: this machine has {count} GPU(s), "
                             f"cuda:0 to cuda:{count - 1}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cpu":
            os.environ["ACCELERATE_USE_CPU"] = "true"  # read when the process group starts
        elif device.index is not None:
            raise ValueError(
                f"--device {requested}: under accelerate launch each process runs on its own "
                f"GPU; give --device {device.type} or leave it out"
            )
    return device


def add_arguments(parser: argparse.ArgumentParser, command: str = "evaluate") -> None:
    """The options of `purifyguard evaluate` (command="evaluate") or `purifyguard compare`."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {command!r}")
    parser.set_defaults(evaluation_command=command)
    model = parser.add_argument_group("model")
    model.add_argument("--classifier", required=True,
                       help="a bundled classifier (fashion-mnist-resnet18), a classifier folder "
                            "(config.json + model.safetensors), a timm or torchvision name (with "
                            "--checkpoint or --pretrained; torchvision:NAME picks torchvision "
                            "where timm has the name too) or robustbench:<dataset>/<threat "
                            "model>/<model>")
    model.add_argument("--checkpoint", help="the classifier's weights (.safetensors; default: "
                       "none); a purifyguard config.json beside them is used")
    model.add_argument("--pretrained", action="store_true",
                       help="timm's pretrained weights, or torchvision's DEFAULT weights")
    model.add_argument("--robustbench-dir",
                       help="folder of RobustBench checkpoints, <dir>/<dataset>/<threat model>/"
                            "<model>.pt (default: $PURIFYGUARD_CACHE/robustbench, "
                            "~/.cache/purifyguard/robustbench)")
    model.add_argument("--num-classes", type=positive_int,
                       help="classes of a timm or torchvision classifier (default: the data "
                            "set's)")
    model.add_argument("--in-chans", type=positive_int,
                       help="input channels of a timm classifier (default: the data set's)")
    model.add_argument("--mean", type=float, nargs="+",
                       help="normalisation mean (default: the classifier's own: its folder's, "
                            "timm's or torchvision's)")
    model.add_argument("--std", type=float, nargs="+",
                       help="normalisation std (default: the classifier's own, as --mean)")
    model.add_argument("--input-size", type=positive_int,
                       help="the side of the images the classifier takes; others are resized "
                            "(default: the classifier's own: its folder's, timm's or torchvision's)")
    model.add_argument("--purifier",
                       help="registered name, folder or Hub id; 'none': undefended (default: the "
                            "registered default for the classifier's input)")
    model.add_argument("--purifier-setting", action="append", default=[], metavar="KEY=VALUE",
                       help="change a purifier setting, e.g. t_star=20 or fixed_noise=true "
                            "(repeatable; true/false, none, numbers and strings; default: none)")
    model.add_argument("--n-samples", type=positive_int, default=1,
                       help="independent purifications per image and call")
    model.add_argument("--aggregate", choices=("mean", "vote"), default="mean",
                       help="how --n-samples purifications combine: mean logits or a majority "
                            "vote of their classes")
    add_device_argument(model)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="fashion-mnist", choices=DATASETS,
                      help="the test split of this data set")
    data.add_argument("--data-root",
                      help="folder of the data set; imagefolder: the class sub-folders "
                           "(default: Fashion-MNIST from $PURIFYGUARD_FASHION_MNIST or Debian's "
                           "/usr/share/datasets/fashion-mnist, CIFAR from "
                           "~/.cache/purifyguard/<name>)")
    run = parser.add_argument_group("evaluation")
    run.add_argument("--attack", action="append", metavar="SPEC",
                     help='e.g. "pgd:eps=0.1,steps=200,eot=20" (repeatable; default: the '
                          "protocol's apgd-eot, pgd, autoattack-rand, bpda, transfer and "
                          "square, set by the five options below)")
    run.add_argument("--norm", default="linf", choices=("linf", "l2"),
                     help="threat model of the default attacks")
    run.add_argument("--eps", type=positive_float, default=0.1,
                     help="radius of the default attacks")
    run.add_argument("--attack-steps", "--steps", dest="steps", metavar="N", type=positive_int,
                     default=200, help="iterations of the default gradient attacks (PGD, BPDA, "
                     "transfer); --steps is the old name")
    run.add_argument("--eot", type=positive_int, default=20,
                     help="EOT samples per gradient of the default attacks")
    run.add_argument("--queries", type=positive_int, default=5000,
                     help="queries of the default square attack")
    run.add_argument("--n", type=positive_int, default=512, help="test examples")
    run.add_argument("--batch-size", type=positive_int, default=64,
                     help="examples per batch, per process")
    run.add_argument("--runs", type=positive_int, default=10, help="R purifications per verdict")
    run.add_argument("--seed", type=int, default=0,
                     help="seed of the attacks, purifications and example choice")
    run.add_argument("--output-dir", required=True, help="batches, report.json/.md, grids")
    run.add_argument("--no-resume", action="store_true", help="recompute finished batches")
    run.add_argument("--sanity", action="store_true", help="run the sanity checks too")
    run.add_argument("--sanity-n", type=positive_int,
                     help="examples for the sanity checks (default: min(64, n))")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    if command == "compare":
        extra = parser.add_argument_group("compare")
        extra.add_argument("--robust-classifier",
                           help="an adversarially trained classifier on the same input, named "
                                "as --classifier (default: none)")
        extra.add_argument("--robust-checkpoint",
                           help="its weights (.safetensors; default: none)")
        extra.add_argument("--guidance", nargs="+", default=list(GUIDANCE_VARIANTS),
                           choices=GUIDANCE_VARIANTS, help="purifier variants to compare")
        extra.add_argument("--guidance-scale", action="append", default=[], metavar="MODE=S",
                           help="scale of one variant, e.g. pixel=1 (repeatable; default: the "
                                "purifier's own scale, which suits only its own mode)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the command `add_arguments` set up; prints the Markdown table, returns the report.

    Problems with the options, the files they name or the data raise ValueError (or
    FileNotFoundError) with a message for the user; purifyguard's main prints it."""
    evaluate, compare, build_defences, default_attacks, parse_attack, markdown_table = _late(
        "evaluate", "compare", "build_defences", "default_attacks", "parse_attack",
        "markdown_table")
    purifier_settings = parse_settings(args.purifier_setting, "--purifier-setting")
    if purifier_settings and args.purifier is not None and args.purifier.lower() == "none":
        raise ValueError("--purifier-setting changes a purifier, but --purifier none has none")
    scales = {}
    if args.evaluation_command == "compare":
        scales = {mode: _number(scale, f"--guidance-scale {mode}")
                  for mode, scale in parse_settings(args.guidance_scale, "--guidance-scale",
                                                    raw=True).items()}
    attacks = ([parse_attack(a) for a in args.attack] if args.attack else default_attacks(
        args.norm, args.eps, args.steps, args.eot, args.queries))
    device = evaluation_device(getattr(args, "device", None))
    dataset = _test_split(args.dataset, args.data_root)
    first_image = dataset[0][0]
    classes = tuple(getattr(dataset, "classes", ()))
    in_chans = args.in_chans or first_image.shape[0]
    num_classes = args.num_classes or len(classes) or None
    robustbench_dir = getattr(args, "robustbench_dir", None)
    classifier = resolve_classifier(args.classifier, args.checkpoint, args.pretrained, in_chans,
                                    num_classes, option="--classifier",
                                    robustbench_dir=robustbench_dir)
    check_fits(classifier.module, "--classifier", first_image.shape[0], len(classes),
               args.dataset)
    model = _purified_model(args, classifier, settings=purifier_settings)
    print(f"classifier {args.classifier}: input normalisation "
          f"{model.normalize.extra_repr()} ({_normalization_source(args, classifier, model)})")
    settings = {
        "n": args.n, "batch_size": args.batch_size, "runs": args.runs, "seed": args.seed,
        "output_dir": args.output_dir, "resume": not args.no_resume, "sanity": args.sanity,
        "sanity_n": args.sanity_n, "class_names": classes or None,
        "progress": not args.no_progress,
    }
    if device is not None:
        settings["device"] = device
    if args.evaluation_command == "evaluate":
        name = _model_name(args.classifier)
        name = name if model.purifier is None else f"{name}+purifier"
        report = evaluate(model, dataset, attacks, model_name=name, **settings)
    else:
        robust = None
        if args.robust_classifier:
            robust_classifier = resolve_classifier(
                args.robust_classifier, args.robust_checkpoint, False, in_chans, num_classes,
                option="--robust-classifier", robustbench_dir=robustbench_dir,
            )
            check_fits(robust_classifier.module, "--robust-classifier", first_image.shape[0],
                       len(classes), args.dataset)
            robust = _purified_model(args, robust_classifier, purifier=False)
        report = compare(build_defences(model, robust, args.guidance, scales), dataset, attacks,
                         **settings)
    print(markdown_table(report))
    return report


def _test_split(name: str, root: str | None):
    """The data set's test split, or ValueError saying what is missing."""
    from purifyguard.data import DATASETS, load_dataset

    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r} (--dataset); choose one of {DATASETS}")
    if root is not None and not Path(root).expanduser().exists():
        raise ValueError(f"--data-root {root} does not exist")
    if name == "imagefolder" and root is None:
        raise ValueError("--dataset imagefolder needs --data-root <folder of class sub-folders>")
    try:
        dataset = load_dataset(name, root=None if root is None else Path(root).expanduser(),
                               train=False)
    except (OSError, RuntimeError, ValueError) as error:
        where = f" from {root}" if root else ""
        raise ValueError(
            f"cannot load the {name} test split{where}: {error} (set --data-root)"
        ) from None
    if len(dataset) == 0:
        raise ValueError(f"the {name} test split{f' in {root}' if root else ''} is empty")
    return dataset


def _purified_model(args: argparse.Namespace, classifier: LoadedClassifier, purifier: Any = None,
                    settings: dict[str, Any] | None = None):
    from purifyguard.normalization import is_torchvision_model
    from purifyguard.purified_model import PurifiedModel

    if purifier is None and args.purifier is not None:
        purifier = False if args.purifier.lower() == "none" else args.purifier
    normalization = classifier.normalization
    if args.mean is not None or args.std is not None:
        normalization = {"mean": args.mean, "std": args.std}
    elif not normalization and is_torchvision_model(classifier.module):
        raise ValueError(
            f"--classifier {args.classifier}: torchvision models do not record the weights they "
            "were built with, so how this one wants its input is unknown: pass --mean and --std "
            "(and --input-size) as it was trained, or --pretrained for torchvision's DEFAULT "
            "weights, whose transforms say it")
    model = PurifiedModel(classifier.module, purifier, n_samples=args.n_samples,
                          aggregate=args.aggregate, input_size=args.input_size, **normalization)
    if model.purifier is not None and settings:
        try:
            model = model.with_purifier(model.purifier.with_settings(**settings))
        except ValueError as error:
            raise ValueError(f"--purifier-setting: {error}") from None
    return model


def _normalization_source(args: argparse.Namespace, classifier: LoadedClassifier,
                          model: nn.Module) -> str:
    explicit = args.mean is not None or args.std is not None
    return model.normalization_source if explicit or classifier.source is None else (
        classifier.source)


def parse_settings(items: list[str], option: str = "--purifier-setting",
                   raw: bool = False) -> dict[str, Any]:
    """KEY=VALUE pairs. Values: true/false (any case) are booleans, none/null None, integers
    and decimals numbers, [..] / {..} / "..." JSON, anything else the string itself; the
    purifier's own validation then refuses a value of the wrong type. raw=True keeps strings."""
    settings: dict[str, Any] = {}
    for item in items:
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise ValueError(f"{option} {item!r} is not KEY=VALUE")
        if key in settings:
            raise ValueError(f"{option} {key} is given twice")
        settings[key] = value.strip() if raw else parse_value(value)
    return settings


def parse_value(text: str) -> Any:
    """A command-line value as the Python value it spells (see parse_settings)."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text[:1] in ("[", "{", '"'):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def _number(text: str, option: str) -> float:
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError as error:
        raise ValueError(f"{option}: {error}") from None


def _model_name(classifier: str) -> str:
    """The report's name for the classifier: a folder or RobustBench model by its own name."""
    if classifier.startswith(TORCHVISION_PREFIX):
        return classifier[len(TORCHVISION_PREFIX):]
    path = Path(classifier)
    return path.name if path.is_dir() or "/" in classifier or "\\" in classifier else classifier
