"""What torch.inference_mode() buys over torch.no_grad() where no graph is wanted.

    python benchmarks/experiments/inference_mode.py                 # batch 64, 5 repeats, 1 thread (~1.5 min)
    python benchmarks/experiments/inference_mode.py --purifier fashion-mnist-ddpm --batch 32 --repeats 9

Two calls that never need autograd, each timed under both modes through the public API:
1. purify: Purifier.purify(x, seed=0) of the unguided bundled purifier (default
   fashion-mnist-ddpm: no guidance gradient, so every step may run in inference mode);
2. classify: PurifiedModel.classify(x) of the bundled classifier, --classifier-calls calls per
   timing (one call is too short to time alone).
The modes alternate, no_grad, inference_mode, no_grad, ..., so drift of a shared machine hits
both alike; the figures are medians over --repeats, with the range of the per-repeat ratios
so that a reader sees whether a gain is consistent. The largest difference between the two
modes' outputs must be 0: inference mode skips autograd bookkeeping, not arithmetic.

The mode is set around the call, as a user would: an outer inference_mode stays on through the
library's own torch.no_grad() (which only says that no graph is kept), so the inference_mode arm
runs every operation of the call as inference. Measured on the 2-core development CPU the gain
was inconsistent and below 3 %, so the library keeps torch.no_grad() and hands out ordinary
tensors (docs/performance.md, "Inference mode"); rerun this on your machine before wrapping
your own calls in inference mode.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

MODES: dict[str, Callable[[], AbstractContextManager]] = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--purifier", default="fashion-mnist-ddpm",
                        help="registered name, folder or Hub id of an unguided purifier")
    parser.add_argument("--classifier", default="fashion-mnist-resnet18",
                        help="bundled classifier name")
    parser.add_argument("--batch", type=int, default=64, help="images per call (1 to 512)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per mode")
    parser.add_argument("--classifier-calls", type=int, default=20,
                        help="classifier calls per classify timing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the option, the value and what was expected."""
    for name in ("batch", "repeats", "classifier_calls", "threads"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
    if args.batch > 512:
        raise ValueError(f"--batch must be at most 512 (the bundled test images), got {args.batch}")


def timed(mode: str, call: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    """Seconds of call() under the mode, and its output."""
    start = time.perf_counter()
    with MODES[mode]():
        output = call()
    return time.perf_counter() - start, output


def compare(label: str, call: Callable[[], torch.Tensor], images: int, repeats: int) -> None:
    """Time call under both modes, alternating, and print the figures."""
    outputs = {mode: timed(mode, call)[1] for mode in MODES}  # warm-up, and the outputs compared
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode in MODES:
            seconds[mode].append(timed(mode, call)[0])
    rates = {mode: images / statistics.median(values) for mode, values in seconds.items()}
    ratios = [old / new for old, new in zip(seconds["no_grad"], seconds["inference_mode"])]
    difference = (outputs["inference_mode"] - outputs["no_grad"]).abs().max().item()
    print(f"{label}:")
    for mode in MODES:
        print(f"  {mode:<15} {rates[mode]:10.2f} images/s")
    print(f"  ratio           {rates['inference_mode'] / rates['no_grad']:10.3f}x "
          f"(per repeat {min(ratios):.3f} to {max(ratios):.3f})")
    print(f"  largest output difference, same seed: {difference:.1e}")


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_args(argv)
    except ValueError as error:
        raise SystemExit(f"inference_mode.py: error: {error}") from error

    from purifyguard import PurifiedModel, bundled_classifier, bundled_test_images
    from purifyguard.registry import load_purifier

    torch.set_num_threads(args.threads)
    purifier = load_purifier(args.purifier)
    if purifier._guided():
        raise SystemExit(f"inference_mode.py: error: --purifier {args.purifier!r} is guided; "
                         "guided steps need autograd, give an unguided one")
    model = PurifiedModel(bundled_classifier(args.classifier), purifier)
    images = bundled_test_images()[0][:args.batch]
    purified = purifier.purify(images, seed=0)
    config = purifier.config
    print(f"purifier {args.purifier} ({config.sampler}, {config.n_steps} steps, "
          f"t* = {config.t_star}, guidance {config.guidance}), classifier {args.classifier}, "
          f"batch {args.batch}, {args.repeats} repeats, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}")
    compare("purify", lambda: purifier.purify(images, seed=0), args.batch, args.repeats)

    def classify_repeatedly() -> torch.Tensor:
        for _ in range(args.classifier_calls):
            logits = model.classify(purified)
        return logits

    compare(f"classify ({args.classifier_calls} calls per timing)", classify_repeatedly,
            args.batch * args.classifier_calls, args.repeats)


if __name__ == "__main__":
    main()
