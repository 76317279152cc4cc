"""What Purifier.compile_denoiser() buys: eager against compiled, side by side in one process.

    python benchmarks/experiments/compile_speed.py                  # bundled fashion-mnist-agdm, batch 32
    python benchmarks/experiments/compile_speed.py --purifier <folder> --batch 64 --repeats 5 --threads 2

Both purifiers share the same weights; their forward passes (purify with a fixed seed, no
gradient) alternate, eager, compiled, eager, ..., so drift of a shared machine hits both alike.
Prints the compile warm-up time, images/s of each (median over --repeats), the ratio, and the
largest difference between their outputs for the same seed (compiled kernels may reorder float
arithmetic). --guidance none measures the unguided (DiffPure-style) purifier instead.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--purifier", default="fashion-mnist-agdm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--guidance", choices=("as-saved", "none"), default="as-saved")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: torch's)")
    args = parser.parse_args(argv)

    from purifyguard import bundled_test_images
    from purifyguard.registry import load_purifier

    torch.set_num_threads(args.threads)
    eager = load_purifier(args.purifier)
    if args.guidance == "none":
        eager = eager.with_settings(guidance="none")
    compiled = eager.with_settings().compile_denoiser(
        **({"mode": args.mode} if args.mode else {}))
    images = bundled_test_images()[0][:args.batch]

    def forward(purifier) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        output = purifier.purify(images, seed=0)
        return time.perf_counter() - start, output

    start = time.perf_counter()
    _, compiled_output = forward(compiled)
    warm_up = time.perf_counter() - start
    _, eager_output = forward(eager)
    times = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        for name, purifier in (("eager", eager), ("compiled", compiled)):
            times[name].append(forward(purifier)[0])
    rates = {name: args.batch / statistics.median(values) for name, values in times.items()}
    difference = (compiled_output - eager_output).abs().max().item()
    print(f"purifier {args.purifier} (guidance {eager.config.guidance}, {eager.config.sampler} "
          f"{eager.config.n_steps} steps), batch {args.batch}, {args.threads} thread(s), "
          f"torch {torch.__version__}")
    print(f"compile warm-up (first call): {warm_up:.1f} s")
    print(f"eager    {rates['eager']:.2f} images/s")
    print(f"compiled {rates['compiled']:.2f} images/s  ({rates['compiled'] / rates['eager']:.2f}x)")
    print(f"largest output difference, same seed: {difference:.2e}")


if __name__ == "__main__":
    main()
