"""The CIFAR-10 head-to-head: five defences, the same images, attacks and seeds (the protocol of
docs/evaluation.md), and docs/benchmarks-cifar10.md written from the result.

    python benchmarks/cifar10.py --data-root <CIFAR-10 folder>             # reference budget (GPU)
    python benchmarks/cifar10.py --data-root <CIFAR-10 folder> --reduced   # 128 images x 20 x EOT 4
    python benchmarks/cifar10.py --data-root <folder> --reduced --guidance-scale 800 1600 3200 6400
    python benchmarks/cifar10.py --tiny --docs <page.md>     # random weights, a minute on a CPU
    python benchmarks/cifar10.py --from-json runs/benchmark-cifar10/benchmark.json

Defences, all in front of RobustBench's `Standard` WideResNet-28-10 except the second:
undefended; the TRADES classifier the guidance uses (RobustBench's Zhang2019Theoretically for
L-inf), no purifier; DiffPure-style (cifar10-agdm's denoiser and schedule, no guidance);
GDMP-style (guidance "pixel"); ours (cifar10-agdm). Several --guidance-scale values give one
"ours-s<scale>" row each: the sweep that the guidance scale still needs (docs/cifar10.md).
Attacks: PGD-EOT with full gradients (the primary), AutoAttack-rand and BPDA+EOT, L-inf 8/255
(step 0.007) or L2 0.5 (step eps / 4); each verdict takes R >= 5 purifications.

Budgets: the reference (512 images, 200 iterations x EOT 20, APGD 100 x EOT 20; about 10
GPU-hours per purified defence), --reduced (128 images, 20 iterations x EOT 4, marked reduced on
the page) and --tiny (random weights built here, 4 images, 1 iteration: checks the script, its
figures mean nothing). --data-root is a CIFAR-10 folder: torchvision's cifar-10-batches-py (or
the folder holding it), or a tree of the ten class folders (e.g. a JPEG copy, reported as
cifar10-jpeg). The run stores each finished batch in --output-dir and skips it when repeated;
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

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from benchmark_page import attacks_section, results_section, sanity_section
from fashion_mnist import hardware, images_per_second

from purifyguard import PurifiedModel, Purifier
from purifyguard.cifar10 import RECIPES, load_cifar10_purifier
from purifyguard.data import cifar10_label, load_dataset
from purifyguard.evaluation import evaluate_models
from purifyguard.evaluation.attacks import AttackSpec
from purifyguard.files import read_json, write_atomic, write_json


@dataclass(frozen=True)
class Budget:
    n: int
    steps: int  # PGD-EOT and BPDA iterations
    aa_steps: int  # APGD iterations per loss of AutoAttack-rand
    eot: int
    runs: int


BUDGETS = {
    "reference": Budget(n=512, steps=200, aa_steps=100, eot=20, runs=5),
    "reduced": Budget(n=128, steps=20, aa_steps=20, eot=4, runs=5),
    "tiny": Budget(n=4, steps=1, aa_steps=1, eot=1, runs=2),
}
MIN_RUNS = 5  # the protocol's R
TINY_DDIM_STEPS = 2
THREATS = {  # norm: (eps, PGD step size, recipe)
    "linf": (8 / 255, 0.007, "cifar10-agdm"),
    "l2": (0.5, 0.5 / 4, "cifar10-agdm-l2"),
}
CLASSIFIER = "robustbench:cifar10/Linf/Standard"  # RobustBench's WideResNet-28-10 (one checkpoint)
PRIMARY = "pgd-eot"
DEFENCES = {
    "undefended": "RobustBench's Standard WideResNet-28-10 alone",
    "trades": "the TRADES-trained guidance network as the classifier ({network}), no purifier",
    "diffpure": "DiffPure-style: google/ddpm-cifar10-32, noise to t*, denoise without guidance",
    "gdmp": "GDMP-style: guidance toward the input in pixel space (MSE), scale {pixel_scale:g}",
    "ours": "adversarial guidance in the TRADES network's features ({recipe}), scale {scale:g}",
}
DEFAULT_DOCS = "docs/benchmarks-cifar10.md"


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
    parser.add_argument("--steps", type=int, help="PGD-EOT and BPDA iterations")
    parser.add_argument("--aa-steps", type=int, help="APGD iterations of AutoAttack-rand")
    parser.add_argument("--eot", type=int, help="gradient samples per iteration, every attack")
    parser.add_argument("--runs", type=int, help=f"R purifications per verdict (>= {MIN_RUNS})")
    parser.add_argument("--guidance-scale", type=float, nargs="+", metavar="S",
                        help="guidance scale(s) of ours (default: the recipe's, not yet swept); "
                        "several values give one row each")
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
    for name in ("n", "steps", "aa_steps", "eot", "runs"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(budget, name))
    for name in ("n", "steps", "aa_steps", "eot", "batch_size", "runs", "sanity_n"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
    if not args.tiny and args.runs < MIN_RUNS:
        raise ValueError(f"--runs must be >= {MIN_RUNS} (the protocol's R), got {args.runs}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be an integer >= 1, got {args.threads}")
    recipe = RECIPES[THREATS[args.norm][2]]
    args.guidance_scale = args.guidance_scale or [recipe.guidance_scale]
    for name, values in (("guidance-scale", args.guidance_scale),
                         ("pixel-scale", [args.pixel_scale])):
        for value in values:
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"--{name} must be a finite number >= 0, got {value}")
    if args.data_root is None and not args.tiny:
        raise ValueError("--data-root is required (a CIFAR-10 folder), got none; only --tiny "
                         "runs without data")
    if args.data_root is not None and not Path(args.data_root).is_dir() and not args.download:
        raise ValueError(f"--data-root must be an existing folder, got {args.data_root!r} (or "
                         "pass --download to let torchvision fetch CIFAR-10 there)")
    return args


def attack_specs(args: argparse.Namespace) -> list[AttackSpec]:
    eps, step, _ = THREATS[args.norm]
    shared = {"norm": args.norm, "eps": eps, "eot": args.eot,
              "checkpointing": args.checkpointing}
    return [
        AttackSpec("pgd", name=PRIMARY, steps=args.steps, step_size=step, **shared),
        AttackSpec("autoattack-rand", name="autoattack-rand", steps=args.aa_steps, **shared),
        AttackSpec("bpda", name="bpda-eot", steps=args.steps, step_size=step, **shared),
    ]


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


def build_defences(args: argparse.Namespace, classifier: nn.Module,
                   purifier: Purifier) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The defences and what each is; RobustBench models normalise their [0, 1] input
    themselves, so no normalisation is added."""
    purifier = purifier.with_settings(checkpointing=args.checkpointing)
    recipe = RECIPES[THREATS[args.norm][2]]

    def defended(network: nn.Module, chosen: Purifier | bool) -> PurifiedModel:
        return PurifiedModel(network, chosen, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    defences = {
        "undefended": defended(classifier, False),
        "trades": defended(purifier.guidance_network, False),
        "diffpure": defended(classifier, purifier.with_settings(guidance="none")),
        "gdmp": defended(classifier, purifier.with_settings(guidance="pixel",
                                                            guidance_scale=args.pixel_scale)),
    }
    texts = {"network": recipe.guidance_network, "pixel_scale": args.pixel_scale,
             "recipe": recipe.name}
    defences = {name: model for name, model in defences.items() if name in args.defences}
    descriptions = {name: DEFENCES[name].format(**texts) for name in defences}
    for scale in args.guidance_scale if "ours" in args.defences else []:
        name = "ours" if len(args.guidance_scale) == 1 else f"ours-s{scale:g}"
        defences[name] = defended(classifier, purifier.with_settings(guidance_scale=scale))
        descriptions[name] = DEFENCES["ours"].format(scale=scale, **texts)
    if args.tiny:
        descriptions = {name: f"{text} (here: random weights of small stand-ins)"
                        for name, text in descriptions.items()}
    return defences, descriptions


def test_images(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first n test images, their labels and the name of the data they come from."""
    if args.data_root is None:  # --tiny without data
        generator = torch.Generator().manual_seed(args.seed)
        images = torch.rand(args.n, 3, 32, 32, generator=generator)
        return images, torch.randint(0, 10, (args.n,), generator=generator), "random-images"
    dataset = load_dataset("cifar10", args.data_root, train=False, download=args.download)
    pairs = [dataset[i] for i in range(min(args.n, len(dataset)))]
    images = torch.stack([image for image, _ in pairs])
    labels = torch.tensor([int(label) for _, label in pairs])
    return images, labels, cifar10_label(args.data_root, train=False)


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    images, labels, data_name = test_images(args)
    classifier, purifier = (tiny_components if args.tiny else published_components)(args)
    defences, descriptions = build_defences(args, classifier, purifier)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    costs = {}
    for name, model in defences.items():
        model.to(device).eval()
        costs[name] = {
            "nfe": 0 if model.purifier is None else model.purifier.config.nfe,
            "images_per_s": images_per_second(model, images[:args.batch_size].to(device),
                                              repeats=1 if args.tiny else 2),
        }
        print(f"{name}: NFE {costs[name]['nfe']}, {costs[name]['images_per_s']:.2f} images/s")
    started = time.perf_counter()
    report = evaluate_models(
        defences, (images, labels), attack_specs(args), n=len(labels),
        batch_size=args.batch_size, runs=args.runs, seed=args.seed, output_dir=args.output_dir,
        sanity=args.sanity, sanity_n=args.sanity_n, progress=not args.tiny,
    )
    return {
        "command": "python benchmarks/cifar10.py " + shlex.join(sys.argv[1:]),
        "budget": args.budget, "data": data_name, "norm": args.norm,
        "hardware": hardware(), "date": time.strftime("%Y-%m-%d"),
        "wall_seconds": time.perf_counter() - started,
        "settings": {"recipe": THREATS[args.norm][2], **purifier.current_config().to_dict()},
        "costs": costs, "descriptions": descriptions, "report": report,
    }


BUDGET_NOTES = {
    "reference": "Reference budget: 512 images, PGD-EOT and BPDA 200 iterations x EOT 20, "
                 "AutoAttack-rand APGD 100 x EOT 20, R >= 5.",
    "reduced": "**Reduced budget** (128 images, 20 iterations x EOT 4): weaker than the "
               "protocol's reference (200 x EOT 20 on 512 images), so read every robust figure "
               "as an upper bound.",
    "tiny": "**Tiny check run**: random weights built at run time, a few images, 1 iteration. "
            "It shows that the script runs; its figures mean nothing.",
}


FOOTER = ("The JSON behind this page holds every record. Regenerate the page from it with "
          "`python benchmarks/cifar10.py --from-json <benchmark.json>`.")


def cifar10_page(benchmark: dict) -> str:
    """The Markdown page of a benchmark.json (every figure from that file)."""
    report = benchmark["report"]
    settings = report["settings"]
    recipe = benchmark["settings"]
    minutes = sum(r["seconds"] for r in report["records"]) / 60
    threat = "L-inf 8/255" if benchmark["norm"] == "linf" else "L2 0.5"
    intro = (f"{len(benchmark['costs'])} defences on the same images ({benchmark['data']}), "
             f"attacks and seeds, {threat}, following the [evaluation protocol](evaluation.md); "
             f"the purifier is [{recipe['recipe']}](cifar10.md). Robust accuracy is the mean over "
             "R purifications [95% Wilson interval]; \"worst\" counts an image as robust only if "
             "it survives every one of them.")
    setting = [
        f"- Command: `{benchmark['command']}`",
        (f"- Hardware: {benchmark['hardware']}; {minutes:.0f} min of attack batches; run on "
         f"{benchmark['date']}"),
        (f"- Data: the first {settings['n']} test images of {benchmark['data']} (fingerprint "
         f"{settings['data_fingerprint']}); seed {settings['seed']}; R = {settings['runs']}"),
        (f"- Purifier: t* = {recipe['t_star']}, {recipe['sampler']} with {recipe['n_steps']} "
         f"steps, {recipe['distance']} distance, scale schedule {recipe['scale_schedule']}"),
        f"- purifyguard {report['purifyguard_version']}",
    ]
    lines = [
        "# CIFAR-10 benchmark", "",
        "<!-- Generated by benchmarks/cifar10.py from its benchmark.json: do not edit. -->", "",
        intro, "", BUDGET_NOTES[benchmark["budget"]], "",
        "## Setting", "", *setting, "", *attacks_section(report), "",
        "## Results", "", *results_section(benchmark), "",
        "## Sanity checks", "", *sanity_section(report), "",
        FOOTER, "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_json:
        benchmark = read_json(args.from_json, "benchmark results file")
    else:
        try:
            resolve(args)
        except ValueError as error:
            parser.error(str(error))
        benchmark = run(args)
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
