"""What a denoiser architecture costs in the hot path, before any training: candidates side by side.

    python benchmarks/experiments/denoiser_cost.py                      # the Fashion-MNIST candidates below
    python benchmarks/experiments/denoiser_cost.py --batch 16 --repeats 5 --threads 2

For each candidate UNet2DModel (random weights: cost does not depend on them) it prints the
parameters, GFLOP per image of one call (torch.utils.flop_counter), and, behind the bundled
TRADES guidance network with fashion-mnist-agdm's settings (adversarial guidance on x0_hat,
10 DDIM steps from t* = 300), the images/s of one guided purification without a graph and the
seconds of one full-gradient input gradient (the attack step) per image. Candidates alternate
within each repeat, so drift of a shared machine hits all alike; figures are medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# name: (block_out_channels, attention levels: 0 = 28x28, 1 = 14x14, 2 = 7x7)
CANDIDATES = {
    "32-64-64, attention 14x14 (bundled)": ((32, 64, 64), (1,)),
    "32-64-64, attention 7x7": ((32, 64, 64), (2,)),
    "32-64-64, no attention": ((32, 64, 64), ()),
    "24-48-96, attention 7x7": ((24, 48, 96), (2,)),
}


def build(channels: tuple[int, ...], attention: tuple[int, ...]):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    levels = range(len(channels))
    return UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=channels,
        layers_per_block=1, norm_num_groups=8,
        down_block_types=tuple("AttnDownBlock2D" if i in attention else "DownBlock2D"
                               for i in levels),
        up_block_types=tuple("AttnUpBlock2D" if i in attention else "UpBlock2D"
                             for i in reversed(levels)),
    ).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--attack-batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from torch.utils.flop_counter import FlopCounterMode

    from purifyguard import PurifiedModel, bundled_classifier, bundled_test_images
    from purifyguard.registry import load_purifier

    torch.set_num_threads(args.threads)
    bundled = load_purifier("fashion-mnist-agdm")
    classifier = bundled_classifier()
    images, labels, _ = bundled_test_images()
    x, y = images[:args.batch], labels[:args.batch]
    purifiers, flops, params = {}, {}, {}
    for name, (channels, attention) in CANDIDATES.items():
        unet = build(channels, attention)
        params[name] = sum(p.numel() for p in unet.parameters())
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(x[:4] * 2 - 1, torch.full((4,), 100))
        flops[name] = counter.get_total_flops() / 4 / 1e9
        purifiers[name] = type(bundled)(unet, bundled.schedule.scheduler_config,
                                        bundled.guidance_network, bundled.current_config())

    def forward(purifier) -> float:
        start = time.perf_counter()
        purifier.purify(x, seed=0)
        return args.batch / (time.perf_counter() - start)

    def attack_step(purifier) -> float:
        model = PurifiedModel(classifier, purifier)
        adversarial = x[:args.attack_batch].clone().requires_grad_()
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(adversarial), y[:args.attack_batch])
        torch.autograd.grad(loss, adversarial)
        return (time.perf_counter() - start) / args.attack_batch

    rates = {name: [] for name in CANDIDATES}
    steps = {name: [] for name in CANDIDATES}
    for _ in range(args.repeats):
        for name, purifier in purifiers.items():
            rates[name].append(forward(purifier))
            steps[name].append(attack_step(purifier))
    print(f"{args.threads} thread(s), guided purification of {args.batch} images, full-gradient "
          f"step on {args.attack_batch}, medians of {args.repeats}; torch {torch.__version__}")
    print(f"{'denoiser':38s} {'params':>8s} {'GFLOP/img':>9s} {'purify img/s':>12s} "
          f"{'attack s/img':>12s}")
    for name in CANDIDATES:
        print(f"{name:38s} {params[name] / 1e6:7.2f}M {flops[name]:9.3f} "
              f"{statistics.median(rates[name]):12.2f} {statistics.median(steps[name]):12.2f}")


if __name__ == "__main__":
    main()
