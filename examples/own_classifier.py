"""Your own classifier, end to end: wrap, adapt, save, load, evaluate.

    python examples/own_classifier.py                   # a tiny setting: shows the calls (~2 min)
    python examples/own_classifier.py --train-steps 1000 --adapt-steps 300 --n 256 --runs 10

Two classifiers that purifyguard never saw, trained here on Fashion-MNIST: a torchvision ResNet-18
(its first layer made grey) and a small CNN of your own. Each one goes through the journey a user
takes: PurifiedModel(classifier, "fashion-mnist-agdm", mean=, std=, input_size=) states its input
handling; adapt_purifier fine-tunes the purifier for it; save_pretrained writes one folder;
from_pretrained loads it back (a classifier that is not a timm model comes back into an instance
you pass, since nothing is imported from a folder); evaluate measures it under attack. The tiny
default setting shows the calls, not robustness: its figures are labelled reduced.

Needs the Fashion-MNIST IDX files: --data-root <folder>, or $PURIFYGUARD_FASHION_MNIST, or
Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from purifyguard import PurifiedModel, evaluate
from purifyguard.option_types import positive_int
from purifyguard.registry import load_purifier
from purifyguard.train.adapt import adapt_purifier
from purifyguard.train.inputs import load_training_data

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data-root", help="Fashion-MNIST folder (default: "
                    "$PURIFYGUARD_FASHION_MNIST or /usr/share/datasets/fashion-mnist)")
parser.add_argument("--train-steps", type=positive_int, default=60,
                    help="steps of plain training for each classifier (batch 64)")
parser.add_argument("--adapt-steps", type=positive_int, default=2, help="adaptation steps")
parser.add_argument("--n", type=positive_int, default=8, help="test images to evaluate")
parser.add_argument("--runs", type=positive_int, default=2, help="R purifications per verdict")
parser.add_argument("--output-dir", default="own-classifier-models",
                    help="where the saved defended models go")
args = parser.parse_args()
torch.manual_seed(0)
torch.set_num_threads(1)

try:  # the data first: a missing data set is one message, before any work
    train = load_training_data("fashion-mnist", args.data_root)
    test = load_training_data("fashion-mnist", args.data_root, train=False)
except ValueError as error:
    sys.exit(f"own_classifier.py: {error}")


class SmallCNN(nn.Module):
    """A classifier of your own: 1x28x28 images in [0, 1] -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.head = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def grey_resnet18() -> nn.Module:
    """torchvision's ResNet-18 for 1x28x28 images: its first layer takes one channel."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def train_plainly(classifier: nn.Module, steps: int) -> nn.Module:
    """Plain training on the raw [0, 1] images (the input handling below says so)."""
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    images, labels = train.tensors(steps * 64)
    classifier.train()
    for step in range(steps):
        batch = slice(step * 64, (step + 1) * 64)
        loss = F.cross_entropy(classifier(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return classifier.eval()


# The classifiers take [0, 1] images as they are, at 28x28: mean 0 and std 1 say so.
handling = {"mean": (0.0,), "std": (1.0,), "input_size": 28}
test_images, test_labels = test.tensors(args.n)
folder = Path(args.output_dir)
for name, build in (("resnet18", grey_resnet18), ("small-cnn", SmallCNN)):
    classifier = train_plainly(build(), args.train_steps)
    # 1. Wrap, 2. adapt the bundled purifier to this classifier behind the same input handling.
    adapted = adapt_purifier(
        classifier, load_purifier("fashion-mnist-agdm"), data="fashion-mnist",
        data_root=args.data_root, **handling, optimizer_steps=args.adapt_steps, batch_size=2,
        attack_steps=1, sampler_steps=2, progress=False,
    )
    defended = PurifiedModel(classifier, adapted, **handling)
    # 3. Save as one folder; 4. load it back into a fresh instance of the architecture.
    defended.save_pretrained(folder / name)
    loaded = PurifiedModel.from_pretrained(folder / name, classifier=build())
    # 5. Evaluate the loaded model under attack (a reduced setting unless you raise it).
    report = evaluate(loaded, (test_images, test_labels), ["pgd:eps=0.1,steps=2,eot=1"],
                      n=args.n, runs=args.runs, progress=False, eot_check=0)
    record = report["records"][0]
    print(f"{name}: saved to {folder / name}; clean {100 * record['clean_accuracy']['mean']:.0f} %, "
          f"robust {100 * record['robust_accuracy']['mean']:.0f} % (worst of {args.runs}: "
          f"{100 * record['robust_accuracy']['worst_case']:.0f} %) under "
          f"{record['attack']['name']} on {args.n} test images"
          f"{' (reduced setting)' if record['attack']['reduced'] else ''}")
