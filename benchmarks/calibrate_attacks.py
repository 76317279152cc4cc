"""Calibration of the attacks (issue 13, item 5): the primary attack (apgd-eot) against plain
PGD-EOT and AutoAttack-rand at the same budget of gradient evaluations per image, on the bundled
Fashion-MNIST defences, with the convergence curves.

    python benchmarks/calibrate_attacks.py                      # n=128, 40 gradient evaluations
    python benchmarks/calibrate_attacks.py --quick              # 4 images, 4 evaluations: a check
    python benchmarks/calibrate_attacks.py --defences undefended trades --budget 100 --eot 1

Budget: --budget gradient evaluations per image for each attack. PGD-EOT and APGD-EOT run
budget / eot iterations of eot draws; AutoAttack-rand (APGD-CE then APGD-DLR, start point
included) runs budget / (2 eot) - 1 iterations per loss, so it spends at most the same;
--with-bpda adds BPDA at budget / eot iterations (its gradients skip the purifier's backward).
APGD-EOT also spends its selection forward passes (in the record and the table).
Defences (as benchmarks/fashion_mnist.py builds them): undefended (the bundled classifier),
trades (the bundled TRADES classifier), diffpure (the bundled purifier, guidance "none"), ours
(fashion-mnist-agdm). Output: the harness's report (report.json, report.md, one
convergence-<defence>.png per defence) and calibration.md, the table for docs/evaluation.md, in
--output-dir, with paired tests on the same images (apgd-eot against each other attack; ours
against each other defence); finished batches are stored, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
from benchmark_page import paired_cells

from purifyguard import PurifiedModel, bundled_classifier, bundled_test_images
from purifyguard.evaluation import evaluate_models
from purifyguard.evaluation.attacks import AttackSpec
from purifyguard.evaluation.paired import compare_attacks_stored, compare_stored
from purifyguard.files import write_atomic
from purifyguard.registry import load_purifier

DEFENCES = ("undefended", "trades", "diffpure", "ours")
EPS = 0.1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128, help="test images (the first n bundled)")
    parser.add_argument("--budget", type=int, default=40,
                        help="gradient evaluations per image for each attack")
    parser.add_argument("--eot", type=int, default=1, help="draws per gradient iteration")
    parser.add_argument("--runs", type=int, default=10, help="R purifications per verdict")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--defences", nargs="+", choices=DEFENCES, default=list(DEFENCES))
    parser.add_argument("--with-em", action="store_true",
                        help="also run apgd-eot with DiffHammer-style EM weighting of the draws")
    parser.add_argument("--with-bpda", action="store_true",
                        help="also run BPDA (the purifier's backward taken as the identity) at the "
                             "same budget: what full gradients add over it")
    parser.add_argument("--quick", action="store_true",
                        help="4 images, budget 4, R = 2: checks that everything runs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--output-dir", default="runs/calibrate-attacks")
    return parser


def attack_specs(budget: int, eot: int, with_em: bool,
                 with_bpda: bool = False) -> list[AttackSpec]:
    steps = max(1, budget // eot)
    specs = [
        AttackSpec("apgd-eot", name="apgd-eot", eps=EPS, steps=steps, eot=eot),
        AttackSpec("pgd", name="pgd-eot", eps=EPS, steps=steps, eot=eot),
        AttackSpec("autoattack-rand", name="autoattack-rand", eps=EPS,
                   steps=max(1, budget // (2 * eot) - 1), eot=eot),
    ]
    if with_em:
        specs.append(AttackSpec("apgd-eot", name="apgd-eot-em", eps=EPS, steps=steps, eot=eot,
                                eot_weighting="em"))
    if with_bpda:
        specs.append(AttackSpec("bpda", name="bpda", eps=EPS, steps=steps, eot=eot))
    return specs


def build_defences(names: list[str]) -> dict[str, torch.nn.Module]:
    classifier = bundled_classifier()
    ours = load_purifier("fashion-mnist-agdm")
    makers = {
        "undefended": lambda: PurifiedModel(classifier, purifier=False),
        "trades": lambda: PurifiedModel(bundled_classifier("fashion-mnist-resnet18-trades"),
                                        purifier=False),
        "diffpure": lambda: PurifiedModel(classifier, ours.with_settings(guidance="none")),
        "ours": lambda: PurifiedModel(classifier, ours),
    }
    return {name: makers[name]() for name in names}


def calibration_table(report: dict) -> str:
    """One row per defence x attack: budget spent, robust accuracy (mean, worst, majority), the
    convergence curve's first and last value and its check."""
    settings = report["settings"]
    lines = [
        (f"n = {settings['n']}, R = {settings['runs']}, seed {settings['seed']}, L-inf eps = "
         f"{EPS}; robust accuracy in % (mean over runs [95% CI], worst case, majority vote); "
         "curve: robust accuracy on the crafting draws at the first and last iteration."),
        "",
        ("| defence | attack | grad. evals + selection fwd / image | robust mean [95% CI] "
         "| worst | majority | curve first -> last | converged |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for record in report["records"]:
        attack, robust = record["attack"], record["robust_accuracy"]
        low, high = robust["ci95_mean"]
        curve = record["convergence"]
        trend = (f"{100 * curve['robust_accuracy'][0]:.1f} -> "
                 f"{100 * curve['robust_accuracy'][-1]:.1f}") if curve else "n/a"
        converged = ("yes" if curve["check"]["passed"] else "**no**") if curve else "n/a"
        lines.append(
            f"| {record['model']} | {attack['name']} | {attack['gradient_evaluations']} + "
            f"{attack['selection_forward_passes']} | {100 * robust['mean']:.1f} "
            f"[{100 * low:.1f}, {100 * high:.1f}] | {100 * robust['worst_case']:.1f} "
            f"| {100 * robust['majority']:.1f} | {trend} | {converged} |"
        )
    return "\n".join(lines) + "\n"


def paired_table(output_dir: str | Path, report: dict) -> str:
    """Paired tests on the same images: apgd-eot against each other attack on every defence
    (negative: apgd-eot leaves less), then ours against each other defence under every attack."""
    defences = list(dict.fromkeys(record["model"] for record in report["records"]))
    attacks = list(dict.fromkeys(record["attack"]["name"] for record in report["records"]))
    rows = [(defence, f"apgd-eot vs {other}",
             compare_attacks_stored(output_dir, defence, "apgd-eot", other))
            for defence in defences for other in attacks if other != "apgd-eot"]
    rows += [(f"ours vs {other}", attack, compare_stored(output_dir, "ours", other, attack))
             for other in defences if "ours" in defences and other != "ours"
             for attack in attacks]
    lines = [
        ("Paired tests on the same images (purifyguard.evaluation.paired): the difference in mean "
         "robust accuracy, first minus second, with its 95% paired-bootstrap interval, and "
         "McNemar's exact test on the worst case."),
        "",
        ("| defence | attack | mean difference, points [95% CI] | p (bootstrap) "
         "| worst case: only first / only second | p (McNemar) |"),
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {defence} | {attack} | {paired_cells(item)}" for defence, attack, item in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.n, args.budget, args.runs, args.eot = 4, 4, 2, 1
    for name in ("n", "budget", "eot", "runs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    images, labels, _ = bundled_test_images()
    if args.n > len(labels):
        raise SystemExit(f"--n {args.n}: only {len(labels)} test images are bundled")
    started = time.perf_counter()
    report = evaluate_models(
        build_defences(args.defences), (images[:args.n], labels[:args.n]),
        attack_specs(args.budget, args.eot, args.with_em, args.with_bpda), n=args.n,
        batch_size=args.batch_size, runs=args.runs, seed=args.seed, output_dir=args.output_dir,
    )
    table = calibration_table(report) + "\n" + paired_table(args.output_dir, report)
    command = "python benchmarks/calibrate_attacks.py " + shlex.join(sys.argv[1:] if argv is None
                                                                      else argv)
    text = (f"{command}\n\n{table}\nwall time {time.perf_counter() - started:.0f} s, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}\n")
    write_atomic(Path(args.output_dir) / "calibration.md", text)
    print(text)


if __name__ == "__main__":
    main()
