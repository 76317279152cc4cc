"""Choose a purifier's settings under attack, on held-out training images (never the test set).

    python benchmarks/choose_settings.py --purifier <purifier folder> --classifier <classifier
        folder> --data-root <fashion-mnist folder> --n 128 --attack "apgd-eot:steps=20,eot=2" \\
        --t-star 100,200,300,400 --steps 2,5,10 --scale 0,100,400,1000 --output-dir runs/settings

One factor at a time around the purifier's own settings (a full grid costs the product of the
lists): every value of --t-star with the other settings as saved, then every value of --steps,
and so on. --base moves the centre: `--base t_star=200,steps=5` starts every setting from those
values instead of the saved ones (a second round around the first round's winners). A baseline
is tuned the same way from its own centre: `--base guidance=none --t-star 100,200,400` chooses
DiffPure-style's t*, `--base guidance=pixel,scale=1 --scale 0.25,0.5,2,4` GDMP-style's scale.
--samples and --aggregate sweep the defended model's own arguments (PurifiedModel's n_samples
and aggregate): `--base aggregate=vote --samples 4` is a deployed vote over 4 purifications
against one (the attack's EOT draws each run all of them). Each
setting is one defence (the classifier behind the purifier with that change), all evaluated by purifyguard's harness on the same images, attack, R purifications and seed.
The images are --n of the --validation-size held-out training images (class-stratified, the
split every training routine holds out with the same --validation-seed), so the settings are not
chosen on the test set that the benchmark reports.

Output: output-dir/report.json (the harness's report; finished batches are stored, so a run
that is stopped goes on where it stopped when repeated), output-dir/settings.json (clean and
robust accuracy per setting, the factor and value) and output-dir/settings-<factor>.png (clean
and robust accuracy against each factor). settings.json's "best" is the setting with the highest
mean robust accuracy (ties go to fewer steps, then to the higher clean accuracy). --quick checks
the script end to end on a few images.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from purifyguard.provenance import portable_command

FACTORS = {  # option: (PurifierConfig field, how a value is read)
    "t_star": ("t_star", int),
    "steps": ("n_steps", int),
    "scale": ("guidance_scale", float),
    "guidance_on": ("guidance_on", str),
    "distance": ("distance", str),
    "class_weight": ("class_weight", float),
    "guidance": ("guidance", str),
}
# PurifiedModel's own arguments, swept like the purifier's settings: purifications per answer
# and how they combine (the deployed vote of the plug-in defence issue)
MODEL_FACTORS = {"samples": ("n_samples", int), "aggregate": ("aggregate", str)}
FACTORS.update(MODEL_FACTORS)
KIND_NAMES = {int: "integers", float: "numbers", str: "names"}
BASE = "as-saved"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--purifier", default="fashion-mnist-agdm",
                        help="registered name, folder or Hub id of the purifier to tune")
    parser.add_argument("--classifier", default=None,
                        help="folder of the classifier behind it (default: the bundled one)")
    parser.add_argument("--data-root", help="Fashion-MNIST folder (default: purifyguard's search)")
    parser.add_argument("--validation-size", type=int, default=5000)
    parser.add_argument("--validation-seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=128, help="held-out images attacked")
    parser.add_argument("--attack", default="pgd:steps=20,eot=2,eps=0.1",
                        help='the attack, in the CLI syntax "kind:key=value,..."')
    parser.add_argument("--runs", type=int, default=5, help="R purifications per verdict")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    for option, (field, kind) in FACTORS.items():
        parser.add_argument(f"--{option.replace('_', '-')}", default="",
                            help=f"comma-separated values of {field} to try ({kind.__name__})")
    parser.add_argument("--base", default="",
                        help="comma-separated option=value pairs every setting starts from, e.g. "
                             "t_star=200,steps=5 (default: the settings as saved)")
    parser.add_argument("--output-dir", default="runs/settings")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--quick", action="store_true",
                        help="4 images, a 1-step attack, R = 1: checks the script, measures nothing")
    return parser


def read_value(option: str, raw: str) -> Any:
    """A value given on the command line, read as its factor's kind (SystemExit naming it)."""
    kind = FACTORS[option][1]
    try:
        return kind(raw)
    except ValueError:
        raise SystemExit(f"--{option.replace('_', '-')}: expected {KIND_NAMES[kind]}, "
                         f"got {raw!r}") from None


def base_change(args: argparse.Namespace) -> dict[str, Any]:
    """--base as a PurifierConfig change: {} for the settings as saved."""
    change = {}
    for pair in filter(None, (item.strip() for item in args.base.split(","))):
        option, _, raw = pair.partition("=")
        option = option.strip().replace("-", "_")
        if option not in FACTORS or not raw.strip():
            raise SystemExit(f"--base: expected option=value with option one of "
                             f"{', '.join(FACTORS)}, got {pair!r}")
        change[FACTORS[option][0]] = read_value(option, raw.strip())
    return change


def sweep(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """(factor, value as given, PurifierConfig change) for every setting tried, the centre (the
    purifier as saved, or --base) first."""
    centre = base_change(args)
    settings = [("base", args.base.replace(" ", "") or BASE, centre)]
    for option in FACTORS:
        for raw in filter(None, (item.strip() for item in getattr(args, option).split(","))):
            settings.append((option, raw, {**centre, FACTORS[option][0]: read_value(option, raw)}))
    return settings


def best_setting(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row with the highest mean robust accuracy; ties go to the fewer denoiser calls
    (sampler steps times purifications per answer), then to the higher clean accuracy."""
    return max(rows, key=lambda row: (row["robust_accuracy"],
                                      -row["settings"]["n_steps"]
                                      * row["settings"].get("n_samples", 1),
                                      row["clean_accuracy"]))


def held_out_images(args: argparse.Namespace):
    from purifyguard.data import load_dataset, validation_split

    training = load_dataset("fashion-mnist", args.data_root, train=True)
    return validation_split(training, args.validation_size, args.validation_seed)[1]


def build_defences(args, settings) -> dict[str, torch.nn.Module]:
    from purifyguard import PurifiedModel, bundled_classifier
    from purifyguard.guidance_network_format import load_guidance_network
    from purifyguard.registry import load_purifier

    classifier = (bundled_classifier() if args.classifier is None
                  else load_guidance_network(Path(args.classifier)))
    purifier = load_purifier(args.purifier)
    model_fields = {field for field, _ in MODEL_FACTORS.values()}
    defences = {}
    for factor, raw, change in settings:
        model_change = {key: value for key, value in change.items() if key in model_fields}
        purifier_change = {key: value for key, value in change.items() if key not in model_fields}
        try:
            defences[f"{factor}={raw}"] = PurifiedModel(
                classifier, purifier.with_settings(**purifier_change), **model_change)
        except ValueError as error:
            raise SystemExit(f"--{factor.replace('_', '-')} {raw}: {error}") from None
    return defences


def setting_values(model: torch.nn.Module) -> dict[str, Any]:
    """Every swept field's value in one defence: the purifier's settings and the model's own."""
    config = model.purifier.current_config()
    return {field: getattr(model if (field, kind) in MODEL_FACTORS.values() else config, field)
            for field, kind in FACTORS.values()}


def summarise(report: dict[str, Any], settings, defences) -> list[dict[str, Any]]:
    """One row per setting: factor, value, its sampler steps, clean and robust accuracy (mean and
    worst case)."""
    records = {record["model"]: record for record in report["records"]}
    rows = []
    for factor, raw, change in settings:
        record = records[f"{factor}={raw}"]
        rows.append({
            "factor": factor, "value": raw, "change": change,
            "settings": setting_values(defences[f"{factor}={raw}"]),
            "clean_accuracy": record["clean_accuracy"]["mean"],
            "robust_accuracy": record["robust_accuracy"]["mean"],
            "robust_worst_case": record["robust_accuracy"]["worst_case"],
        })
    return rows


def plot(rows: list[dict[str, Any]], output_dir: Path, label: str) -> list[Path]:
    """settings-<factor>.png: clean, robust (mean) and worst-case accuracy against each swept
    factor, the centre's own value among the points (a ring marks it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(row for row in rows if row["factor"] == "base")
    written = []
    for factor in dict.fromkeys(row["factor"] for row in rows if row["factor"] != "base"):
        field = FACTORS[factor][0]
        chosen = sorted([base, *(row for row in rows if row["factor"] == factor)],
                        key=lambda row: row["settings"][field])
        positions = range(len(chosen))
        centre = chosen.index(base)
        figure, axes = plt.subplots(figsize=(5, 3.2))
        for key, name in (("clean_accuracy", "clean"), ("robust_accuracy", "robust (mean)"),
                          ("robust_worst_case", "robust (worst case)")):
            line, = axes.plot(positions, [row[key] for row in chosen], marker="o", label=name)
            axes.plot([centre], [base[key]], marker="o", markersize=12, fillstyle="none",
                      color=line.get_color())
        axes.set_xticks(list(positions), [str(row["settings"][field]) for row in chosen])
        axes.set_xlabel(f"{factor} (ring: {base['value']})")
        axes.set_ylabel("accuracy (held-out)")
        axes.set_title(label, fontsize=8)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        figure.tight_layout()
        path = output_dir / f"settings-{factor}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from purifyguard.evaluation import evaluate_models
    from purifyguard.evaluation.attacks import parse_attack
    from purifyguard.files import write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.n, args.runs, args.attack = 4, 1, "pgd:steps=1,eot=1,eps=0.1"
    try:
        attack = parse_attack(args.attack)
    except ValueError as error:
        raise SystemExit(f"--attack: {error}") from None
    settings = sweep(args)
    defences = build_defences(args, settings)
    output_dir = Path(args.output_dir)
    started = time.perf_counter()
    report = evaluate_models(defences, held_out_images(args), [attack], n=args.n,
                             batch_size=args.batch_size, runs=args.runs, seed=args.seed,
                             output_dir=output_dir)
    rows = summarise(report, settings, defences)
    label = (f"{attack.label}: {attack.steps} it. x EOT {attack.eot}, eps {attack.eps}; "
             f"{args.n} held-out images, R = {args.runs}")
    write_json(output_dir / "settings.json", {
        "command": portable_command(
            "python benchmarks/choose_settings.py "
            + shlex.join(sys.argv[1:] if argv is None else argv)),
        "purifier": args.purifier, "attack": attack.to_dict(), "n": args.n, "runs": args.runs,
        "seed": args.seed, "held_out": {"size": args.validation_size,
                                        "seed": args.validation_seed},
        "seconds": time.perf_counter() - started, "settings": rows,
        "best": best_setting(rows),
    })
    plot(rows, output_dir, label)
    print(f"{'setting':24s} {'clean':>7s} {'robust':>7s} {'worst':>7s}   ({label})")
    for row in rows:
        print(f"{row['factor'] + '=' + row['value']:24s} {row['clean_accuracy']:7.3f} "
              f"{row['robust_accuracy']:7.3f} {row['robust_worst_case']:7.3f}")
    best = best_setting(rows)
    print(f"best under attack: {best['factor']}={best['value']} (change {best['change']})")


if __name__ == "__main__":
    main()
