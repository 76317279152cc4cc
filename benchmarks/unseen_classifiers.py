"""Any classifier, without retraining (issue 23, item 4): the same purifier in front of standard
classifiers of other families that it never saw, clean and under attack, beside what TRADES
training of each classifier's architecture would cost on this machine.

    python benchmarks/unseen_classifiers.py --classifiers \\
        mobilenetv3=runs/unseen-mobilenetv3/final convnext=runs/unseen-convnext/final \\
        vit=runs/unseen-vit/final --data-root <fashion-mnist folder> \\
        --output-dir runs/unseen-classifiers
    python benchmarks/unseen_classifiers.py --classifiers resnet18=fashion-mnist-resnet18 \\
        --quick --output-dir /tmp/unseen-quick

Each --classifiers NAME=CLASSIFIER (a classifier folder with config.json and model.safetensors,
as `purifyguard train guidance --beta 0` exports it, or a bundled name) is measured three ways,
with the --purifier (default the bundled fashion-mnist-agdm; a folder or Hub id too) in front
through PurifiedModel:

Clean: bare and purified accuracy on the first --clean-n Fashion-MNIST test images (default all
10,000), one purification per image (the harness's clean verdict, run 0, seed --seed), and the
clean cost (bare minus purified, in points) with a 95% paired bootstrap interval and McNemar's
test (purifyguard.evaluation.paired). Batches are stored in the harness's format in
output-dir/clean, so a stopped run resumes.
Robust: the bare classifier and the purified model under --attack (default apgd-eot 20 x EOT 2,
L-inf 0.1) on the first --n test images, R = --runs purifications, seed --seed, through
purifyguard's harness into output-dir/robust (resumable; its report.json and report.md stay
there): mean over R, worst case, within 1 / 3 / 10 submissions, majority.
What TRADES would cost: a fresh network of each classifier's architecture (its timm name and
create_model kwargs, as `purifyguard train guidance` creates it) trained on this machine side by
side, step by step: plain steps (cross-entropy) and TRADES steps (the routine's trades_adversary
and trades_loss: beta 6, 10-step PGD at eps 0.1, step eps / 4, the bundled TRADES classifier's
recipe), --throughput-steps timed steps of each after --warmup-steps, at --train-batch-size on
real test images, augmented as the routine's --augment does. It reports images/s of both, their
ratio and the hours a TRADES run of --trades-steps x --train-batch-size (default 6,000 x 128,
the bundled recipe) would take at the measured rate. The steps are timed anew on each run, and
the machine's load average is kept beside them (other work slows them down).

Output: output-dir/unseen-classifiers.json (the command, purifier, attack, n, clean n, R, seed,
every figure per classifier, the throughput measurements with the machine they ran on and its
load) and the Markdown section printed at the end; unseen_classifiers_section() renders it from
the JSON. --quick checks the script end to end (4 images, a 1-step attack, R = 1, 1 timed
training step after 1 warm-up): it measures nothing.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from purifyguard.option_types import non_negative_int, positive_int
from purifyguard.provenance import portable_command
from purifyguard.threads import add_threads_argument, prefer_sleeping_threads, use_threads

RESULT_FILE = "unseen-classifiers.json"
# TRADES as the bundled fashion-mnist-resnet18-trades was trained (`purifyguard train guidance
# --beta 6 --pgd-steps 10 --eps 0.1`, step eps / 4, lr 0.1, --augment; docs/pretrained.md)
TRADES_RECIPE = {"beta": 6.0, "pgd_steps": 10, "eps": 0.1, "step_size": 0.025}
# The routine's optimizer (its SGD with Nesterov momentum and its default weight decay)
OPTIMIZER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True}
QUICK = {"n": 4, "clean_n": 4, "runs": 1, "attack": "apgd-eot:steps=1,eot=1,eps=0.1",
         "throughput_steps": 1, "warmup_steps": 1}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifiers", nargs="+", required=True, metavar="NAME=CLASSIFIER",
                        help="classifiers the purifier never saw: a classifier folder or a "
                             "bundled name each")
    parser.add_argument("--purifier", default="fashion-mnist-agdm",
                        help="registered name, folder or Hub id of the purifier in front")
    parser.add_argument("--data-root", help="Fashion-MNIST folder (default: purifyguard's search)")
    parser.add_argument("--clean-n", type=positive_int, default=10000,
                        help="test images of the clean accuracies (the first ones)")
    parser.add_argument("--n", type=positive_int, default=256,
                        help="test images attacked (the first ones)")
    parser.add_argument("--attack", default="apgd-eot:steps=20,eot=2,eps=0.1",
                        help='the attack, in the CLI syntax "kind:key=value,..."')
    parser.add_argument("--runs", type=positive_int, default=10, help="R purifications per verdict")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="images per batch of the clean and robust evaluations")
    parser.add_argument("--throughput-steps", type=positive_int, default=10,
                        help="timed training steps of each kind (plain, TRADES)")
    parser.add_argument("--warmup-steps", type=non_negative_int, default=2,
                        help="untimed training steps of each kind before them")
    parser.add_argument("--train-batch-size", type=positive_int, default=128,
                        help="batch of the timed steps and of the estimated TRADES run")
    parser.add_argument("--trades-steps", type=positive_int, default=6000,
                        help="optimizer steps of the estimated TRADES run")
    parser.add_argument("--output-dir", default="runs/unseen-classifiers")
    add_threads_argument(parser)
    parser.add_argument("--quick", action="store_true",
                        help="4 images, a 1-step attack, R = 1, 1 timed training step: checks "
                             "the script, measures nothing")
    return parser


# ----------------------------------------------------------------------------- the arguments

def check_arguments(args: argparse.Namespace):
    """{name: classifier} and the AttackSpec, after --quick's settings; SystemExit naming the
    option, the value and what was expected, before anything is loaded."""
    from benchmark_page import named_classifiers

    from purifyguard.evaluation.attacks import parse_attack

    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    sources = named_classifiers("--classifiers", args.classifiers)
    try:
        attack = parse_attack(args.attack)
    except ValueError as error:
        raise SystemExit(f"--attack {args.attack!r}: {error}") from None
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise SystemExit(f"--data-root {args.data_root}: expected a folder with the Fashion-MNIST "
                         "files, found none")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise SystemExit(f"--output-dir {args.output_dir}: expected a folder, it is a file")
    return sources, attack


def load_inputs(args: argparse.Namespace, sources: dict[str, str]):
    """(the test set, the purifier, {name: classifier}); SystemExit naming the option when one
    of them cannot be loaded or the test set is too small for --clean-n or --n."""
    from benchmark_page import load_classifier

    from purifyguard.data import load_dataset
    from purifyguard.registry import load_purifier

    try:
        purifier = load_purifier(args.purifier)
    except (ValueError, OSError) as error:
        raise SystemExit(f"--purifier {args.purifier}: {error}") from None
    classifiers = {}
    for name, source in sources.items():
        try:
            classifiers[name] = load_classifier(source)
        except (ValueError, OSError) as error:
            raise SystemExit(f"--classifiers '{name}={source}': {error}") from None
    test = load_dataset("fashion-mnist", args.data_root, train=False)
    for option, count in (("--clean-n", args.clean_n), ("--n", args.n)):
        if count > len(test):
            raise SystemExit(f"{option} {count}: expected at most the {len(test)} test images")
    return test, purifier, classifiers


# ----------------------------------------------------------------------------- the classifiers

def describe(classifier) -> dict[str, Any]:
    """Family (the timm model class), architecture (the timm name), the create_model kwargs
    that rebuild it and its parameter count."""
    from purifyguard.guidance_network_format import guidance_architecture

    architecture, kwargs = guidance_architecture(classifier)
    return {"family": type(classifier).__name__, "architecture": architecture, "kwargs": kwargs,
            "parameters": sum(parameter.numel() for parameter in classifier.parameters())}


def defended_models(classifiers: dict[str, Any], purifier) -> dict[str, Any]:
    """NAME-bare (no purifier) and NAME-purified (the purifier in front) for each classifier."""
    from purifyguard import PurifiedModel

    models = {}
    for name, classifier in classifiers.items():
        models[f"{name}-bare"] = PurifiedModel(classifier, purifier=False)
        models[f"{name}-purified"] = PurifiedModel(classifier, purifier)
    return models


# ----------------------------------------------------------------------------- clean

def clean_pass(models: dict[str, Any], images, labels, seed: int, batch_size: int,
               folder: Path, device) -> None:
    """One purification per image, batch by batch, stored in the harness's format (run.json,
    batches-0.jsonl: the harness's clean verdict with R = 1, the same seeds), so that a stopped
    run resumes and purifyguard.evaluation.paired reads the outcomes."""
    from tqdm.auto import tqdm

    from purifyguard.evaluation.example_selection import fingerprint
    from purifyguard.evaluation.harness import model_version
    from purifyguard.evaluation.seeds import derive_seed
    from purifyguard.evaluation.store import CLEAN, BatchStore, batch_key
    from purifyguard.evaluation.verdict import predictions

    store = BatchStore(folder)
    store.start({"seed": seed, "n": len(labels), "batch_size": batch_size, "runs": 1,
                 "data_fingerprint": fingerprint(images, labels)}, resume=True, is_main=True)
    store.load()
    batches = range(-(-len(labels) // batch_size))
    for name, model in models.items():
        model.to(device).eval()
        version = model_version(model)
        pending = [batch for batch in batches if batch_key(name, None, batch, version) not in store]
        for batch in tqdm(pending, desc=f"{name} | clean", unit="batch"):
            started = time.perf_counter()
            rows = slice(batch * batch_size, (batch + 1) * batch_size)
            x, y = images[rows].to(device), labels[rows]
            predicted = predictions(model, x, 1, derive_seed(seed, "verdict", CLEAN, batch))
            store.add({"key": batch_key(name, None, batch, version), "model": name,
                       "attack": CLEAN, "batch": batch,
                       "indices": [rows.start, rows.start + len(y)], "labels": y.tolist(),
                       "predictions": predicted.cpu().tolist(),
                       "seconds": time.perf_counter() - started})


def clean_figures(folder: Path, name: str, seed: int) -> dict[str, Any]:
    """Clean accuracy of NAME-bare and NAME-purified from the stored pass, and the clean cost
    (bare minus purified): a paired bootstrap of the per-image difference with its 95% interval,
    and McNemar's exact test."""
    from purifyguard.evaluation.paired import CLEAN, compare_stored, correct_table

    bare, purified = f"{name}-bare", f"{name}-purified"
    accuracy = {key: float(correct_table(folder, model, CLEAN)[1].float().mean())
                for key, model in (("bare", bare), ("purified", purified))}
    paired = compare_stored(folder, bare, purified, CLEAN, seed=seed)
    return {"n": paired["n"], **accuracy,
            "cost": {**paired["mean"], "mcnemar": paired["worst_case"]}}


# ----------------------------------------------------------------------------- robust

def robust_figures(report: dict[str, Any], name: str) -> dict[str, Any]:
    """The harness's clean and robust summaries (mean, worst case, within N, majority, 95%
    intervals) of NAME-bare and NAME-purified."""
    records = {record["model"]: record for record in report["records"]}
    return {key: {"clean_accuracy": records[f"{name}-{key}"]["clean_accuracy"],
                  "robust_accuracy": records[f"{name}-{key}"]["robust_accuracy"]}
            for key in ("bare", "purified")}


# ----------------------------------------------------------------------------- TRADES cost

def synchronize(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def training_step(model, optimizer, images, labels, robust: bool) -> None:
    """One optimizer step of `purifyguard train guidance --augment`: plain (cross-entropy) or
    TRADES (the routine's own adversary and loss, TRADES_RECIPE)."""
    import torch
    import torch.nn.functional as F

    from purifyguard.train import guidance as routine

    images = routine.augment(images)
    if robust:
        adversarial = routine.trades_adversary(model, images, TRADES_RECIPE["eps"],
                                               TRADES_RECIPE["pgd_steps"],
                                               TRADES_RECIPE["step_size"])
        clean, adv = model(torch.cat([images, adversarial])).chunk(2)
        loss, _ = routine.trades_loss(clean, adv, labels, TRADES_RECIPE["beta"])
    else:
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def training_throughput(architecture: str, kwargs: dict[str, Any], images, labels, steps: int,
                        warmup_steps: int, trades_steps: int, device,
                        on_step=None) -> dict[str, Any]:
    """Plain and TRADES training of a fresh network timm.create_model(architecture, **kwargs),
    side by side (a plain step, then a TRADES step, each timed): images/s of both, the TRADES
    step's cost in plain steps, and the hours of a TRADES run (and of a plain one) of
    `trades_steps` steps at the measured rates. on_step() is called after each pair of steps."""
    import torch

    from purifyguard.guidance_network_format import create_guidance_network

    torch.manual_seed(0)
    fresh = create_guidance_network(architecture, **kwargs)
    networks = {"plain": fresh, "trades": copy.deepcopy(fresh)}
    optimizers = {}
    for kind, network in networks.items():
        network.to(device).train()
        optimizers[kind] = torch.optim.SGD(network.parameters(), **OPTIMIZER)
    images, labels = images.to(device), labels.to(device)
    seconds: dict[str, list[float]] = {"plain": [], "trades": []}
    load_before = load_average()
    for step in range(warmup_steps + steps):
        for kind, network in networks.items():
            synchronize(device)
            started = time.perf_counter()
            training_step(network, optimizers[kind], images, labels, robust=kind == "trades")
            synchronize(device)
            if step >= warmup_steps:
                seconds[kind].append(time.perf_counter() - started)
        if on_step is not None:
            on_step()
    batch = len(labels)
    rates = {kind: steps * batch / sum(times) for kind, times in seconds.items()}
    return {
        "batch_size": batch, "steps": steps,
        "warmup_steps": warmup_steps, "recipe": TRADES_RECIPE, "optimizer": OPTIMIZER,
        "seconds_per_step": seconds,
        "plain_images_per_s": rates["plain"], "trades_images_per_s": rates["trades"],
        "trades_step_cost": rates["plain"] / rates["trades"],
        "trades_run_steps": trades_steps,
        "trades_run_hours": hours(trades_steps, batch, rates["trades"]),
        "plain_run_hours": hours(trades_steps, batch, rates["plain"]),
        "load_average": [load_before, load_average()],
    }


def hours(steps: int, batch: int, images_per_s: float) -> float:
    """Hours of `steps` optimizer steps of `batch` images at `images_per_s`."""
    return steps * batch / images_per_s / 3600


def load_average() -> float | None:
    """The machine's one-minute load average (None where the platform has none): other work
    slows the measured steps down."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def machine(device) -> dict[str, Any]:
    """What the throughput was measured on."""
    import torch
    from fashion_mnist import hardware

    return {"hardware": hardware(), "device": str(device), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}


# ----------------------------------------------------------------------------- the section

TABLE_HEADER = ["classifier", "family / architecture", "parameters", "clean bare %",
                "clean purified %", "clean cost, points [95% CI]", "robust bare %",
                "robust purified % (worst of R)", "TRADES step (x plain)",
                "TRADES run, hours"]


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def parameters_text(count: int) -> str:
    return f"{count / 1e6:.2f} M" if count >= 100_000 else f"{count / 1e3:.1f} k"


def table_row(row: dict[str, Any]) -> list[str]:
    cost = row["clean"]["cost"]
    low, high = cost["ci95"]
    robust = row["robust"]
    purified = robust["purified"]["robust_accuracy"]
    trades = row["trades_cost"]
    return [row["name"], f"{row['family']} / {row['architecture']}",
            parameters_text(row["parameters"]), percent(row["clean"]["bare"]),
            percent(row["clean"]["purified"]),
            f"{100 * cost['difference']:.1f} [{100 * low:.1f}, {100 * high:.1f}]",
            percent(robust["bare"]["robust_accuracy"]["mean"]),
            f"{percent(purified['mean'])} ({percent(purified['worst_case'])})",
            f"{trades['trades_step_cost']:.1f}x", f"{trades['trades_run_hours']:.1f}"]


def measurement_text(result: dict[str, Any]) -> str:
    """One paragraph naming what was measured: images, attack, iterations, EOT, eps, R, seed,
    whether the attack is reduced, and where the training steps were timed."""
    attack, machine_used = result["attack"], result["machine"]
    iterations = f"{attack['steps']} iteration{'' if attack['steps'] == 1 else 's'}"
    reduced = ""
    if attack["reduced"]:
        reduced = (" This is a **reduced** attack, below the protocol's reference"
                   + (", run on a CPU" if machine_used["device"] == "cpu" else "")
                   + ": read the robust figures as upper bounds.")
    throughput = result["throughput"]
    recipe = throughput["recipe"]
    return (
        f"The purifier {result['purifier']} in front of classifiers it never saw. Clean: the "
        f"first {result['clean_n']} Fashion-MNIST test images, one purification each (seed "
        f"{result['seed']}); the clean cost is bare minus purified, in points, with a 95% paired "
        f"bootstrap interval. Robust: {attack['name']} (L-{attack['norm'][1:]} eps "
        f"{attack['eps']:g}, {iterations} x EOT {attack['eot']}) on the first {result['n']} test "
        f"images, R = {result['runs']} purifications, seed {result['seed']}; the purified "
        f"model's mean over R, its worst case (right in all R runs) in parentheses.{reduced} TRADES: "
        f"{throughput['steps']} timed training steps (after {throughput['warmup_steps']} "
        f"warm-up) of a fresh network of each architecture at batch "
        f"{throughput['batch_size']}, plain and TRADES (beta {recipe['beta']:g}, "
        f"{recipe['pgd_steps']}-step PGD at eps {recipe['eps']:g}, step "
        f"{recipe['step_size']:g}) side by side on {machine_used['hardware']}; the run's hours "
        f"are {throughput['trades_run_steps']} steps x {throughput['batch_size']} at the measured "
        "TRADES rate.")


def unseen_classifiers_section(result: dict[str, Any]) -> str:
    """Markdown for a benchmark page: the paragraph saying what was measured, then one row per
    classifier."""
    lines = [measurement_text(result), "",
             "| " + " | ".join(TABLE_HEADER) + " |",
             "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(table_row(row)) + " |" for row in result["classifiers"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the run

def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    sources, attack = check_arguments(args)
    prefer_sleeping_threads()  # before torch loads
    import torch
    from tqdm.auto import tqdm

    from purifyguard.evaluation import evaluate_models
    from purifyguard.files import write_json

    use_threads(args.threads)
    test, purifier, classifiers = load_inputs(args, sources)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    output_dir = Path(args.output_dir)
    started = time.perf_counter()

    descriptions = {name: describe(classifier) for name, classifier in classifiers.items()}
    train_images, train_labels = test.tensors(args.train_batch_size)
    throughput = {}
    with tqdm(total=len(classifiers) * (args.warmup_steps + args.throughput_steps),
              desc="training steps (plain + TRADES)", unit="step") as bar:
        for name, description in descriptions.items():
            throughput[name] = training_throughput(
                description["architecture"], description["kwargs"], train_images, train_labels,
                args.throughput_steps, args.warmup_steps, args.trades_steps, device, bar.update)

    models = defended_models(classifiers, purifier)
    images, labels = test.tensors(args.clean_n)
    clean_pass(models, images, labels, args.seed, args.batch_size, output_dir / "clean", device)
    report = evaluate_models(models, test, [attack], n=args.n, batch_size=args.batch_size,
                             runs=args.runs, seed=args.seed, output_dir=output_dir / "robust")

    rows = [{"name": name, "source": sources[name], **descriptions[name],
             "clean": clean_figures(output_dir / "clean", name, args.seed),
             "robust": robust_figures(report, name), "trades_cost": throughput[name]}
            for name in classifiers]
    first = next(iter(throughput.values()))
    result = {
        "command": portable_command(
            "python benchmarks/unseen_classifiers.py "
            + shlex.join(sys.argv[1:] if argv is None else argv)),
        "quick": args.quick, "purifier": args.purifier, "classifiers": rows,
        "attack": attack.to_dict(), "n": args.n, "clean_n": args.clean_n, "runs": args.runs,
        "seed": args.seed, "batch_size": args.batch_size,
        "throughput": {key: first[key] for key in ("steps", "warmup_steps", "batch_size",
                                                   "recipe", "trades_run_steps")},
        "machine": machine(device), "date": time.strftime("%Y-%m-%d"),
        "seconds": time.perf_counter() - started,
    }
    write_json(output_dir / RESULT_FILE, result)
    print(unseen_classifiers_section(result))
    return result


if __name__ == "__main__":
    main()
