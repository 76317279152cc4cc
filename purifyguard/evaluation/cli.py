"""`purifyguard evaluate` and `purifyguard compare`: the command-line front of evaluation.

The model: a timm classifier (--classifier NAME with --checkpoint FILE.safetensors, or
--pretrained) behind a purifier (--purifier: a registered name, a folder or a Hub repo id, "none"
for the bare classifier; default: the registered default for the classifier's input), with
optional purifier changes (--purifier-setting t_star=20). Attacks: --attack repeated, in the
syntax of attacks.parse_attack, or the protocol's set at --norm/--eps/--steps/--eot.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from torch import nn

from purifyguard.evaluation.attacks import default_attacks, parse_attack
from purifyguard.evaluation.compare import GUIDANCE_VARIANTS, build_defences, compare
from purifyguard.evaluation.harness import evaluate
from purifyguard.evaluation.report import markdown_table

COMMANDS = ("evaluate", "compare")


def add_arguments(parser: argparse.ArgumentParser, command: str = "evaluate") -> None:
    """The options of `purifyguard evaluate` (command="evaluate") or `purifyguard compare`."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {command!r}")
    parser.set_defaults(evaluation_command=command)
    model = parser.add_argument_group("model")
    model.add_argument("--classifier", required=True, help="timm model name, e.g. resnet10t")
    model.add_argument("--checkpoint", help="the classifier's weights (.safetensors)")
    model.add_argument("--pretrained", action="store_true", help="timm's pretrained weights")
    model.add_argument("--num-classes", type=int, help="default: the data set's classes")
    model.add_argument("--in-chans", type=int, help="default: the data set's channels")
    model.add_argument("--mean", type=float, nargs="+", help="normalisation mean (default: timm's)")
    model.add_argument("--std", type=float, nargs="+", help="normalisation std (default: timm's)")
    model.add_argument("--purifier", help="registered name, folder or Hub id; 'none': undefended")
    model.add_argument("--purifier-setting", action="append", default=[], metavar="KEY=VALUE",
                       help="change a purifier setting, e.g. t_star=20 (repeatable)")
    model.add_argument("--n-samples", type=int, default=1, help="purifications averaged per call")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="fashion-mnist",
                      help="fashion-mnist, cifar10, cifar100 or imagefolder (test split)")
    data.add_argument("--data-root", help="folder of the data set (see purifyguard.data)")
    run = parser.add_argument_group("evaluation")
    run.add_argument("--attack", action="append", metavar="SPEC",
                     help='e.g. "pgd:eps=0.1,steps=200,eot=20" (repeatable; default: the '
                          "protocol's pgd, autoattack-rand, bpda, transfer, square)")
    run.add_argument("--norm", default="linf", choices=("linf", "l2"), help="for the default set")
    run.add_argument("--eps", type=float, default=0.1, help="for the default set")
    run.add_argument("--steps", type=int, default=200, help="for the default set")
    run.add_argument("--eot", type=int, default=20, help="for the default set")
    run.add_argument("--queries", type=int, default=5000, help="square queries, default set")
    run.add_argument("--n", type=int, default=512, help="test examples (the first n)")
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--runs", type=int, default=5, help="R purifications per verdict")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--output-dir", required=True, help="batches, report.json/.md, grids")
    run.add_argument("--no-resume", action="store_true", help="recompute finished batches")
    run.add_argument("--sanity", action="store_true", help="run the sanity checks too")
    run.add_argument("--sanity-n", type=int, help="examples for the sanity checks (default 64)")
    run.add_argument("--no-progress", action="store_true")
    if command == "compare":
        extra = parser.add_argument_group("compare")
        extra.add_argument("--robust-classifier", help="timm name of an adversarially trained "
                                                       "classifier (same input)")
        extra.add_argument("--robust-checkpoint", help="its weights (.safetensors)")
        extra.add_argument("--guidance", nargs="+", default=list(GUIDANCE_VARIANTS),
                           choices=GUIDANCE_VARIANTS, help="purifier variants to compare")
        extra.add_argument("--guidance-scale", action="append", default=[], metavar="MODE=S",
                           help="scale of one variant, e.g. pixel=1 (default: the purifier's "
                           "own scale, which suits only its own mode)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the command `add_arguments` set up; prints the Markdown table, returns the report."""
    from purifyguard.data import load_dataset

    dataset = load_dataset(args.dataset, root=args.data_root, train=False)
    first_image = dataset[0][0]
    classes = tuple(getattr(dataset, "classes", ()))
    in_chans = args.in_chans or first_image.shape[0]
    num_classes = args.num_classes or len(classes) or None
    model = _purified_model(args, _classifier(args.classifier, args.checkpoint, args.pretrained,
                                              in_chans, num_classes))
    attacks = ([parse_attack(a) for a in args.attack] if args.attack else default_attacks(
        args.norm, args.eps, args.steps, args.eot, args.queries))
    settings = {
        "n": args.n, "batch_size": args.batch_size, "runs": args.runs, "seed": args.seed,
        "output_dir": args.output_dir, "resume": not args.no_resume, "sanity": args.sanity,
        "sanity_n": args.sanity_n, "class_names": classes or None,
        "progress": not args.no_progress,
    }
    if args.evaluation_command == "evaluate":
        name = args.classifier if model.purifier is None else f"{args.classifier}+purifier"
        report = evaluate(model, dataset, attacks, model_name=name, **settings)
    else:
        robust = None
        if args.robust_classifier:
            robust = _purified_model(args, _classifier(
                args.robust_classifier, args.robust_checkpoint, False, in_chans, num_classes
            ), purifier=False)
        scales = {mode: float(scale) for mode, scale in _settings(args.guidance_scale).items()}
        report = compare(build_defences(model, robust, args.guidance, scales), dataset, attacks,
                         **settings)
    print(markdown_table(report))
    return report


def _classifier(name: str, checkpoint: str | None, pretrained: bool, in_chans: int,
                num_classes: int | None) -> nn.Module:
    import timm
    from safetensors.torch import load_file

    if checkpoint is None and not pretrained:
        raise ValueError(f"give --checkpoint (or --pretrained) for the classifier {name!r}")
    extra = {} if num_classes is None else {"num_classes": num_classes}
    classifier = timm.create_model(name, pretrained=pretrained, in_chans=in_chans, **extra)
    if checkpoint is not None:
        classifier.load_state_dict(load_file(checkpoint))
    return classifier.eval()


def _purified_model(args: argparse.Namespace, classifier: nn.Module, purifier: Any = None):
    from purifyguard.purified_model import PurifiedModel

    if purifier is None and args.purifier is not None:
        purifier = False if args.purifier.lower() == "none" else args.purifier
    model = PurifiedModel(classifier, purifier, mean=args.mean, std=args.std,
                          n_samples=args.n_samples)
    if model.purifier is not None and args.purifier_setting:
        model = model.with_purifier(model.purifier.with_settings(**_settings(args.purifier_setting)))
    return model


def _settings(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; values are read as JSON where they parse (20, true, "ddim" or ddim)."""
    settings = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            settings[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key.strip()] = raw
    return settings
