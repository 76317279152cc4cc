"""Reduced precision for the purifier: speed, memory and what it changes, float32 against bfloat16
and float16 networks, side by side in one process.

    python benchmarks/experiments/dtype_speed.py --purifier fashion-mnist-agdm            # GPU if present
    python benchmarks/experiments/dtype_speed.py --purifier <folder> --classifier <folder> \\
        --data-root <fashion-mnist folder> --clean-n 10000 --json dtype.json

The purifier's networks are loaded with `Purifier.from_pretrained(folder, torch_dtype=...)`; the
images, the sampler and the classifier stay float32, so a user changes one argument and nothing
else. For each dtype (repeats alternate between dtypes, medians reported):
- forward: images/s of a defended forward pass (purify + classify, no gradient);
- attack step: seconds per image of one full-gradient input gradient (summed cross-entropy
  through the whole defended model) at EOT 1;
- peak memory of that attack step (CUDA: torch's peak allocation; CPU: not measured);
and against float32 with the same seed: the largest and median per-example difference of the
purified images, the share of identical predictions, the cosine similarity of the input
gradients, and clean accuracy on --clean-n test images (R = 1, seed 0).
On a CPU without native bfloat16 reduced precision saves memory, not time: the script says which
device ran it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--purifier", default="fashion-mnist-agdm",
                        help="registered name or folder of the purifier")
    parser.add_argument("--classifier", default=None,
                        help="classifier folder (default: the bundled fashion-mnist-resnet18)")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16",
                        help="comma-separated; float32 first is the reference")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per forward measurement (default: 512 on CUDA, 16 on CPU)")
    parser.add_argument("--attack-batch", type=int, default=None,
                        help="images per attack step (default: 128 on CUDA, 4 on CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-root", default=None,
                        help="Fashion-MNIST folder for the clean accuracy (default: the 512 "
                             "bundled test images)")
    parser.add_argument("--clean-n", type=int, default=512, help="test images for clean accuracy")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    return parser


def check_arguments(args: argparse.Namespace) -> list[str]:
    dtypes = [name.strip() for name in args.dtypes.split(",") if name.strip()]
    unknown = [name for name in dtypes if name not in DTYPES]
    if unknown or not dtypes or dtypes[0] != "float32":
        raise SystemExit(f"--dtypes: expected float32 first, then any of {', '.join(DTYPES)}, "
                         f"got {args.dtypes!r}")
    for option in ("batch", "attack_batch", "repeats", "clean_n"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise SystemExit(f"--{option.replace('_', '-')}: expected a positive integer, "
                             f"got {value}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device: {args.device!r} asked for, but no CUDA device is available")
    return dtypes


def test_images(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    if args.data_root is None:
        from purifyguard import bundled_test_images
        images, labels, _ = bundled_test_images()
    else:
        from purifyguard.data import load_dataset
        images, labels = load_dataset("fashion-mnist", args.data_root, train=False).tensors(
            args.clean_n)
    return images[:args.clean_n], labels[:args.clean_n]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, work) -> float:
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


def purified(model, images: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Purified images and predictions, seed 0, in batches."""
    torch.manual_seed(0)
    outputs, predictions = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            chunk = model.purifier.purify(images[start:start + batch])
            outputs.append(chunk.float())
            predictions.append(model.classify(chunk).argmax(1))
    return torch.cat(outputs), torch.cat(predictions)


def input_gradient(model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from purifyguard.evaluation.pgd import eot_gradient
    torch.manual_seed(0)
    return eot_gradient(model, images, labels, 1)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    dtypes = check_arguments(args)
    from purifyguard import PurifiedModel, Purifier, bundled_classifier
    from purifyguard.hub import load_guidance_network
    from purifyguard.presets import ASSETS

    cuda = args.device.startswith("cuda")
    batch = args.batch or (512 if cuda else 16)
    attack_batch = args.attack_batch or (128 if cuda else 4)
    bundled = ASSETS / "purifiers" / args.purifier
    folder = bundled if bundled.is_dir() else args.purifier  # a bundled name, a folder or Hub id
    classifier = (bundled_classifier() if args.classifier is None
                  else load_guidance_network(Path(args.classifier)))
    models = {name: PurifiedModel(classifier, Purifier.from_pretrained(
        folder, torch_dtype=DTYPES[name])).to(args.device).eval() for name in dtypes}
    images, labels = test_images(args)
    images, labels = images.to(args.device), labels.to(args.device)
    forward_images = images[:batch]
    attack_images, attack_labels = images[:attack_batch], labels[:attack_batch]

    timings = {name: {"forward": [], "attack": [], "peak_mib": []} for name in dtypes}
    for name, model in models.items():  # warm-up: kernels, allocator, cuDNN's choices
        with torch.no_grad():
            model(forward_images[:8])
        input_gradient(model, attack_images[:2], attack_labels[:2])
    for _ in range(args.repeats):
        for name, model in models.items():
            with torch.no_grad():
                seconds = timed(args.device, lambda model=model: model(forward_images))
            timings[name]["forward"].append(len(forward_images) / seconds)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            seconds = timed(args.device, lambda model=model: input_gradient(
                model, attack_images, attack_labels))
            timings[name]["attack"].append(seconds / len(attack_images))
            if cuda:
                timings[name]["peak_mib"].append((torch.cuda.max_memory_allocated() - base) / 2**20)

    reference_images, reference_predictions = purified(models["float32"], images, batch)
    reference_gradient = input_gradient(models["float32"], attack_images, attack_labels)
    rows = []
    for name, model in models.items():
        purified_images, predictions = purified(model, images, batch)
        difference = (purified_images - reference_images).flatten(1).abs().amax(1)
        gradient = input_gradient(model, attack_images, attack_labels)
        cosine = torch.nn.functional.cosine_similarity(gradient.float().flatten(1),
                                                       reference_gradient.float().flatten(1))
        rows.append({
            "dtype": name,
            "forward_images_per_s": statistics.median(timings[name]["forward"]),
            "attack_seconds_per_image": statistics.median(timings[name]["attack"]),
            "attack_peak_mib": (statistics.median(timings[name]["peak_mib"])
                                if timings[name]["peak_mib"] else None),
            "max_difference": difference.max().item(),
            "median_difference": difference.median().item(),
            "same_prediction": (predictions == reference_predictions).float().mean().item(),
            "gradient_cosine_mean": cosine.mean().item(),
            "gradient_cosine_min": cosine.min().item(),
            "clean_accuracy": (predictions == labels).float().mean().item(),
        })

    device_name = (f"{torch.cuda.get_device_name()} (CUDA)" if cuda
                   else f"CPU, {torch.get_num_threads()} threads")
    settings = (f"{device_name}, torch {torch.__version__}; purifier {args.purifier}; forward "
                f"batch {batch}, attack batch {attack_batch}, {args.repeats} alternating repeats; "
                f"fidelity and clean accuracy on {len(images)} test images")
    if cuda:
        settings += (f"; TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
                     f"TF32 cuDNN {torch.backends.cudnn.allow_tf32}")
    print(settings)
    print(f"{'dtype':9s} {'fwd img/s':>10s} {'ratio':>6s} {'attack s/img':>13s} {'ratio':>6s} "
          f"{'peak MiB':>9s} {'max diff':>9s} {'med diff':>9s} {'same pred':>9s} "
          f"{'grad cos':>9s} {'clean':>6s}")
    reference = rows[0]
    for row in rows:
        peak = "-" if row["attack_peak_mib"] is None else f"{row['attack_peak_mib']:.0f}"
        print(f"{row['dtype']:9s} {row['forward_images_per_s']:10.1f} "
              f"{row['forward_images_per_s'] / reference['forward_images_per_s']:6.2f} "
              f"{row['attack_seconds_per_image']:13.4f} "
              f"{reference['attack_seconds_per_image'] / row['attack_seconds_per_image']:6.2f} "
              f"{peak:>9s} {row['max_difference']:9.4f} {row['median_difference']:9.4f} "
              f"{row['same_prediction']:9.3f} {row['gradient_cosine_mean']:9.3f} "
              f"{row['clean_accuracy']:6.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
