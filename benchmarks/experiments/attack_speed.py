"""Seconds per attack iteration for each attack on a purified Fashion-MNIST-sized model, on this
machine's CPU (a script that prints a table, not a test).

The defended model: a diffusers UNet2DModel at 1x28x28 (~1.6M parameters, one attention level)
purifying with `ddim` k = 10 on [0, t* = 100] and with `ddpm` at t* = 20, in front of a small CNN;
weights are random (speed does not depend on them), guidance "none".

Per attack, one fresh subprocess builds the model, runs the attack on one batch with EOT 1 and
reports wall time divided by the attack's iterations (PGD-type: steps; autoattack-rand: APGD
steps, each covering its CE and DLR runs; square: queries), and the peak resident memory the
attack added (VmHWM after resetting the peak through /proc/self/clear_refs, Linux; elsewhere the
column reads n/a). Full gradients are timed with and without per-step checkpointing.

    python benchmarks/experiments/attack_speed.py                 # batch 16, 3 steps, 50 queries
    python benchmarks/experiments/attack_speed.py --steps 1 --queries 10 --batch 8   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel
from torch import nn

from purifyguard import PurifiedModel, Purifier
from purifyguard.evaluation.attacks import AttackSpec, attacked_model, run_attack
from purifyguard.option_types import positive_int

PURIFIERS = {
    "ddim k=10, t*=100": {"sampler": "ddim", "t_star": 100, "n_steps": 10},
    "ddpm t*=20": {"sampler": "ddpm", "t_star": 20},
}
ATTACKS = {
    "pgd full": {"kind": "pgd"},
    "pgd full + checkpointing": {"kind": "pgd", "checkpointing": True},
    "pgd surrogate(ddim, 5)": {"kind": "pgd", "gradient": "surrogate", "surrogate_steps": 5},
    "bpda": {"kind": "bpda"},
    "autoattack-rand": {"kind": "autoattack-rand"},
    "transfer": {"kind": "transfer"},
    "square": {"kind": "square"},
}


def purified_model(settings: dict) -> PurifiedModel:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    classifier = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )
    purifier = Purifier(unet, {"num_train_timesteps": 1000}, **settings)
    return PurifiedModel(classifier, purifier, mean=(0.5,), std=(0.5,))


def measure(purifier: str, attack: str, batch: int, steps: int, queries: int) -> dict:
    """One attack in this process: seconds per iteration and the peak memory it added."""
    torch.set_num_threads(1)
    model = purified_model(PURIFIERS[purifier])
    spec = AttackSpec(**ATTACKS[attack], eps=0.1, steps=steps, eot=1, n_queries=queries)
    attacker = attacked_model(spec, model, model.with_purifier(None))
    images = torch.rand(batch, 1, 28, 28)
    labels = torch.arange(batch) % 10
    resident = _reset_peak_memory()
    start = time.perf_counter()
    run_attack(spec, attacker, images, labels, seed=0)
    seconds = time.perf_counter() - start
    iterations = queries if spec.kind == "square" else steps
    peak = _peak_memory()
    extra = None if resident is None or peak is None else (peak - resident) / 2**20
    return {"seconds_per_iteration": seconds / iterations, "extra_memory_mib": extra,
            "nfe": model.purifier.config.nfe}


def _reset_peak_memory() -> int | None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def _peak_memory() -> int | None:
    return _status_kib("VmHWM")


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _child_result(child: subprocess.CompletedProcess, purifier: str, attack: str) -> dict:
    """The measurement a child printed as its last line, or SystemExit with the child's own
    reason (the end of its stderr) when it failed or printed none."""
    lines = child.stdout.strip().splitlines()
    if child.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    reason = "\n".join(child.stderr.strip().splitlines()[-20:]) or "(nothing on stderr)"
    raise SystemExit(
        f"attack_speed: measuring {attack!r} on {purifier!r} failed (exit status "
        f"{child.returncode}); the child process said:\n{reason}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive_int, default=16, help="images per attack")
    parser.add_argument("--steps", type=positive_int, default=3,
                        help="iterations of the PGD-type attacks")
    parser.add_argument("--queries", type=positive_int, default=50,
                        help="queries of the square attack")
    parser.add_argument("--one", nargs=2, metavar=("PURIFIER", "ATTACK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*args.one, args.batch, args.steps, args.queries)))
        return
    print(f"batch {args.batch}, EOT 1, {args.steps} steps, {args.queries} square queries, "
          f"1 CPU thread, {torch.__version__}")
    print("| purifier | attack | s / iteration | extra peak memory (MiB) |")
    print("|---|---|---|---|")
    for purifier in PURIFIERS:
        for attack in ATTACKS:
            command = [sys.executable, __file__, "--one", purifier, attack, "--batch",
                       str(args.batch), "--steps", str(args.steps), "--queries", str(args.queries)]
            result = _child_result(subprocess.run(
                command, check=False, capture_output=True, text=True
            ), purifier, attack)
            memory = result["extra_memory_mib"]
            memory = "n/a" if memory is None else f"{memory:.0f}"
            print(f"| {purifier} | {attack} | {result['seconds_per_iteration']:.3f} | {memory} |",
                  flush=True)


if __name__ == "__main__":
    main()
