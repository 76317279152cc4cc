"""Training throughput (images/s) of each routine on this machine, one process against two.

    PURIFYGUARD_FASHION_MNIST=/path/to/idx python benchmarks/experiments/train_throughput.py --steps 5

Each routine runs --steps optimizer steps on Fashion-MNIST (1x28x28) under
`accelerate launch --num_processes N` (N = 1, 2; --multi_gpu, which on a machine without a GPU
joins the processes over gloo on the CPU) and the script reads the images/s the routine logs on
its last step: images of all processes since the loop began, the first (slower) step included.
The batch is per process, so two processes handle twice the images per step. Models are the
routines' default sizes; adapt runs an untrained default-size denoiser with a resnet10t guidance
network and classifier (its speed does not depend on their weights).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from purifyguard import Purifier
from purifyguard.files import write_json
from purifyguard.hub import create_guidance_network, save_guidance_network
from purifyguard.train.run import read_metrics

RAW_INPUT = {"mean": [0.0], "std": [1.0], "input_size": [1, 28, 28]}
GUIDANCE_OPTIONS = ["--model", "resnet18", "--model-kwargs", '{"channels": [16, 32, 64, 128]}',
                    "--eval-images", "100"]


def adapt_inputs(folder: Path) -> list[str]:
    """An (untrained) default-size purifier with adversarial guidance, and a classifier."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    networks = [
        create_guidance_network("resnet10t", num_classes=10, in_chans=1,
                                channels=[16, 32, 64, 128], pretrained_cfg_overlay=RAW_INPUT)
        for _ in range(2)
    ]
    Purifier(
        unet, DDPMScheduler(num_train_timesteps=1000), networks[0], t_star=100, sampler="ddim",
        n_steps=10, guidance="adversarial", guidance_scale=5.0, scale_schedule="constant",
    ).save_pretrained(folder / "purifier")
    save_guidance_network(networks[1].eval(), folder / "classifier")
    return ["--purifier", str(folder / "purifier"), "--classifier", str(folder / "classifier"),
            "--attack-steps", "3", "--train-steps", "2"]


def measure(routine: str, processes: int, options: list[str], args: argparse.Namespace,
            output_dir: Path) -> float:
    """images/s that the routine logged on its last step."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes",
                str(processes), "--num_cpu_threads_per_process", str(args.threads)]
    launcher += ["--multi_gpu", "--main_process_port", str(port)] if processes > 1 else ["--cpu"]
    command = [*launcher, "-m", "purifyguard.train", routine, "--output-dir", str(output_dir),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--log-every", "1", "--checkpoint-every", str(args.steps + 1), "--no-progress",
               *options]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return read_metrics(output_dir)[-1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--routines", default="diffusion,guidance,adapt")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        options = {"diffusion": [], "guidance": GUIDANCE_OPTIONS, "adapt": []}
        if "adapt" in args.routines:
            options["adapt"] = adapt_inputs(scratch / "inputs")
        for routine in args.routines.split(","):
            for processes in (1, 2):
                speed = measure(routine, processes, options[routine], args,
                                scratch / f"{routine}-{processes}")
                results.append({"routine": routine, "processes": processes,
                                "images_per_s": round(speed, 2)})
                print(f"{routine:10s} {processes} process(es): {speed:8.2f} images/s", flush=True)

    print(f"\n{args.steps} steps, batch {args.batch_size} per process, "
          f"{args.threads} thread(s) per process, {os.cpu_count()} CPUs seen")
    print("| routine | 1 process | 2 processes | speed-up |\n|---|---|---|---|")
    for routine in args.routines.split(","):
        one, two = (r["images_per_s"] for r in results if r["routine"] == routine)
        print(f"| {routine} | {one:.2f} | {two:.2f} | {two / one:.2f}x |")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
