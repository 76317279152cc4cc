"""`purifyguard evaluate` and `purifyguard compare`: the command-line front of evaluation.

The model: a timm classifier behind a purifier (--purifier: a registered name, a folder or a Hub
repo id, "none" for the bare classifier; default: the registered default for the classifier's
input), with optional purifier changes (--purifier-setting t_star=20). The classifier is one of
- a classifier folder as purifyguard writes it (config.json with the timm architecture and its
  create_model kwargs, normalisation included, + model.safetensors), named by --classifier FOLDER,
  by a bundled name (fashion-mnist-resnet18), or by --checkpoint FOLDER/model.safetensors;
- a timm name with --checkpoint FILE.safetensors (or --pretrained); normalisation is then timm's
  pretrained config for that name unless --mean/--std say otherwise.
Attacks: --attack repeated, in the syntax of attacks.parse_attack, or the protocol's set at
--norm/--eps/--steps/--eot.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from purifyguard.data import DATASETS
from purifyguard.evaluation.attacks import default_attacks, parse_attack
from purifyguard.evaluation.compare import GUIDANCE_VARIANTS, build_defences, compare
from purifyguard.evaluation.harness import evaluate
from purifyguard.evaluation.report import markdown_table
from purifyguard.option_types import positive_float, positive_int

logger = logging.getLogger(__name__)

COMMANDS = ("evaluate", "compare")
CLASSIFIER_CONFIG = "config.json"
CLASSIFIER_WEIGHTS = "model.safetensors"


def add_arguments(parser: argparse.ArgumentParser, command: str = "evaluate") -> None:
    """The options of `purifyguard evaluate` (command="evaluate") or `purifyguard compare`."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {command!r}")
    parser.set_defaults(evaluation_command=command)
    model = parser.add_argument_group("model")
    model.add_argument("--classifier", required=True,
                       help="timm model name (e.g. resnet10t, with --checkpoint or --pretrained), "
                            "a classifier folder (config.json + model.safetensors) or a bundled "
                            "classifier (fashion-mnist-resnet18)")
    model.add_argument("--checkpoint", help="the classifier's weights (.safetensors); a "
                       "config.json beside them (a purifyguard classifier folder) is used")
    model.add_argument("--pretrained", action="store_true", help="timm's pretrained weights")
    model.add_argument("--num-classes", type=positive_int, help="default: the data set's classes")
    model.add_argument("--in-chans", type=positive_int, help="default: the data set's channels")
    model.add_argument("--mean", type=float, nargs="+", help="normalisation mean (default: the "
                       "classifier folder's, else timm's)")
    model.add_argument("--std", type=float, nargs="+", help="normalisation std (default: the "
                       "classifier folder's, else timm's)")
    model.add_argument("--purifier", help="registered name, folder or Hub id; 'none': undefended")
    model.add_argument("--purifier-setting", action="append", default=[], metavar="KEY=VALUE",
                       help="change a purifier setting, e.g. t_star=20 or fixed_noise=true "
                            "(repeatable; true/false, none, numbers and strings)")
    model.add_argument("--n-samples", type=positive_int, default=1,
                       help="purifications averaged per call")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="fashion-mnist", choices=DATASETS,
                      help="the test split of this data set")
    data.add_argument("--data-root", help="folder of the data set (see purifyguard.data)")
    run = parser.add_argument_group("evaluation")
    run.add_argument("--attack", action="append", metavar="SPEC",
                     help='e.g. "pgd:eps=0.1,steps=200,eot=20" (repeatable; default: the '
                          "protocol's pgd, autoattack-rand, bpda, transfer, square)")
    run.add_argument("--norm", default="linf", choices=("linf", "l2"), help="for the default set")
    run.add_argument("--eps", type=positive_float, default=0.1, help="for the default set")
    run.add_argument("--steps", type=positive_int, default=200, help="for the default set")
    run.add_argument("--eot", type=positive_int, default=20, help="for the default set")
    run.add_argument("--queries", type=positive_int, default=5000,
                     help="square queries, default set")
    run.add_argument("--n", type=positive_int, default=512, help="test examples (the first n)")
    run.add_argument("--batch-size", type=positive_int, default=64)
    run.add_argument("--runs", type=positive_int, default=5, help="R purifications per verdict")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--output-dir", required=True, help="batches, report.json/.md, grids")
    run.add_argument("--no-resume", action="store_true", help="recompute finished batches")
    run.add_argument("--sanity", action="store_true", help="run the sanity checks too")
    run.add_argument("--sanity-n", type=positive_int,
                     help="examples for the sanity checks (default 64)")
    run.add_argument("--no-progress", action="store_true")
    if command == "compare":
        extra = parser.add_argument_group("compare")
        extra.add_argument("--robust-classifier", help="an adversarially trained classifier "
                           "(same input): timm name, classifier folder or bundled name")
        extra.add_argument("--robust-checkpoint", help="its weights (.safetensors)")
        extra.add_argument("--guidance", nargs="+", default=list(GUIDANCE_VARIANTS),
                           choices=GUIDANCE_VARIANTS, help="purifier variants to compare")
        extra.add_argument("--guidance-scale", action="append", default=[], metavar="MODE=S",
                           help="scale of one variant, e.g. pixel=1 (default: the purifier's "
                           "own scale, which suits only its own mode)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the command `add_arguments` set up; prints the Markdown table, returns the report.

    Problems with the options, the files they name or the data raise ValueError (or
    FileNotFoundError) with a message for the user; purifyguard's main prints it."""
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
    dataset = _test_split(args.dataset, args.data_root)
    first_image = dataset[0][0]
    classes = tuple(getattr(dataset, "classes", ()))
    in_chans = args.in_chans or first_image.shape[0]
    num_classes = args.num_classes or len(classes) or None
    classifier = load_classifier(args.classifier, args.checkpoint, args.pretrained, in_chans,
                                 num_classes)
    _check_fits(classifier, "--classifier", first_image.shape[0], len(classes), args.dataset)
    model = _purified_model(args, classifier, settings=purifier_settings)
    print(f"classifier {args.classifier}: input normalisation "
          f"{model.normalize.extra_repr()} ({model.normalization_source})")
    settings = {
        "n": args.n, "batch_size": args.batch_size, "runs": args.runs, "seed": args.seed,
        "output_dir": args.output_dir, "resume": not args.no_resume, "sanity": args.sanity,
        "sanity_n": args.sanity_n, "class_names": classes or None,
        "progress": not args.no_progress,
    }
    if args.evaluation_command == "evaluate":
        name = _model_name(args.classifier)
        name = name if model.purifier is None else f"{name}+purifier"
        report = evaluate(model, dataset, attacks, model_name=name, **settings)
    else:
        robust = None
        if args.robust_classifier:
            robust_classifier = load_classifier(
                args.robust_classifier, args.robust_checkpoint, False, in_chans, num_classes,
                option="--robust-classifier",
            )
            _check_fits(robust_classifier, "--robust-classifier", first_image.shape[0],
                        len(classes), args.dataset)
            robust = _purified_model(args, robust_classifier, purifier=False)
        report = compare(build_defences(model, robust, args.guidance, scales), dataset, attacks,
                         **settings)
    print(markdown_table(report))
    return report


def _test_split(name: str, root: str | None):
    """The data set's test split, or ValueError saying what is missing."""
    from purifyguard.data import load_dataset

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


def load_classifier(name: str, checkpoint: str | None = None, pretrained: bool = False,
                    in_chans: int | None = None, num_classes: int | None = None, *,
                    option: str = "--classifier") -> nn.Module:
    """The classifier the options name (see the module docstring), in eval mode on the CPU.

    A classifier folder brings its own architecture settings and normalisation (restored by
    purifyguard.hub.load_guidance_network); a bare checkpoint is loaded into
    timm.create_model(name, in_chans=..., num_classes=...)."""
    folder = _classifier_folder(name, checkpoint, option)
    if folder is not None:
        if pretrained:
            raise ValueError(f"--pretrained does not go with the classifier folder {folder}")
        return _from_folder(folder, checkpoint, option)
    return _timm_classifier(name, checkpoint, pretrained, in_chans, num_classes, option)


def _classifier_folder(name: str, checkpoint: str | None, option: str) -> Path | None:
    """The purifyguard classifier folder the options point at, if any."""
    from purifyguard.presets import ASSETS, CLASSIFIERS

    given = Path(name).expanduser()
    folder = given if given.is_dir() else (
        ASSETS / "classifiers" / name if name in CLASSIFIERS else None)
    if folder is not None:
        if checkpoint is not None:
            raise ValueError(
                f"{option} {name} is a classifier folder with its own weights; leave out the "
                "checkpoint option (or give a timm name with it)"
            )
        if _folder_config(folder) is None:
            raise ValueError(
                f"{option} {name}: the folder has no purifyguard classifier "
                f"{CLASSIFIER_CONFIG} (with \"library\": \"timm\", \"architecture\" and "
                f"\"kwargs\"); give a timm model name with a .safetensors checkpoint instead"
            )
        return folder
    if checkpoint is None:
        return None
    folder = Path(checkpoint).expanduser().parent
    config = _folder_config(folder)
    if config is None:
        if (folder / CLASSIFIER_CONFIG).is_file():
            logger.warning(
                "ignoring %s beside the checkpoint: it is not a purifyguard classifier config",
                folder / CLASSIFIER_CONFIG,
            )
        return None
    architecture = config["architecture"]
    if _base_architecture(name) != _base_architecture(architecture):
        raise ValueError(
            f"{option} {name!r} does not match the checkpoint's folder: {folder / CLASSIFIER_CONFIG} "
            f"describes a {architecture!r}; give {option} {architecture} (or the folder itself)"
        )
    return folder


def _folder_config(folder: Path) -> dict[str, Any] | None:
    """The folder's config.json when it is a purifyguard classifier config, else None."""
    from purifyguard.files import read_json

    path = folder / CLASSIFIER_CONFIG
    if not path.is_file():
        return None
    try:
        config = read_json(path, "classifier config")
    except ValueError as error:
        raise ValueError(f"{error}; a classifier folder's config.json must be intact") from None
    if config.get("library") != "timm" or not isinstance(config.get("architecture"), str):
        return None
    if not isinstance(config.get("kwargs", {}), dict):
        raise ValueError(f"classifier config {path}: \"kwargs\" must be a JSON object")
    return config


def _from_folder(folder: Path, checkpoint: str | None, option: str) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from purifyguard.hub import create_guidance_network, load_guidance_network

    weights = Path(checkpoint).expanduser() if checkpoint is not None else None
    if weights is not None:
        _check_checkpoint(weights, option)
    try:
        if weights is None or weights.name == CLASSIFIER_WEIGHTS:
            return load_guidance_network(folder).eval()
        config = _folder_config(folder)
        network = create_guidance_network(config["architecture"], **config.get("kwargs", {}))
        load_model(network, str(weights), strict=True, device="cpu")
        return network.eval()
    except (SafetensorError, RuntimeError, TypeError, KeyError) as error:
        raise ValueError(
            f"{option}: cannot load the classifier of {folder}: {_first_line(error)}"
        ) from None


def _timm_classifier(name: str, checkpoint: str | None, pretrained: bool, in_chans: int | None,
                     num_classes: int | None, option: str) -> nn.Module:
    import timm
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if checkpoint is None and not pretrained:
        raise ValueError(
            f"give the weights of {option} {name!r}: a .safetensors checkpoint (--checkpoint), "
            "--pretrained, or a classifier folder instead of the name"
        )
    if not timm.is_model(_base_architecture(name)):
        raise ValueError(
            f"{option} {name!r} is not a timm model name, a classifier folder or a bundled "
            "classifier (fashion-mnist-resnet18, fashion-mnist-resnet18-trades)"
        )
    extra = {} if num_classes is None else {"num_classes": num_classes}
    if in_chans is not None:
        extra["in_chans"] = in_chans
    classifier = timm.create_model(name, pretrained=pretrained, **extra)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        _check_checkpoint(path, option)
        try:
            classifier.load_state_dict(load_file(path))
        except (SafetensorError, RuntimeError, OSError, ValueError) as error:
            raise ValueError(
                f"checkpoint {path} does not load into timm {name!r} "
                f"({', '.join(f'{k}={v}' for k, v in extra.items())}): {_first_line(error)}"
            ) from None
    return classifier.eval()


def _check_checkpoint(path: Path, option: str) -> None:
    from purifyguard.hub import PICKLE_SUFFIXES

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"refusing the pickle checkpoint {path} of {option}: purifyguard loads safetensors "
            "only, because unpickling can run arbitrary code; re-save the weights with "
            "safetensors.torch.save_file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} of {option} does not exist")


def _check_fits(classifier: nn.Module, option: str, channels: int, n_classes: int,
                dataset: str) -> None:
    """The classifier takes the data set's images and predicts its classes."""
    from purifyguard.normalization import input_channels

    takes = input_channels(classifier)
    if takes is not None and takes != channels:
        raise ValueError(
            f"{option} takes {takes}-channel images, the {dataset} images have {channels}"
        )
    outputs = getattr(classifier, "num_classes", None)
    if n_classes and isinstance(outputs, int) and outputs != n_classes:
        raise ValueError(
            f"{option} predicts {outputs} classes, the {dataset} data set has {n_classes}: its "
            "labels would not match the classifier's outputs"
        )


def _purified_model(args: argparse.Namespace, classifier: nn.Module, purifier: Any = None,
                    settings: dict[str, Any] | None = None):
    from purifyguard.purified_model import PurifiedModel

    if purifier is None and args.purifier is not None:
        purifier = False if args.purifier.lower() == "none" else args.purifier
    model = PurifiedModel(classifier, purifier, mean=args.mean, std=args.std,
                          n_samples=args.n_samples)
    if model.purifier is not None and settings:
        try:
            model = model.with_purifier(model.purifier.with_settings(**settings))
        except ValueError as error:
            raise ValueError(f"--purifier-setting: {error}") from None
    return model


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


def _base_architecture(name: str) -> str:
    from timm.models import split_model_name_tag

    return split_model_name_tag(name)[0]


def _model_name(classifier: str) -> str:
    """The report's name for the classifier: a folder by its own name."""
    path = Path(classifier)
    return path.name if path.is_dir() or "/" in classifier or "\\" in classifier else classifier


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
