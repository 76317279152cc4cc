"""Purification speed and memory on this machine's CPU (a script that prints tables, not a test).

1. Throughput: images/s and denoiser evaluations (NFE) of one purification, `ddpm` at t* = 100
   against `ddim` with k = 5, 10, 20 (on [0, t*]), for each guidance mode, under torch.no_grad()
   (what a defended model's inference costs; guided steps still take their own guidance
   gradient inside).
2. Memory: peak resident memory of one full-gradient purification + backward (what an attacker's
   PGD step costs), with and without per-step checkpointing.

The denoiser is a Fashion-MNIST-sized diffusers UNet2DModel (1x28x28, ~1.6M parameters, one
attention level) and the guidance network a small timm resnet10t; both are randomly initialised:
speed and memory do not depend on the weights.

How memory is measured: each measurement runs in a fresh subprocess. After building the
networks and the batch it resets the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs, Linux >= 4.0) and reads the resident set (VmRSS); after the forward and
backward it reads the peak (VmHWM). extra = peak - resident-after-setup is the memory the
gradient computation needed at its worst moment, everything PyTorch's CPU allocator and autograd
held, tensors included (tracemalloc sees only Python objects, not tensor memory). Without the
reset, a process's high-water mark from importing the libraries can hide a smaller peak; where
clear_refs cannot be written, the script falls back to resource.getrusage ru_maxrss deltas and
says so. Freed memory the allocator keeps resident still counts, so read it as an upper bound.

    python benchmarks/experiments/purification_speed.py            # the full default run (several minutes)
    python benchmarks/experiments/purification_speed.py --quick    # a smoke run in well under a minute
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import timm
import torch
from diffusers import UNet2DModel

from purifyguard import Purifier

GUIDANCE = {
    "none": {"guidance": "none"},
    "pixel": {"guidance": "pixel", "guidance_scale": 1.0},
    "adversarial": {"guidance": "adversarial", "guidance_scale": 1.0, "guidance_on": "x0_hat"},
}


def fashion_mnist_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()


def guidance_network() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "resnet10t", channels=(16, 32, 64, 128), num_classes=10, in_chans=1
    ).eval()


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sampler_settings(t_star: int, ddim_steps: list[int]) -> list[tuple[str, dict]]:
    rows = [(f"ddpm t*={t_star}", {"t_star": t_star, "sampler": "ddpm"})]
    rows += [
        (f"ddim k={k} (t*={t_star})", {"t_star": t_star, "sampler": "ddim", "n_steps": k})
        for k in ddim_steps
    ]
    return rows


def throughput(args: argparse.Namespace, unet: UNet2DModel, network: torch.nn.Module) -> None:
    images = torch.rand(args.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    # Warm-up: first calls pay for kernel selection and allocation.
    Purifier(unet, guidance_network=network, t_star=2, **GUIDANCE["adversarial"]).purify(images)

    print(f"\nThroughput, batch {args.batch}, median of {args.repeats} timed purification(s), "
          "torch.no_grad()")
    header = f"{'sampler':<22} {'guidance':<12} {'NFE':>5} {'s/batch':>9} {'images/s':>9}"
    print(header)
    print("-" * len(header))
    for name, settings in sampler_settings(args.t_star, args.ddim_steps):
        for guidance in args.guidance:
            purifier = Purifier(unet, guidance_network=network, **settings, **GUIDANCE[guidance])
            seconds = []
            for repeat in range(args.repeats):
                start = time.perf_counter()
                with torch.no_grad():
                    purifier.purify(images, seed=repeat)
                seconds.append(time.perf_counter() - start)
            median = statistics.median(seconds)
            print(f"{name:<22} {guidance:<12} {purifier.last_nfe:>5} {median:>9.2f} "
                  f"{args.batch / median:>9.1f}", flush=True)


def memory_child(spec: str) -> None:
    """Run one full-gradient purification + backward and print its memory as JSON."""
    settings = json.loads(spec)
    torch.set_num_threads(settings.pop("threads"))
    batch = settings.pop("batch")
    unet, network = fashion_mnist_unet(), guidance_network()
    guidance = settings.pop("guidance_mode")
    purifier = Purifier(unet, guidance_network=network, gradient_mode="full", **settings,
                        **GUIDANCE[guidance])
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x.requires_grad_()
    method, before = _reset_peak_kib()
    start = time.perf_counter()
    purifier.purify(x, seed=0).sum().backward()
    seconds = time.perf_counter() - start
    after = _proc_status_kib("VmHWM") if method == "VmHWM" else _maxrss_kib()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    print(json.dumps({"baseline_mib": before / 1024, "peak_mib": after / 1024,
                      "extra_mib": (after - before) / 1024, "seconds": seconds,
                      "nfe": purifier.last_nfe, "method": method}))


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _reset_peak_kib() -> tuple[str, int]:
    """Reset the peak-RSS counter; (method, resident KiB now)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return "VmHWM", _proc_status_kib("VmRSS")
    except OSError:
        return "ru_maxrss", _maxrss_kib()


def memory(args: argparse.Namespace) -> None:
    print(f"\nPeak memory of one full-gradient purification + backward, batch {args.memory_batch} "
          "(fresh subprocess per row; extra = peak RSS - RSS after setup)")
    header = (f"{'sampler':<22} {'guidance':<12} {'checkpointing':<14} {'extra MiB':>10} "
              f"{'peak MiB':>9} {'seconds':>8}")
    print(header)
    print("-" * len(header))
    for name, settings in sampler_settings(args.t_star, args.memory_ddim_steps)[1:]:
        for guidance in args.memory_guidance:
            for checkpointing in (False, True):
                spec = dict(settings, guidance_mode=guidance, checkpointing=checkpointing,
                            batch=args.memory_batch, threads=args.threads)
                result = subprocess.run(
                    [sys.executable, __file__, "--memory-child", json.dumps(spec)],
                    capture_output=True, text=True, check=True,
                )
                row = json.loads(result.stdout.strip().splitlines()[-1])
                print(f"{name:<22} {guidance:<12} {checkpointing!s:<14} "
                      f"{row['extra_mib']:>10.0f} {row['peak_mib']:>9.0f} "
                      f"{row['seconds']:>8.1f}  ({row['method']})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row (median)")
    parser.add_argument("--t-star", type=int, default=100)
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--guidance", nargs="+", default=list(GUIDANCE), choices=list(GUIDANCE))
    parser.add_argument("--memory-batch", type=int, default=16)
    parser.add_argument("--memory-ddim-steps", type=int, nargs="+", default=[10])
    parser.add_argument("--memory-guidance", nargs="+", default=["none", "adversarial"],
                        choices=list(GUIDANCE))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: this CPU is small and shared)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: batch 8, t*=10, k=2 and 5, one repeat")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    if args.quick:
        args.batch, args.repeats, args.t_star, args.ddim_steps = 8, 1, 10, [2, 5]
        args.memory_batch, args.memory_ddim_steps = 4, [5]
    torch.set_num_threads(args.threads)
    unet, network = fashion_mnist_unet(), guidance_network()
    print(f"torch {torch.__version__}, {args.threads} thread(s), "
          f"{torch.get_num_interop_threads()} interop thread(s)")
    print(f"denoiser: UNet2DModel 1x28x28, block_out_channels=(32, 64, 64), layers_per_block=2, "
          f"one attention level: {parameters(unet):,} parameters")
    print(f"guidance network: timm resnet10t, channels=(16, 32, 64, 128): "
          f"{parameters(network):,} parameters")
    throughput(args, unet, network)
    if not args.skip_memory:
        memory(args)


if __name__ == "__main__":
    main()
