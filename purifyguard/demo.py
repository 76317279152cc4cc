"""`purifyguard demo`: attack the bundled Fashion-MNIST classifier with and without a purifier.

Everything it needs ships with the package (weights and 512 test images), so it runs offline.
Three attacks, each named for what the attacker differentiates:
1. the undefended classifier under white-box PGD;
2. the purified model under the same adversarial images (crafted on the classifier alone, so
   the attacker ignores the purifier: a transfer attack, not an adaptive one);
3. the purified model under adaptive PGD with EOT and full gradients through purifier and
   classifier, the attack to trust, at a reduced setting so the demo stays short on a CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from purifyguard.evaluation.cli import add_device_argument, evaluation_device
from purifyguard.option_types import positive_float, positive_int
from purifyguard.presets import CLASSIFIERS

PICTURE_ROWS = 4  # images in demo.png


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classifier", default="fashion-mnist-resnet18",
                        choices=sorted(CLASSIFIERS), help="the bundled classifier to attack")
    parser.add_argument("--purifier", help="registered name, folder or Hub id (default: the "
                        "registered default for the classifier, fashion-mnist-agdm)")
    parser.add_argument("--eps", type=positive_float, default=0.1,
                        help="L-inf radius of the three attacks")
    parser.add_argument("--n", type=positive_int, default=256, help="images for attacks 1 and 2")
    parser.add_argument("--attack-steps", "--steps", dest="steps", metavar="N",
                        type=positive_int, default=20,
                        help="PGD steps of attacks 1 and 2 (--steps is the old name)")
    parser.add_argument("--adaptive-n", type=positive_int, default=16, help="images for attack 3")
    parser.add_argument("--adaptive-batch-size", type=positive_int, default=2,
                        help="images per batch of attack 3: its full-gradient graph through the "
                        "bundled purifier takes about 0.05 GiB per image (more with more steps "
                        "or a larger denoiser), so small batches keep the demo within 2 GiB")
    parser.add_argument("--adaptive-steps", type=positive_int, default=5,
                        help="PGD steps of attack 3")
    parser.add_argument("--eot", type=positive_int, default=1, help="EOT samples of attack 3")
    parser.add_argument("--runs", type=positive_int, default=2, help="R purifications per verdict")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attacks and purifications")
    parser.add_argument("--output-dir", default="purifyguard-demo",
                        help="folder of the reports, grids and demo.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the three attacks, print the table, write the picture; returns the table's rows."""
    from purifyguard.evaluation.attacks import REFERENCE_EOT, REFERENCE_STEPS, AttackSpec
    from purifyguard.evaluation.harness import evaluate
    from purifyguard.presets import bundled_classifier, bundled_test_images
    from purifyguard.purified_model import PurifiedModel

    started = time.perf_counter()
    device = evaluation_device(getattr(args, "device", None))
    images, labels, classes = bundled_test_images()
    defended = PurifiedModel(bundled_classifier(args.classifier), args.purifier)
    undefended = defended.with_purifier(None)
    config = defended.purifier.config
    print(f"classifier: bundled {args.classifier}; purifier: t*={config.t_star}, "
          f"{config.sampler} ({config.nfe} denoiser evaluations), guidance {config.guidance}")

    pgd = AttackSpec(kind="pgd", norm="linf", eps=args.eps, steps=args.steps, eot=1)
    adaptive = AttackSpec(kind="pgd", name="adaptive-pgd", norm="linf", eps=args.eps,
                          steps=args.adaptive_steps, eot=args.eot)
    transfer = AttackSpec(kind="transfer", norm="linf", eps=args.eps, steps=args.steps, eot=1)
    output = Path(args.output_dir)
    common = {"batch_size": args.batch_size, "seed": args.seed, "class_names": classes,
              "progress": not args.no_progress}
    if device is not None:
        common["device"] = device
    rows = [
        _row(evaluate(undefended, (images, labels), [pgd], n=args.n, runs=1,
                      model_name="undefended", output_dir=output / "undefended", **common),
             f"PGD-{args.steps}, white-box on the classifier (no defence to attack)"),
        _row(evaluate(defended, (images, labels), [transfer], n=args.n, runs=args.runs,
                      model_name="purified", output_dir=output / "transfer", **common),
             f"PGD-{args.steps} on the classifier only, then purified (transfer, not adaptive)"),
        _row(evaluate(defended, (images, labels), [adaptive], n=args.adaptive_n, runs=args.runs,
                      model_name="purified", output_dir=output / "adaptive",
                      **{**common, "batch_size": args.adaptive_batch_size}),
             f"adaptive PGD-{args.adaptive_steps} x EOT-{args.eot}, full gradient through "
             f"purifier + classifier (reduced from {REFERENCE_STEPS} x {REFERENCE_EOT})"),
    ]
    picture = save_picture(defended, transfer, images, labels, classes, output, args)
    print()
    print(table(rows, args.eps, args.runs, args.seed))
    if picture is not None:
        print(f"picture: {picture} (clean; adversarial, with the bare classifier's prediction; "
              "purified, with the defended model's)")
    print(f"reports: {output}/*/report.md and report.json; {time.perf_counter() - started:.0f} s")
    return rows


def save_picture(defended, spec, images, labels, classes, output: Path,
                 args: argparse.Namespace) -> Path | None:
    """demo.png from the transfer attack's first batch (PGD on the bare classifier, replayed on
    the purified model): clean | adversarial | purified. The adversarial image carries the bare
    classifier's prediction (the undefended model fooled), the purified image the defended
    model's (the classifier on that purification), so the picture shows what purification
    changes. It illustrates, it does not measure: the adaptive attack's row of the table is the
    robustness figure. None when no batch was kept."""
    from purifyguard.evaluation.adversarial_files import adversarial_path, load_adversarial
    from purifyguard.evaluation.grid import save_grid
    from purifyguard.evaluation.seeds import derive_seed

    folder = output / "transfer"
    path = adversarial_path(folder, "purified", spec.label)
    if not path.exists():
        return None
    adversarial = load_adversarial(path, folder, images)
    count = min(PICTURE_ROWS, len(adversarial))
    return save_grid(
        defended, images[:count], adversarial[:count], labels[:count], output / "demo.png",
        seed=derive_seed(args.seed, "grid", spec.label), class_names=classes,
        adversarial_prediction="bare",
        title=f"{args.classifier}, L-inf eps={args.eps:g}: PGD-{args.steps} on the bare "
              "classifier, then purified\n(transfer, not adaptive: the table's adaptive row is "
              "the figure to trust)",
    )


def _row(report: dict[str, Any], description: str) -> dict[str, Any]:
    record = report["records"][0]
    return {
        "model": record["model"], "attack": description, "n": record["n"],
        "clean": record["clean_accuracy"]["mean"], "robust": record["robust_accuracy"]["mean"],
        "ci95": record["robust_accuracy"]["ci95_mean"],
        "worst": record["robust_accuracy"]["worst_case"],
    }


def table(rows: list[dict[str, Any]], eps: float, runs: int, seed: int) -> str:
    lines = [
        (f"Fashion-MNIST test images, L-inf eps = {eps:g}, seed {seed}; purified verdicts are "
         f"the mean over R = {runs} purifications [95% Wilson interval], worst = right in all R."),
        "",
        "| model | attack | n | clean % | robust % [95% CI] | worst % |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        low, high = row["ci95"]
        lines.append(
            f"| {row['model']} | {row['attack']} | {row['n']} | {100 * row['clean']:.1f} | "
            f"{100 * row['robust']:.1f} [{100 * low:.1f}, {100 * high:.1f}] | "
            f"{100 * row['worst']:.1f} |"
        )
    return "\n".join(lines)
