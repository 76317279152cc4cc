"""The clean/robust front, not a point (issue 23, item 3): the front of TRADES classifiers beside
the front of our purifier over its own knobs, in one plot with 95% intervals, and where (if
anywhere) ours lies above the TRADES front.

    python benchmarks/fronts.py --sweeps runs/settings/settings.json \\
        runs/settings-2/settings.json --trades beta6=fashion-mnist-resnet18-trades \\
        beta1=<classifier folder> beta0=fashion-mnist-resnet18 \\
        --data-root <fashion-mnist folder> --output-dir runs/fronts

Ours: every row of the --sweeps files (settings.json of benchmarks/choose_settings.py; a file of
several rounds, {"rounds": [...]}, gives one sweep per round) is one point, labelled by its
change ("scale=800"; "class_weight=0.5,steps=5" around a --base centre). The sweeps must have
been measured on the same images under the same attack (n, seed, held-out split, attack): a file
that differs is refused, naming it.
TRADES: each --trades NAME=CLASSIFIER (a classifier folder with config.json and
model.safetensors, as `purifyguard train guidance` exports, or a bundled name; the standard
fashion-mnist-resnet18 is the beta = 0 end) is evaluated with no purifier by purifyguard's
harness on exactly the sweeps' held-out images, attack and seed, with the largest R among them,
into --output-dir (finished batches are stored, so a stopped run resumes).

Output: output-dir/fronts.json (every point with clean and robust accuracy, 95% Wilson intervals
on n images, the worst case, whether it is on its family's Pareto front, and the verdict) and
output-dir/fronts.png (clean accuracy across, robust accuracy up, error bars both ways, each
front as a line). The verdict, per point of ours: above the TRADES front when its robust
accuracy exceeds the front's, linearly interpolated at its clean accuracy; "above, beyond the
intervals" when its lower robust bound also exceeds the front's interpolated upper bound; no
verdict outside the TRADES front's clean range (nothing is extrapolated). A second verdict
judges the worst of R (the share of images robust in every purification: what an attacker who
may resubmit leaves) against the TRADES front's worst case, interpolated the same way (a TRADES
classifier is deterministic, so its worst case is its robust accuracy). fronts_section()
renders the same as Markdown for a benchmark page.
"""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from purifyguard.provenance import portable_command

FAMILIES = ("ours", "trades")
SWEEP_KEYS = ("attack", "n", "runs", "seed", "held_out", "settings")
# What must agree between sweeps for their points to share a plot.
SAME_MEASUREMENT = ("n", "seed", "held_out")
AS_SAVED = "as-saved"  # choose_settings.py's label of the centre without --base
ABOVE_BEYOND = "above, beyond the intervals"
ABOVE_WITHIN = "above, within the intervals"
ABOVE = "above"
ON = "on the TRADES front"
BELOW = "below"
OUTSIDE = "outside the TRADES front's clean range"
DEFAULT_PICTURE = "images/fronts-fashion-mnist.png"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweeps", nargs="+", required=True, metavar="FILE",
                        help="settings.json files of benchmarks/choose_settings.py (ours)")
    parser.add_argument("--trades", nargs="+", required=True, metavar="NAME=CLASSIFIER",
                        help="TRADES classifiers: a classifier folder or a bundled name each")
    parser.add_argument("--data-root", help="Fashion-MNIST folder (default: purifyguard's search)")
    parser.add_argument("--output-dir", default="runs/fronts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--picture", metavar="PNG",
                        help=f"also write the plot there (docs/{DEFAULT_PICTURE}: the picture "
                        "the benchmark page shows with fashion_mnist.py --fronts)")
    return parser


# ----------------------------------------------------------------------------- ours: the sweeps

def read_sweeps(paths: list[str]) -> list[dict[str, Any]]:
    """Every sweep of the files, in order (see sweeps_in_file)."""
    return [sweep for path in paths for sweep in sweeps_in_file(path)]


def sweeps_in_file(path: str) -> list[dict[str, Any]]:
    """The file's sweep, or one per round of a file of rounds ({"rounds": [...]}); each with its
    "source" (the file, and the round when there are several). SystemExit naming the file when
    it is missing or holds no sweep."""
    from purifyguard.files import read_json

    if not Path(path).is_file():
        raise SystemExit(f"--sweeps {path}: no such file")
    try:
        content = read_json(path, "settings file")
    except ValueError as error:
        raise SystemExit(f"--sweeps {path}: {error}") from None
    rounds = content.get("rounds", [content])
    sweeps = []
    for number, sweep in enumerate(rounds, start=1):
        source = path if len(rounds) == 1 else f"{path} (round {number})"
        missing = [key for key in SWEEP_KEYS if not isinstance(sweep, dict) or key not in sweep]
        if missing:
            raise SystemExit(f"--sweeps {source}: not a settings.json of choose_settings.py "
                             f"(missing {', '.join(missing)})")
        sweeps.append({**sweep, "source": source})
    return sweeps


def check_same_measurement(sweeps: list[dict[str, Any]]) -> None:
    """Refuse (SystemExit naming the file) a sweep measured on other images or under another
    attack than the first: n, seed, held-out split and the attack (as the harness tells attacks
    apart) must agree."""
    first = sweeps[0]
    first_attack = attack_from_sweep(first).identity()
    for sweep in sweeps[1:]:
        differences = [f"{key} {sweep[key]!r} against {first[key]!r}"
                       for key in SAME_MEASUREMENT if sweep[key] != first[key]]
        attack = attack_from_sweep(sweep).identity()
        differences += [f"attack {key} {attack.get(key)!r} against {first_attack.get(key)!r}"
                        for key in sorted(attack.keys() | first_attack.keys())
                        if attack.get(key) != first_attack.get(key)]
        if differences:
            raise SystemExit(
                f"--sweeps {sweep['source']}: measured otherwise than {first['source']} "
                f"({'; '.join(differences)}); points on one plot must share images and attack")


def attack_from_sweep(sweep: dict[str, Any]):
    """The sweep's attack as an AttackSpec (SystemExit naming the file when it cannot be
    rebuilt exactly)."""
    try:
        return attack_from_record(sweep["attack"])
    except (ValueError, TypeError, KeyError) as error:
        raise SystemExit(f"--sweeps {sweep['source']}: its attack cannot be rebuilt: "
                         f"{error}") from None


GRADIENT_MODE = re.compile(
    r"^(?:surrogate\((?P<sampler>[\w-]+), (?P<steps>\d+) steps\))?(?: \+ )?"
    r"(?:smooth substitute \((?P<activation>\w+), beta=(?P<beta>[^,]+), (?P<pool>\w+) pool\))?$")


def attack_from_record(record: dict[str, Any]):
    """The AttackSpec whose record (AttackSpec.to_dict, as settings.json stores it) is `record`;
    ValueError when the rebuilt attack's record differs from it in any key it holds."""
    from purifyguard.evaluation.attack_registry import APGD_KEYS
    from purifyguard.evaluation.attacks import AttackSpec

    settings = {key: record[key] for key in ("kind", "name", "norm", "eps", "steps", "eot",
                                              "random_start", "checkpointing") if key in record}
    settings.update({key: record[key] for key in (*APGD_KEYS, "n_queries")
                     if key != "step_schedule" and record.get(key) is not None})
    settings.update(gradient_settings(record.get("gradient_mode", "full")))
    if record.get("init"):
        settings.update(init=record["init"]["name"], init_steps=record["init"]["steps"])
    spec = AttackSpec(**settings)
    if record.get("step_size") is not None and spec.alpha != record["step_size"]:
        spec = spec.replace(step_size=record["step_size"])
    differences = differing_keys(record, spec.to_dict())
    if differences:
        raise ValueError(f"the rebuilt attack differs in {', '.join(differences)}")
    return spec


def gradient_settings(mode: str) -> dict[str, Any]:
    """AttackSpec fields from a record's gradient_mode (AttackSpec.gradient_mode's wording)."""
    if mode == "transfer from guidance network":
        return {"source": "guidance"}
    if mode in ("full", "bpda", "black-box", "transfer from undefended"):
        return {}
    match = GRADIENT_MODE.match(mode)
    if not match or not (match["sampler"] or match["activation"]):
        raise ValueError(f"unknown gradient_mode {mode!r}")
    settings: dict[str, Any] = {}
    if match["sampler"]:
        settings.update(gradient="surrogate", surrogate_sampler=match["sampler"],
                        surrogate_steps=int(match["steps"]))
    if match["activation"]:
        settings.update(substitute=match["activation"], substitute_beta=float(match["beta"]),
                        substitute_pool=match["pool"])
    return settings


def differing_keys(record: dict[str, Any], rebuilt: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys of `record` (nested ones as a.b) whose value `rebuilt` does not share; keys only
    `rebuilt` has (added to the record format since) do not count."""
    differences = []
    for key, value in record.items():
        if isinstance(value, dict) and isinstance(rebuilt.get(key), dict):
            differences += differing_keys(value, rebuilt[key], f"{prefix}{key}.")
        elif key not in rebuilt or rebuilt[key] != value:
            differences.append(f"{prefix}{key} ({value!r} recorded, {rebuilt.get(key)!r} rebuilt)")
    return differences


def setting_label(row: dict[str, Any], centre: str) -> str:
    """A row's setting as the options that make it: "scale=800" around the saved settings, the
    centre's options with the swept one changed around a --base centre."""
    if row["factor"] == "base":
        return row["value"]
    if centre == AS_SAVED:
        return f"{row['factor']}={row['value']}"
    options = dict(pair.partition("=")[::2] for pair in centre.split(","))
    options[row["factor"]] = row["value"]
    return ",".join(f"{option}={value}" for option, value in options.items())


def ours_points(sweeps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per row of every sweep, labelled by its setting (a repeated label gets #2...)."""
    points = []
    for sweep in sweeps:
        centre = next((row["value"] for row in sweep["settings"] if row["factor"] == "base"),
                      AS_SAVED)
        for row in sweep["settings"]:
            points.append(point("ours", setting_label(row, centre), row["clean_accuracy"],
                                row["robust_accuracy"], row["robust_worst_case"], sweep["n"],
                                sweep["runs"], sweep["source"]))
    return with_unique_labels(points)


def with_unique_labels(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, int] = {}
    for item in points:
        seen[item["label"]] = seen.get(item["label"], 0) + 1
        if seen[item["label"]] > 1:
            item["label"] = f"{item['label']} #{seen[item['label']]}"
    return points


def point(family: str, label: str, clean: float, robust: float, worst_case: float, n: int,
          runs: int, source: str) -> dict[str, Any]:
    """A point of the plot with 95% Wilson intervals on n images."""
    from purifyguard.evaluation.stats import wilson_interval

    return {"family": family, "label": label, "source": source, "n": n, "runs": runs,
            "clean_accuracy": clean, "clean_ci95": list(wilson_interval(clean, n)),
            "robust_accuracy": robust, "robust_ci95": list(wilson_interval(robust, n)),
            "robust_worst_case": worst_case}


# ----------------------------------------------------------------------------- TRADES: measured

def held_out(sweep: dict[str, Any], data_root: str | None):
    """The sweep's held-out training images (choose_settings.py's split)."""
    from choose_settings import held_out_images

    return held_out_images(argparse.Namespace(
        data_root=data_root, validation_size=sweep["held_out"]["size"],
        validation_seed=sweep["held_out"]["seed"]))


def measure_trades(sources: dict[str, str], sweep: dict[str, Any], runs: int,
                   args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each TRADES classifier, no purifier, on the sweep's first n held-out images under its
    attack, R and seed (the harness; finished batches stored in --output-dir)."""
    from benchmark_page import load_classifier

    from purifyguard import PurifiedModel
    from purifyguard.evaluation import evaluate_models

    models = {name: PurifiedModel(load_classifier(source), purifier=False)
              for name, source in sources.items()}
    report = evaluate_models(models, held_out(sweep, args.data_root), [attack_from_sweep(sweep)],
                             n=sweep["n"], batch_size=args.batch_size, runs=runs,
                             seed=sweep["seed"], output_dir=args.output_dir)
    records = {record["model"]: record for record in report["records"]}
    return [point("trades", name, records[name]["clean_accuracy"]["mean"],
                  records[name]["robust_accuracy"]["mean"],
                  records[name]["robust_accuracy"]["worst_case"], sweep["n"], runs, source)
            for name, source in sources.items()]


# ----------------------------------------------------------------------------- fronts, verdict

def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """a is at least as accurate as b clean and robust, and more accurate in one of the two."""
    at_least = (a["clean_accuracy"] >= b["clean_accuracy"]
                and a["robust_accuracy"] >= b["robust_accuracy"])
    better = (a["clean_accuracy"] > b["clean_accuracy"]
              or a["robust_accuracy"] > b["robust_accuracy"])
    return at_least and better


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point dominates, by clean accuracy (robust accuracy falls along it)."""
    front = [item for item in points if not any(dominates(other, item) for other in points)]
    return sorted(front, key=lambda item: (item["clean_accuracy"], -item["robust_accuracy"]))


def front_at(front: list[dict[str, Any]], clean: float, key: str) -> float | None:
    """`key` of the front (sorted by clean accuracy) interpolated linearly at `clean`; None
    outside the front's clean range. key: "robust_accuracy" or "robust_upper"."""
    values = [(item["clean_accuracy"], robust_value(item, key)) for item in front]
    inside = [value for at, value in values if at == clean]
    if inside:
        return max(inside)
    for (left, low), (right, high) in itertools.pairwise(values):
        if left < clean < right:
            return low + (high - low) * (clean - left) / (right - left)
    return None


def robust_value(item: dict[str, Any], key: str) -> float:
    return item["robust_ci95"][1] if key == "robust_upper" else item[key]


def verdict(ours: dict[str, Any], trades_front: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a point of ours lies against the TRADES front at its clean accuracy."""
    clean = ours["clean_accuracy"]
    front_robust = front_at(trades_front, clean, "robust_accuracy")
    if front_robust is None:
        return {"verdict": OUTSIDE, "trades_front_robust": None,
                "trades_front_robust_upper": None, "worst_case_verdict": OUTSIDE,
                "trades_front_worst_case": None}
    front_upper = front_at(trades_front, clean, "robust_upper")
    if ours["robust_accuracy"] > front_robust:
        place = ABOVE_BEYOND if ours["robust_ci95"][0] > front_upper else ABOVE_WITHIN
    else:
        place = ON if ours["robust_accuracy"] == front_robust else BELOW
    front_worst = front_at(trades_front, clean, "robust_worst_case")
    worst = ours["robust_worst_case"]
    worst_place = ABOVE if worst > front_worst else ON if worst == front_worst else BELOW
    return {"verdict": place, "trades_front_robust": front_robust,
            "trades_front_robust_upper": front_upper, "worst_case_verdict": worst_place,
            "trades_front_worst_case": front_worst}


def statement(ours: list[dict[str, Any]]) -> str:
    """One plain line: at how many of ours' settings (and which) it lies above the TRADES front."""
    above = [item["label"] for item in ours if item["verdict"] in (ABOVE_BEYOND, ABOVE_WITHIN)]
    beyond = [item["label"] for item in ours if item["verdict"] == ABOVE_BEYOND]
    outside = sum(item["verdict"] == OUTSIDE for item in ours)
    line = f"ours lies above the TRADES front at {len(above)} of {len(ours)} settings"
    if above:
        beyond_part = (f"{len(beyond)} beyond the intervals: {', '.join(beyond)}" if beyond
                       else "none beyond the intervals")
        line += f" ({', '.join(above)}; {beyond_part})"
    if outside:
        line += (f"; {outside} {'lies' if outside == 1 else 'lie'} outside the TRADES front's "
                 "clean range")
    worst_above = [item["label"] for item in ours if item["worst_case_verdict"] == ABOVE]
    line += (f"; judged by the worst of R (an attacker who may resubmit), at "
             f"{len(worst_above)} of {len(ours)}")
    if worst_above:
        line += f" ({', '.join(worst_above)})"
    return line


def fronts(ours: list[dict[str, Any]], trades: list[dict[str, Any]]) -> dict[str, Any]:
    """Both families with their Pareto fronts marked and ours' verdicts, and the statement."""
    front_of = {family: pareto_front(points) for family, points in
                (("ours", ours), ("trades", trades))}
    for family, points in (("ours", ours), ("trades", trades)):
        for item in points:
            item["on_front"] = any(item is member for member in front_of[family])
    for item in ours:
        item.update(verdict(item, front_of["trades"]))
    return {"points": [*ours, *trades],
            "fronts": {family: [item["label"] for item in front_of[family]]
                       for family in FAMILIES},
            "verdict": statement(ours)}


# ----------------------------------------------------------------------------- outputs

def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def interval(item: dict[str, Any], key: str) -> str:
    low, high = item[key.replace("accuracy", "ci95")]
    return f"{percent(item[key])} [{percent(low)}, {percent(high)}]"


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    """family, setting, clean % [CI], robust % [CI], worst %, front, verdict: one row a point."""
    return [[item["family"], item["label"], interval(item, "clean_accuracy"),
             interval(item, "robust_accuracy"), percent(item["robust_worst_case"]),
             "yes" if item["on_front"] else "", item.get("verdict", ""),
             item.get("worst_case_verdict", "")]
            for item in result["points"]]


TABLE_HEADER = ["family", "setting", "clean % [95% CI]", "robust % [95% CI]", "worst %",
                "on its front", "against the TRADES front", "worst % against its worst %"]


def measurement_line(result: dict[str, Any]) -> str:
    attack = result["attack"]
    held = result["held_out"]
    iterations = f"{attack['steps']} iteration{'' if attack['steps'] == 1 else 's'}"
    return (f"{attack['name']} (L-{attack['norm'][1:]} {attack['eps']:g}, {iterations} x EOT "
            f"{attack['eot']}) on the first {result['n']} of {held['size']} "
            f"held-out training images (split seed {held['seed']}), seed {result['seed']}")


def fronts_section(fronts: dict, picture: str = DEFAULT_PICTURE) -> list[str]:
    """Markdown for a benchmark page: the picture, the table and the statement (`picture`: the
    path of fronts.png as the page links it)."""
    lines = [
        f"![clean against robust accuracy: ours over its settings, TRADES over beta]({picture})",
        "",
        (f"Measured with {measurement_line(fronts)}; 95% Wilson intervals on {fronts['n']} "
         "images. A point of ours is above the TRADES front when its robust accuracy exceeds "
         "the front's, interpolated linearly at its clean accuracy, and above beyond the "
         "intervals when its lower bound exceeds the front's interpolated upper bound. The last "
         "column compares its worst of R (robust in every purification: what an attacker who "
         "may resubmit leaves) with the front's worst case the same way."),
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(fronts)]
    lines += ["", f"**{fronts['verdict'][0].upper()}{fronts['verdict'][1:]}.**"]
    return lines


def plot(result: dict[str, Any], path: Path) -> Path:
    """fronts.png: robust against clean accuracy with both intervals, each family's front as a
    line, every point labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5))
    for family, colour, marker in (("ours", "tab:blue", "o"), ("trades", "tab:red", "s")):
        points = [item for item in result["points"] if item["family"] == family]
        clean = [item["clean_accuracy"] for item in points]
        robust = [item["robust_accuracy"] for item in points]
        axes.errorbar(clean, robust, fmt=marker, color=colour, alpha=0.8, capsize=2,
                      elinewidth=0.8,
                      xerr=interval_arms(points, "clean"), yerr=interval_arms(points, "robust"),
                      label=f"{'ours (purifier settings)' if family == 'ours' else 'TRADES'}")
        front = sorted((item for item in points if item["on_front"]),
                       key=lambda item: item["clean_accuracy"])
        axes.plot([item["clean_accuracy"] for item in front],
                  [item["robust_accuracy"] for item in front], color=colour, linewidth=1.5,
                  label=f"{'ours' if family == 'ours' else 'TRADES'} front")
        for item in points:
            axes.annotate(item["label"], (item["clean_accuracy"], item["robust_accuracy"]),
                          textcoords="offset points", xytext=(4, 4), fontsize=6, color=colour)
    resubmitted = [item for item in result["points"]
                   if item["robust_worst_case"] < item["robust_accuracy"]]
    for item in resubmitted:
        axes.plot([item["clean_accuracy"]] * 2,
                  [item["robust_accuracy"], item["robust_worst_case"]],
                  color="tab:gray", linewidth=0.6, linestyle=":")
    if resubmitted:
        axes.plot([item["clean_accuracy"] for item in resubmitted],
                  [item["robust_worst_case"] for item in resubmitted], "o", color="tab:gray",
                  markerfacecolor="none", label="worst of R (an attacker who resubmits)")
    axes.set_xlabel("clean accuracy (held-out)")
    axes.set_ylabel("robust accuracy (mean over R; hollow: worst of R)")
    axes.set_title(measurement_line(result), fontsize=7)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def interval_arms(points: list[dict[str, Any]], measure: str) -> list[list[float]]:
    """Error-bar lengths below and above each point's accuracy (its 95% interval; never below
    zero, where rounding puts an accuracy of 1 a hair above the interval's end)."""
    accuracy, ci = f"{measure}_accuracy", f"{measure}_ci95"
    return [[max(0.0, item[accuracy] - item[ci][0]) for item in points],
            [max(0.0, item[ci][1] - item[accuracy]) for item in points]]


def print_table(result: dict[str, Any]) -> None:
    rows = [TABLE_HEADER, *table_rows(result)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(TABLE_HEADER))]
    print(measurement_line(result))
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(result["verdict"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    from benchmark_page import named_classifiers

    sources = named_classifiers("--trades", args.trades)
    sweeps = read_sweeps(args.sweeps)
    check_same_measurement(sweeps)
    import torch

    from purifyguard.files import write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    first = sweeps[0]
    runs = max(sweep["runs"] for sweep in sweeps)
    trades = measure_trades(sources, first, runs, args)
    result = {
        "command": portable_command(
            "python benchmarks/fronts.py "
            + shlex.join(sys.argv[1:] if argv is None else argv)),
        "sweeps": [sweep["source"] for sweep in sweeps], "trades": sources,
        "attack": first["attack"], "n": first["n"], "seed": first["seed"],
        "held_out": first["held_out"],
        **fronts(ours_points(sweeps), trades),
    }
    output_dir = Path(args.output_dir)
    write_json(output_dir / "fronts.json", result)
    plot(result, output_dir / "fronts.png")
    if args.picture:
        plot(result, Path(args.picture))
    print_table(result)
    return result


if __name__ == "__main__":
    main()
