"""Speed and memory of the hot path: this tree against a git revision, side by side in one run.

    python benchmarks/speed.py                          # against 63b7a48, the same purifier folder
    python benchmarks/speed.py --baseline HEAD~3 --repeats 5 --threads 2
    python benchmarks/speed.py --mode own-default       # each tree's own registered default
    python benchmarks/speed.py --mode own-default --candidate <purifier folder>
                                                        # the next default, before it is bundled
    python benchmarks/speed.py --quick                  # a smoke run (small batch, one repeat)

The baseline revision is exported with `git archive` into a temporary folder. Every measurement
runs in a fresh subprocess that imports purifyguard from one tree or the other; the two trees
alternate (old, new, old, new, ...) at the same thread count, so drift of a shared machine hits
both alike. With --mode same-weights (default) both trees load the *same* purifier folder (this
tree's bundled fashion-mnist-agdm), so code changes are not confounded with new weights; with
--mode own-default each tree loads its own registered default purifier by name, or, for this
tree, the --candidate purifier folder (a default in the making: its speed depends on the
denoiser's architecture and the settings, not on how long it was trained).

Figures (medians over --repeats):
- forward: images/s of a defended forward pass (bundled classifier behind the purifier, no
  gradient), and its peak extra memory (VmHWM after resetting it, Linux);
- attack step: seconds per full-gradient attack step (one input gradient of the summed
  cross-entropy through the whole defended model) at EOT 1 and EOT 4, and its peak extra memory;
- GFLOP/s: one denoiser call's floating-point operations (torch.utils.flop_counter) divided by
  its time, against a dense float32 matmul measured in the same process: how far from this
  machine's limit the denoiser runs.
It runs on CUDA when a GPU is present (--device cuda); memory is then torch's peak allocation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = "63b7a48"

WORKER = textwrap.dedent('''
    import json, sys, time
    tree, task, purifier_spec, batch, threads, device = sys.argv[1:7]
    sys.path.insert(0, tree)
    import torch
    torch.set_num_threads(int(threads))
    import purifyguard
    assert purifyguard.__file__.startswith(tree), purifyguard.__file__
    from pathlib import Path
    from purifyguard.guidance_network_format import load_guidance_network
    from purifyguard.purified_model import PurifiedModel
    from purifyguard.registry import load_purifier
    from purifyguard.evaluation.pgd import eot_gradient

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) / 1024
        return float("nan")

    def reset_peak():
        if device == "cuda":
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / 2**20
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        return rss("VmRSS")

    def peak():
        if device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return rss("VmHWM")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    classifier = load_guidance_network(Path(sys.argv[7]))
    model = PurifiedModel(classifier, load_purifier(purifier_spec)).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(int(batch), 1, 28, 28, generator=generator).to(device)
    y = torch.randint(0, 10, (int(batch),), generator=generator).to(device)
    result = {"tree": tree, "task": task}
    if task == "forward":
        with torch.no_grad():
            model(x[:2]); sync()
            base = reset_peak(); start = time.perf_counter()
            model(x); sync()
            seconds = time.perf_counter() - start
        result.update(images_per_s=len(x) / seconds, peak_mib=peak() - base)
        # The denoiser alone: FLOPs of one call (torch.utils.flop_counter) over its time.
        from torch.utils.flop_counter import FlopCounterMode
        unet = model.purifier.unet
        noisy = 2 * x - 1
        step = torch.full((len(x),), 100, dtype=torch.long, device=device)
        with torch.no_grad():
            with FlopCounterMode(display=False) as counter:
                unet(noisy, step)
            sync(); start = time.perf_counter()
            unet(noisy, step); sync()
            seconds = time.perf_counter() - start
        flops = counter.get_total_flops()
        result.update(gflop_per_image=flops / len(x) / 1e9, gflops=flops / seconds / 1e9)
        a = torch.randn(1024, 1024, device=device); b = torch.randn(1024, 1024, device=device)
        a @ b; sync(); start = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        result["matmul_gflops"] = 10 * 2 * 1024**3 / (time.perf_counter() - start) / 1e9
    else:
        eot = int(task.split("-eot")[1])
        torch.manual_seed(0)
        eot_gradient(model, x[:2], y[:2], 1); sync()
        base = reset_peak(); start = time.perf_counter()
        eot_gradient(model, x, y, eot); sync()
        result.update(seconds=time.perf_counter() - start, peak_mib=peak() - base)
    print(json.dumps(result))
''')

TASKS = ("forward", "attack-eot1", "attack-eot4")


def export(revision: str, folder: Path) -> Path:
    """The tree of a git revision, exported into folder (no .git, nothing installed)."""
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def stage_same_weights(folder: Path) -> tuple[Path, Path]:
    """This tree's bundled classifier and default purifier, copied with every network config in
    the older layout ({"library", "architecture", "kwargs"}), which both trees read."""
    from purifyguard.files import read_json, write_json
    from purifyguard.guidance_network_format import guidance_config

    assets = ROOT / "purifyguard" / "assets"
    classifier = Path(shutil.copytree(assets / "classifiers" / "fashion-mnist-resnet18",
                                      folder / "classifier"))
    purifier = Path(shutil.copytree(assets / "purifiers" / "fashion-mnist-agdm",
                                    folder / "purifier"))
    for config in (classifier / "config.json", purifier / "guidance" / "config.json"):
        architecture, kwargs = guidance_config(read_json(config), config)
        write_json(config, {"library": "timm", "architecture": architecture, "kwargs": kwargs})
    return classifier, purifier


def measure(tree: Path, task: str, purifier: str, classifier: Path, batch: int, threads: int,
            device: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-c", WORKER, str(tree), task, purifier, str(batch), str(threads),
               device, str(classifier)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{task} in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare")
    parser.add_argument("--mode", choices=("same-weights", "own-default"), default="same-weights",
                        help="both trees load this tree's purifier folder, or each its default")
    parser.add_argument("--batch", type=int, default=32, help="images per forward measurement")
    parser.add_argument("--attack-batch", type=int, default=4,
                        help="images per attack-step measurement (a full graph is large)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in both trees")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per tree")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--candidate", type=Path,
                        help="--mode own-default: the purifier folder this tree loads instead of "
                        "its registered default")
    parser.add_argument("--quick", action="store_true", help="batch 4, one repeat")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.attack_batch, args.repeats = 4, 2, 1
    if args.candidate is not None:
        if args.mode != "own-default":
            parser.error("--candidate needs --mode own-default")
        if not (args.candidate / "purifier_config.json").is_file():
            parser.error(f"--candidate {args.candidate}: expected a purifier folder with "
                         "purifier_config.json")

    with tempfile.TemporaryDirectory() as scratch:
        old_tree = export(args.baseline, Path(scratch) / "baseline")
        trees = {"old": old_tree, "new": ROOT}
        if args.mode == "same-weights":
            classifier, folder = stage_same_weights(Path(scratch) / "same-weights")
            models = {name: (str(folder), classifier) for name in trees}
        else:
            models = {name: ("fashion-mnist-agdm", tree / "purifyguard" / "assets" / "classifiers"
                             / "fashion-mnist-resnet18") for name, tree in trees.items()}
            if args.candidate is not None:
                models["new"] = (str(args.candidate.resolve()), models["new"][1])
        runs: dict[tuple[str, str], list[dict]] = {}
        for repeat in range(args.repeats):
            for task in args.tasks:
                for name, tree in trees.items():
                    batch = args.batch if task == "forward" else args.attack_batch
                    purifier, classifier = models[name]
                    result = measure(tree, task, purifier, classifier, batch, args.threads,
                                     args.device)
                    runs.setdefault((task, name), []).append(result)
                    print(f"repeat {repeat + 1}/{args.repeats} {task:12s} {name}: "
                          f"{_short(result)}", file=sys.stderr, flush=True)
    figures = summarise(runs)
    print(table(figures, args))
    if args.json:
        settings = {key: str(value) if isinstance(value, Path) else value
                    for key, value in vars(args).items()}
        Path(args.json).write_text(json.dumps({"settings": settings, "figures": figures},
                                              indent=2) + "\n")


def summarise(runs: dict[tuple[str, str], list[dict]]) -> dict[str, dict]:
    """Medians per task and tree, and the new/old ratio of each."""
    figures: dict[str, dict] = {}
    for (task, tree), results in runs.items():
        keys = [k for k in results[0] if isinstance(results[0][k], (int, float))]
        figures.setdefault(task, {})[tree] = {
            key: statistics.median(r[key] for r in results) for key in keys}
    for values in figures.values():
        if "old" in values and "new" in values:
            values["ratio"] = {key: values["new"][key] / values["old"][key]
                               for key in values["new"] if values["old"].get(key)}
    return figures


def table(figures: dict[str, dict], args: argparse.Namespace) -> str:
    candidate = f" (this tree: candidate {args.candidate.name})" if args.candidate else ""
    heading = (f"baseline {args.baseline}, mode {args.mode}{candidate}, batch {args.batch} (forward) / "
               f"{args.attack_batch} (attack), {args.threads} thread(s), {args.repeats} "
               f"alternating repeat(s), {args.device}")
    lines = [heading, "", "| figure | old | new | new / old |", "|---|---|---|---|"]
    rows = [("forward", "images_per_s", "defended forward, images/s"),
            ("forward", "peak_mib", "defended forward, peak extra MiB"),
            ("forward", "gflops", "denoiser call, GFLOP/s achieved"),
            ("forward", "gflop_per_image", "denoiser call, GFLOP per image"),
            ("forward", "matmul_gflops", "dense matmul reference, GFLOP/s"),
            ("attack-eot1", "seconds", "full-gradient step, EOT 1, s"),
            ("attack-eot1", "peak_mib", "full-gradient step, EOT 1, peak extra MiB"),
            ("attack-eot4", "seconds", "full-gradient step, EOT 4, s"),
            ("attack-eot4", "peak_mib", "full-gradient step, EOT 4, peak extra MiB")]
    for task, key, label in rows:
        values = figures.get(task)
        if not values or key not in values.get("new", {}):
            continue
        old, new = values.get("old", {}).get(key), values["new"][key]
        ratio = values.get("ratio", {}).get(key)
        lines.append(f"| {label} | {_fmt(old)} | {_fmt(new)} | {_fmt(ratio, 2)} |")
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _short(result: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in result.items() if isinstance(v, float))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
