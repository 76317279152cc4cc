"""Assemble the bundled Fashion-MNIST models (purifyguard/assets) from finished training runs.

    python scripts/bundle_fashion_mnist.py --diffusion runs/fmnist-diffusion/final \
        --classifier runs/fmnist-classifier/final --trades runs/fmnist-trades/final \
        [--adapted runs/fmnist-adapt/final] [--assets <staging folder>]

Each purifier is saved in the Hub layout with its settings and the clean and transfer accuracy
measured here on the 512 bundled test images (the adaptive figures come from the evaluation
harness, see docs/pretrained.md). Classifier folders are copied as the training exported them.

Nothing bundled names a folder of this machine: the training records in the model cards and in
purifier_config.json keep their commands with placeholders for the paths
(`--data-root '<fashion-mnist folder>' --output-dir '<run folder>'`, purifyguard.provenance),
and unet/config.json loses the `_name_or_path` that diffusers writes from the folder a UNet was
loaded from. tests/test_shipped_files.py checks the result. --assets writes the same layout
elsewhere (classifiers/, purifiers/): a staging folder to evaluate before bundling.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
from pathlib import Path

import torch
import torchattacks

from purifyguard import PurifiedModel, Purifier
from purifyguard.guidance_network_format import guidance_architecture, load_guidance_network
from purifyguard.model_card import network_card
from purifyguard.presets import ASSETS, bundled_test_images
from purifyguard.provenance import portable_command, portable_record

# Settings chosen under attack on held-out training images (benchmarks/choose_settings.py, the
# sweep in docs/pretrained.md): 5 DDIM steps kept the robust accuracy of 10 at half the cost.
PURIFIERS = {
    "fashion-mnist-ddpm": {"t_star": 300, "sampler": "ddim", "n_steps": 5, "guidance": "none"},
    "fashion-mnist-agdm": {"t_star": 300, "sampler": "ddim", "n_steps": 5,
                           "guidance": "adversarial", "guidance_scale": 400.0,
                           "distance": "cosine"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusion", required=True, help="diffusion routine's final/ folder")
    parser.add_argument("--classifier", required=True, help="standard classifier's final/")
    parser.add_argument("--trades", required=True, help="TRADES classifier's final/ (also the "
                        "guidance network)")
    parser.add_argument("--adapted", help="adapt routine's final/ folder: the AGDM purifier "
                        "adapted to --classifier (bundled as fashion-mnist-agdm-adapted; list it "
                        "in purifyguard.presets.BUNDLED_PURIFIERS to register it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--assets", type=Path, default=ASSETS,
                        help="where classifiers/ and purifiers/ go (default: the package's assets)")
    args = parser.parse_args()
    images, labels, _ = bundled_test_images()

    for name, folder in (("fashion-mnist-resnet18", args.classifier),
                         ("fashion-mnist-resnet18-trades", args.trades)):
        target = args.assets / "classifiers" / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target, ignore=shutil.ignore_patterns("metrics.json"))
        if not (target / "README.md").exists():  # runs older than the routine's own card
            write_classifier_card(Path(folder), target)
        card = target / "README.md"
        card.write_text(re.sub(r"`(purifyguard train [^`]+)`",
                               lambda found: f"`{portable_command(found.group(1))}`",
                               card.read_text()))
        print(f"bundled {target}")

    classifier = load_guidance_network(Path(args.classifier))
    undefended = PurifiedModel(classifier, purifier=False)
    torch.manual_seed(args.seed)
    adversarial = torchattacks.PGD(undefended, eps=0.1, alpha=0.025, steps=20,
                                   random_start=True)(images, labels)
    denoiser = Purifier.from_pretrained(args.diffusion)
    guidance_network = load_guidance_network(Path(args.trades))
    for name, settings in PURIFIERS.items():
        network = guidance_network if settings["guidance"] == "adversarial" else None
        training = {f"denoiser {k}": v for k, v in training_record(args.diffusion, "diffusion").items()}
        if network is not None:
            training.update({f"guidance network {k}": v
                             for k, v in training_record(args.trades, "guidance").items()})
        purifier = Purifier(denoiser.unet, denoiser.schedule.scheduler_config, network,
                            denoiser.config.replace(**settings, extra={"training": training}))
        torch.manual_seed(args.seed)
        metrics = measure(PurifiedModel(classifier, purifier), images, labels, adversarial)
        metrics["classifier"] = "bundled fashion-mnist-resnet18"
        target = args.assets / "purifiers" / name
        shutil.rmtree(target, ignore_errors=True)
        purifier.save_pretrained(target, metrics=metrics)
        drop_name_or_path(target)
        print(f"bundled {target}: {metrics}")

    if args.adapted:
        adapted = Purifier.from_pretrained(args.adapted)
        adaptation = dict(adapted.config.extra.get("adaptation", {}))
        if Path(str(adaptation.get("classifier", ""))).resolve() == Path(args.classifier).resolve():
            adaptation["classifier"] = "bundled fashion-mnist-resnet18"
        adapted = adapted.with_settings(
            extra=portable_record({**adapted.config.extra, "adaptation": adaptation}))
        torch.manual_seed(args.seed)
        metrics = measure(PurifiedModel(classifier, adapted), images, labels, adversarial)
        metrics["classifier"] = "bundled fashion-mnist-resnet18"
        target = args.assets / "purifiers" / "fashion-mnist-agdm-adapted"
        shutil.rmtree(target, ignore_errors=True)
        adapted.save_pretrained(target, metrics=metrics)
        drop_name_or_path(target)
        print(f"bundled {target}: {metrics}")


def drop_name_or_path(purifier_folder: Path) -> None:
    """Remove the `_name_or_path` diffusers records in unet/config.json: the folder the UNet was
    loaded from, a path of this machine."""
    config_file = purifier_folder / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    if config.pop("_name_or_path", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def training_record(final: str | Path, routine: str) -> dict[str, object]:
    """Command, steps, data and seed of the run that exported `final`, from its args.json."""
    options = json.loads((Path(final).parent / "args.json").read_text())
    flags = []
    for name, value in options.items():
        if value is None or value is False or name == "config":
            continue
        flags.append("--" + name.replace("_", "-"))
        if isinstance(value, list):
            flags.append(",".join(str(v) for v in value))
        elif isinstance(value, dict):
            flags.append(json.dumps(value))
        elif value is not True:
            flags.append(str(value))
    return {"command": portable_command(shlex.join(["purifyguard", "train", routine, *flags])),
            "steps": options["steps"], "data": f"{options['data']} (training split)",
            "seed": options["seed"]}


def write_classifier_card(run_final: Path, target: Path) -> None:
    network = load_guidance_network(run_final)
    architecture, kwargs = guidance_architecture(network)
    metrics = json.loads((run_final / "metrics.json").read_text())
    (target / "README.md").write_text(network_card(
        architecture, kwargs, title=f"{architecture} Fashion-MNIST classifier (purifyguard)",
        description="Standard training (cross-entropy on clean images).",
        training=training_record(run_final, "guidance"), metrics=metrics,
    ))


@torch.no_grad()
def measure(model: PurifiedModel, images: torch.Tensor, labels: torch.Tensor,
            adversarial: torch.Tensor) -> dict[str, object]:
    """Clean accuracy and accuracy on PGD-20 examples crafted on the classifier alone."""
    clean = sum((model(images[i:i + 64]).argmax(1) == labels[i:i + 64]).sum().item()
                for i in range(0, len(labels), 64)) / len(labels)
    transfer = sum((model(adversarial[i:i + 64]).argmax(1) == labels[i:i + 64]).sum().item()
                   for i in range(0, len(labels), 64)) / len(labels)
    return {
        "clean accuracy (512 bundled test images, 1 purification, seed 0)": round(clean, 4),
        "accuracy under transfer PGD-20, L-inf 0.1, crafted on the classifier alone "
        "(not adaptive)": round(transfer, 4),
    }


if __name__ == "__main__":
    main()
