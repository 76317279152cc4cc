"""The CIFAR-10 head-to-head: five defences, the same images, attacks and seeds (the protocol of
docs/evaluation.md, as benchmarks/fashion_mnist.py runs it), and docs/benchmarks-cifar10.md
written from the result.

    python benchmarks/cifar10.py --data-root <CIFAR-10 folder>             # reference budget (GPU)
    python benchmarks/cifar10.py --data-root <CIFAR-10 folder> --reduced   # 128 images x 20 x EOT 4
    python benchmarks/cifar10.py --data-root <folder> --reduced --guidance-scale 800 1600 3200 6400
    python benchmarks/cifar10.py --tiny --docs <page.md>     # random weights, minutes on a CPU
    python benchmarks/cifar10.py --from-json runs/benchmark-cifar10/benchmark.json

Defences, all in front of RobustBench's `Standard` WideResNet-28-10 except the second:
undefended; the TRADES classifier the guidance uses (RobustBench's Zhang2019Theoretically for
L-inf), no purifier; DiffPure-style (cifar10-agdm's denoiser and schedule, no guidance);
GDMP-style (guidance "pixel"); ours (cifar10-agdm).
Attacks, L-inf 8/255 or L2 0.5: APGD-EOT with full gradients (the primary), PGD-EOT at the same
budget beside it (step 0.007, or eps / 4 for L2), AutoAttack-rand and BPDA+EOT (PGD-EOT's step);
each verdict takes R purifications (10 by default, at least 5).

The headline (purifyguard.evaluation.headline) leads the page, as on the Fashion-MNIST page:
per defence and image the worst adversarial example over attacks of the run's threat model, run
cheap first, re-judged on R fresh purifications, with the accuracy within 1 / 3 / 10
submissions. --headline-attacks lists them as attack strings (default: fashion_mnist.py's list
at this run's eps, steps and EOT: transfer, transfer:source=guidance, feature, autoattack-rand,
apgd-eot, apgd-eot with substitute=smooth); those that craft on the guidance network run against
guided defences only. Stored in output-dir/headline-<name> (resumable) and in benchmark.json
("headline", "headline_paired": ours against each other defence); --no-headline skips it.

The guidance scale: without --guidance-scale ours uses its recipe's, and one value is used as
given; several are swept first, on --sweep-n held-out images of the CIFAR-10 training split
(purifyguard.data.validation_split, --validation-size and --validation-seed, as in
benchmarks/choose_settings.py), never on test images, under the primary attack at this run's
budget (report in output-dir/scale-sweep, resumable); ours then uses the scale with the highest
mean robust accuracy there (ties: the higher clean accuracy, then the first given).
benchmark.json's "scale_sweep" and the page show the sweep.

Budgets: the reference (512 images, 200 iterations x EOT 20, APGD 100 x EOT 20, R = 10; about 10
GPU-hours per purified defence for the attacks alone), --reduced (128 images, 20 iterations x
EOT 4, R = 10, marked reduced on the page) and --tiny (random weights built here, 4 images, 1
iteration, R = 2: checks the script, its figures mean nothing). --data-root is a CIFAR-10
folder: torchvision's cifar-10-batches-py (or the folder holding it), or a tree of the ten class
folders (e.g. a JPEG copy, reported as cifar10-jpeg; the sweep needs its train/ and test/
split). The run stores each finished batch in --output-dir and skips it when repeated;
benchmark.json holds the harness's report, the costs, the command and the hardware, and
--from-json rewrites the page from it alone.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from benchmark_page import cifar10_page, headline_comparisons
from fashion_mnist import (
    PRIMARY_ATTACKS,
    add_headline_arguments,
    checked_headline_attacks,
    default_headline_attacks,
    hardware,
    measure_costs,
    run_headlines,
)

from purifyguard import PurifiedModel, Purifier
from purifyguard.cifar10 import RECIPES, load_cifar10_purifier
from purifyguard.data import cifar10_label, cifar10_training_split, load_dataset, validation_split
from purifyguard.evaluation import evaluate_models
from purifyguard.evaluation.attacks import AttackSpec
from purifyguard.evaluation.seeds import derive_seed
from purifyguard.files import read_json, write_atomic, write_json
from purifyguard.provenance import portable_command


@dataclass(frozen=True)
class Budget:
    n: int
    steps: int  # APGD-EOT, PGD-EOT and BPDA iterations
    aa_steps: int  # APGD iterations per loss of AutoAttack-rand
    eot: int
    runs: int
    sweep_n: int  # held-out training images of the guidance-scale sweep


BUDGETS = {
    "reference": Budget(n=512, steps=200, aa_steps=100, eot=20, runs=10, sweep_n=128),
    "reduced": Budget(n=128, steps=20, aa_steps=20, eot=4, runs=10, sweep_n=128),
    "tiny": Budget(n=4, steps=1, aa_steps=1, eot=1, runs=2, sweep_n=4),
}
MIN_RUNS = 5  # the protocol's least R (docs/evaluation.md); the budgets take 10
TINY_DDIM_STEPS = 2
THREATS = {  # norm: (eps, PGD step size, recipe)
    "linf": (8 / 255, 0.007, "cifar10-agdm"),
    "l2": (0.5, 0.5 / 4, "cifar10-agdm-l2"),
}
CLASSIFIER = "robustbench:cifar10/Linf/Standard"  # RobustBench's WideResNet-28-10 (one checkpoint)
PRIMARY = PRIMARY_ATTACKS["apgd-eot"]
DEFENCES = {
    "undefended": "RobustBench's Standard WideResNet-28-10 alone",
    "trades": "the TRADES-trained guidance network as the classifier ({network}), no purifier",
    "diffpure": "DiffPure-style: google/ddpm-cifar10-32, noise to t*, denoise without guidance",
    "gdmp": "GDMP-style: guidance toward the input in pixel space (MSE), scale {pixel_scale:g}",
    "ours": "adversarial guidance in the TRADES network's features ({recipe}), scale {scale:g}",
}
DEFAULT_DOCS = "docs/benchmarks-cifar10.md"
SWEEP_FOLDER = "scale-sweep"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="CIFAR-10 folder: cifar-10-batches-py (or its "
                        "parent) or the ten class folders (under test/ or directly)")
    parser.add_argument("--download", action="store_true",
                        help="let torchvision download CIFAR-10 into --data-root when missing")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--reduced", action="store_true",
                        help="128 images x 20 iterations x EOT 4, marked reduced on the page")
    budget.add_argument("--tiny", action="store_true", help="random weights built here, a few "
                        "images, 1 iteration: checks the script; the figures mean nothing")
    parser.add_argument("--norm", choices=list(THREATS), default="linf",
                        help="threat model: L-inf 8/255 (cifar10-agdm) or L2 0.5 (cifar10-agdm-l2)")
    parser.add_argument("--n", type=int, help="test images (default: the budget's)")
    parser.add_argument("--steps", type=int, help="APGD-EOT, PGD-EOT and BPDA iterations")
    parser.add_argument("--aa-steps", type=int, help="APGD iterations of AutoAttack-rand")
    parser.add_argument("--eot", type=int, help="gradient samples per iteration, every attack")
    parser.add_argument("--runs", type=int, help=f"R purifications per verdict (>= {MIN_RUNS}; "
                        "default: the budget's, 10)")
    sweep = parser.add_argument_group("guidance scale of ours")
    sweep.add_argument("--guidance-scale", type=float, nargs="+", metavar="S",
                       help="one value: ours uses it; several: swept on held-out training images "
                       "under the primary attack, and ours uses the most robust (default: the "
                       "recipe's)")
    sweep.add_argument("--sweep-n", type=int, help="held-out training images of the sweep "
                       "(default: the budget's, 128)")
    sweep.add_argument("--validation-size", type=int, default=5000,
                       help="training images held out (class-stratified) to sweep on")
    sweep.add_argument("--validation-seed", type=int, default=0,
                       help="seed of the held-out split (purifyguard.data.validation_split)")
    add_headline_arguments(parser, "the run's threat model", "this run's eps, steps and EOT")
    parser.add_argument("--defences", nargs="+", choices=[*DEFENCES], default=[*DEFENCES],
                        help="the defences to run (default: all)")
    parser.add_argument("--pixel-scale", type=float, default=1.0,
                        help="guidance scale of the GDMP-style (pixel) defence")
    parser.add_argument("--robustbench-dir", help="robustbench's model folder (default: "
                        "$PURIFYGUARD_CACHE/robustbench)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--checkpointing", action="store_true",
                        help="purifiers recompute reverse steps in the backward (less memory)")
    parser.add_argument("--sanity", action="store_true", help="also run the sanity checks")
    parser.add_argument("--sanity-n", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--output-dir", default="runs/benchmark-cifar10")
    parser.add_argument("--docs", help=f"the page to write (default: {DEFAULT_DOCS}, except "
                        "with --tiny, which writes a page only when given one)")
    parser.add_argument("--from-json", metavar="BENCHMARK_JSON",
                        help="only rewrite the page from an earlier run's benchmark.json")
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """The budget's values for the settings not given, then every setting checked (ValueError
    naming the option, the value and what was expected)."""
    args.budget = "tiny" if args.tiny else "reduced" if args.reduced else "reference"
    budget = BUDGETS[args.budget]
    for name in ("n", "steps", "aa_steps", "eot", "runs", "sweep_n"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(budget, name))
    for name in ("n", "steps", "aa_steps", "eot", "batch_size", "runs", "sanity_n", "sweep_n",
                 "validation_size"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
    if args.validation_seed < 0:
        raise ValueError(f"--validation-seed must be an integer >= 0, got {args.validation_seed}")
    if not args.tiny and args.runs < MIN_RUNS:
        raise ValueError(f"--runs must be >= {MIN_RUNS} (the protocol's R), got {args.runs}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be an integer >= 1, got {args.threads}")
    check_guidance_scales(args)
    if args.data_root is None and not args.tiny:
        raise ValueError("--data-root is required (a CIFAR-10 folder), got none; only --tiny "
                         "runs without data")
    if args.data_root is not None and not Path(args.data_root).is_dir() and not args.download:
        raise ValueError(f"--data-root must be an existing folder, got {args.data_root!r} (or "
                         "pass --download to let torchvision fetch CIFAR-10 there)")
    if not args.no_headline:
        headline_specs(args)
    return args


def check_guidance_scales(args: argparse.Namespace) -> None:
    """--guidance-scale and --pixel-scale finite and >= 0, the swept scales distinct and the
    sweep only with ours among the defences; the recipe's scale when none is given."""
    recipe = RECIPES[THREATS[args.norm][2]]
    for name, values in (("guidance-scale", args.guidance_scale or []),
                         ("pixel-scale", [args.pixel_scale])):
        for value in values:
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"--{name} must be a finite number >= 0, got {value}")
    if args.guidance_scale and len(set(args.guidance_scale)) != len(args.guidance_scale):
        raise ValueError("--guidance-scale must list distinct scales to sweep, got "
                         f"{' '.join(f'{value:g}' for value in args.guidance_scale)}")
    if sweeping(args) and "ours" not in args.defences:
        raise ValueError("--guidance-scale with several values sweeps the scale of ours, but "
                         f"--defences {' '.join(args.defences)} leaves ours out; expected ours "
                         "among the defences, or one scale")
    args.scale_source = ("sweep" if sweeping(args) else "given" if args.guidance_scale
                         else "recipe")
    args.guidance_scale = args.guidance_scale or [recipe.guidance_scale]


def sweeping(args: argparse.Namespace) -> bool:
    """Whether ours' scale is chosen by the held-out sweep (several scales given)."""
    return len(args.guidance_scale or []) > 1


def attack_specs(args: argparse.Namespace) -> list[AttackSpec]:
    """The primary APGD-EOT, PGD-EOT at its budget, AutoAttack-rand and BPDA+EOT."""
    eps, step, _ = THREATS[args.norm]
    shared = {"norm": args.norm, "eps": eps, "eot": args.eot,
              "checkpointing": args.checkpointing}
    return [
        primary_spec(args),
        AttackSpec("pgd", name=PRIMARY_ATTACKS["pgd"], steps=args.steps, step_size=step, **shared),
        AttackSpec("autoattack-rand", name="autoattack-rand", steps=args.aa_steps, **shared),
        AttackSpec("bpda", name="bpda-eot", steps=args.steps, step_size=step, **shared),
    ]


def primary_spec(args: argparse.Namespace) -> AttackSpec:
    """APGD-EOT with full gradients at the run's budget (its own step schedule)."""
    return AttackSpec("apgd-eot", name=PRIMARY, norm=args.norm, eps=THREATS[args.norm][0],
                      steps=args.steps, eot=args.eot, checkpointing=args.checkpointing)


def headline_specs(args: argparse.Namespace) -> list[AttackSpec]:
    """--headline-attacks, or fashion_mnist.py's default list at this run's threat model, steps
    and EOT; ValueError for a bad string, repeated names or another threat model than --norm's."""
    eps = THREATS[args.norm][0]
    defaults = default_headline_attacks(args.steps, args.aa_steps, args.eot, norm=args.norm,
                                        eps=eps, checkpointing=args.checkpointing)
    specs = checked_headline_attacks(args.headline_attacks, defaults)
    given = (specs[0].norm, specs[0].eps)
    if given[0] != args.norm or not math.isclose(given[1], eps, rel_tol=1e-6):
        raise ValueError(f"--headline-attacks must attack this run's threat model (--norm "
                         f"{args.norm}, eps {eps:.6g}), got {given[0]} eps {given[1]:.6g}")
    return specs


def published_components(args: argparse.Namespace) -> tuple[nn.Module, Purifier]:
    """RobustBench's Standard WideResNet-28-10 and the registered purifier, with the published
    weights (downloaded on first use, as for any user)."""
    from purifyguard.adapters.robustbench import load_robustbench_model

    classifier = load_robustbench_model(CLASSIFIER, model_dir=args.robustbench_dir)
    purifier = load_cifar10_purifier(THREATS[args.norm][2], model_dir=args.robustbench_dir)
    return classifier, purifier


def tiny_components(args: argparse.Namespace) -> tuple[nn.Module, Purifier]:
    """Random weights of the same kinds: a shrunk google/ddpm-cifar10-32 UNet (same block types,
    same 1000-step linear schedule) and small CNN classifiers read, like RobustBench's
    WideResNets, through their last nn.Linear; the recipe's settings with 2 DDIM steps."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(args.seed)
    unet = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    settings = {**RECIPES[THREATS[args.norm][2]].settings(), "n_steps": TINY_DDIM_STEPS}
    purifier = Purifier(unet, scheduler, small_cnn(), **settings)
    return small_cnn(), purifier


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()


def defended(network: nn.Module, purifier: Purifier | bool) -> PurifiedModel:
    """A defence: RobustBench models normalise their [0, 1] input themselves, so no
    normalisation is added."""
    return PurifiedModel(network, purifier, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def build_defences(args: argparse.Namespace, classifier: nn.Module, purifier: Purifier,
                   scale: float) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The defences of --defences, ours at guidance scale `scale`, and what each is."""
    recipe = RECIPES[THREATS[args.norm][2]]
    defences = {
        "undefended": defended(classifier, False),
        "trades": defended(purifier.guidance_network, False),
        "diffpure": defended(classifier, purifier.with_settings(guidance="none")),
        "gdmp": defended(classifier, purifier.with_settings(guidance="pixel",
                                                            guidance_scale=args.pixel_scale)),
        "ours": defended(classifier, purifier.with_settings(guidance_scale=scale)),
    }
    texts = {"network": recipe.guidance_network, "pixel_scale": args.pixel_scale,
             "recipe": recipe.name, "scale": scale}
    defences = {name: model for name, model in defences.items() if name in args.defences}
    descriptions = {name: DEFENCES[name].format(**texts) for name in defences}
    if args.tiny:
        descriptions = {name: f"{text} (here: random weights of small stand-ins)"
                        for name, text in descriptions.items()}
    return defences, descriptions


def random_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n random images and labels (--tiny without data)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 32, 32, generator=generator)
    return images, torch.randint(0, 10, (n,), generator=generator)


def test_images(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first n test images, their labels and the name of the data they come from."""
    if args.data_root is None:  # --tiny without data
        return (*random_images(args.n, args.seed), "random-images")
    dataset = load_dataset("cifar10", args.data_root, train=False, download=args.download)
    pairs = [dataset[i] for i in range(min(args.n, len(dataset)))]
    images = torch.stack([image for image, _ in pairs])
    labels = torch.tensor([int(label) for _, label in pairs])
    return images, labels, cifar10_label(args.data_root, train=False)


def held_out_images(args: argparse.Namespace) -> tuple[Any, str]:
    """The sweep's data: the --validation-size training images that validation_split holds
    out (evaluate_models draws --sweep-n of them, class-stratified), never a test image; and
    its name. ValueError naming --validation-size when the training split is too small."""
    if args.data_root is None:  # --tiny without data: other random images than the test's
        return (random_images(args.sweep_n, derive_seed(args.seed, SWEEP_FOLDER)),
                "random-images")
    training = cifar10_training_split(args.data_root, download=args.download)
    try:
        held_out = validation_split(training, args.validation_size, args.validation_seed)[1]
    except ValueError as error:
        raise ValueError(f"--validation-size: {error}") from None
    return held_out, cifar10_label(args.data_root, train=True)


def scale_sweep(args: argparse.Namespace, data: tuple[Any, str], classifier: nn.Module,
                purifier: Purifier) -> dict[str, Any]:
    """Ours at every --guidance-scale on the held-out images under the primary attack (report
    in output-dir/scale-sweep, resumed when rerun); the rows and the chosen scale, also written
    to scale-sweep/sweep.json."""
    held_out, data_name = data
    models = {f"ours-s{scale:g}": defended(classifier, purifier.with_settings(guidance_scale=scale))
              for scale in args.guidance_scale}
    folder = Path(args.output_dir) / SWEEP_FOLDER
    report = evaluate_models(models, held_out, [primary_spec(args)], n=args.sweep_n,
                             batch_size=args.batch_size, runs=args.runs, seed=args.seed,
                             output_dir=folder, progress=not args.tiny)
    records = {record["model"]: record for record in report["records"]}
    rows = [{"scale": scale, "clean_accuracy": records[name]["clean_accuracy"],
             "robust_accuracy": records[name]["robust_accuracy"]}
            for scale, name in zip(args.guidance_scale, models)]
    sweep = {
        "data": data_name, "split": "train", "n": report["settings"]["n"],
        "held_out": None if args.data_root is None else {"size": args.validation_size,
                                                         "seed": args.validation_seed},
        "data_fingerprint": report["settings"]["data_fingerprint"], "runs": args.runs,
        "seed": args.seed, "attack": primary_spec(args).to_dict(), "rows": rows,
        "chosen": most_robust_scale(rows),
    }
    write_json(folder / "sweep.json", sweep)
    print(f"scale sweep: ours uses {sweep['chosen']:g}")
    return sweep


def most_robust_scale(rows: list[dict[str, Any]]) -> float:
    """The scale with the highest mean robust accuracy; ties go to the higher clean accuracy,
    then to the first listed."""
    best = max(rows, key=lambda row: (row["robust_accuracy"]["mean"],
                                      row["clean_accuracy"]["mean"]))
    return best["scale"]


def run(args: argparse.Namespace, test: tuple[torch.Tensor, torch.Tensor, str],
        held_out: tuple[Any, str] | None, command: str) -> dict:
    """The sweep (when several scales are given), then every defence on the test images, then
    the headline; benchmark.json's content (command: the command line as recorded, without the
    machine's folders)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    images, labels, data_name = test
    classifier, purifier = (tiny_components if args.tiny else published_components)(args)
    purifier = purifier.with_settings(checkpointing=args.checkpointing)
    started = time.perf_counter()
    sweep = None if held_out is None else scale_sweep(args, held_out, classifier, purifier)
    scale = args.guidance_scale[0] if sweep is None else sweep["chosen"]
    defences, descriptions = build_defences(args, classifier, purifier, scale)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    costs = measure_costs(defences, images[:args.batch_size], device,
                          repeats=1 if args.tiny else 2)
    report = evaluate_models(
        defences, (images, labels), attack_specs(args), n=len(labels),
        batch_size=args.batch_size, runs=args.runs, seed=args.seed, output_dir=args.output_dir,
        sanity=args.sanity, sanity_n=args.sanity_n, progress=not args.tiny,
    )
    benchmark = {
        "command": command,
        "budget": args.budget, "data": data_name, "norm": args.norm, "primary": PRIMARY,
        "hardware": hardware(), "date": time.strftime("%Y-%m-%d"),
        "settings": {"recipe": THREATS[args.norm][2],
                     **purifier.with_settings(guidance_scale=scale).current_config().to_dict()},
        "guidance_scale": {"value": scale, "source": args.scale_source},
        "scale_sweep": sweep, "costs": costs, "descriptions": descriptions, "report": report,
    }
    if not args.no_headline:
        benchmark["headline"] = run_headlines(args, defences, images, labels, device,
                                              headline_specs(args), progress=not args.tiny)
        benchmark["headline_paired"] = headline_comparisons(benchmark["headline"])
    benchmark["wall_seconds"] = time.perf_counter() - started
    return benchmark


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_json:
        benchmark = read_json(args.from_json, "benchmark results file")
    else:
        try:  # bad options and data are refused before any model loads
            resolve(args)
            test = test_images(args)
            held_out = held_out_images(args) if sweeping(args) else None
        except (ValueError, FileNotFoundError) as error:
            parser.error(str(error))
        benchmark = run(args, test, held_out, portable_command(
            "python benchmarks/cifar10.py " + shlex.join(sys.argv[1:] if argv is None else argv)))
        path = Path(args.output_dir) / "benchmark.json"
        write_json(path, benchmark)
        print(f"wrote {path}")
    page = cifar10_page(benchmark)
    print(page)
    docs = args.docs or (None if benchmark["budget"] == "tiny" else DEFAULT_DOCS)
    if docs:
        write_atomic(docs, page)
        print(f"wrote {docs}")


if __name__ == "__main__":
    main()
