"""Adapt the bundled purifier to a classifier you hold in memory, from Python.

    python examples/adapt_classifier.py            # a few steps: shows the calls (a minute on a CPU)
    python examples/adapt_classifier.py --steps 300 --batch-size 16 --output-dir runs/adapted

Any nn.Module classifier will do: a timm model, a torchvision model or your own, as here (a small
CNN trained for a few hundred steps first). adapt_purifier puts it behind the input handling it
will be deployed with, PurifiedModel(classifier, purifier, mean=, std=, input_size=), fine-tunes
the purifier's guidance network and guidance scale against PGD through that pipeline, and returns
the adapted purifier. A torchvision model needs its input handling spelled out, e.g.

    model = torchvision.models.resnet18(num_classes=10)      # trained on your 3x32x32 images
    adapted = adapt_purifier(model, purifier, data=my_dataset, mean=(0.4914, 0.4822, 0.4465),
                             std=(0.2470, 0.2435, 0.2616), input_size=32)

Needs the Fashion-MNIST IDX files: --data-root <folder>, or $PURIFYGUARD_FASHION_MNIST, or
Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

from purifyguard import PurifiedModel
from purifyguard.registry import load_purifier
from purifyguard.train.adapt import adapt_purifier
from purifyguard.train.inputs import load_training_data

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data-root", help="Fashion-MNIST folder (default: "
                    "$PURIFYGUARD_FASHION_MNIST or /usr/share/datasets/fashion-mnist)")
parser.add_argument("--steps", type=int, default=2, help="adaptation optimizer steps")
parser.add_argument("--batch-size", type=int, default=2, help="images per adaptation step")
parser.add_argument("--output-dir", help="also write checkpoints and output_dir/final")
args = parser.parse_args()
torch.manual_seed(0)
torch.set_num_threads(min(torch.get_num_threads(), 4))

try:  # the data first: a missing data set is one message, before any work
    train = load_training_data("fashion-mnist", args.data_root)
    test = load_training_data("fashion-mnist", args.data_root, train=False)
except ValueError as error:
    sys.exit(f"adapt_classifier.py: {error}")


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


# 1. The classifier: 300 steps of plain training (a few seconds), on the raw [0, 1] images.
classifier = SmallCNN()
optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
train_images, train_labels = train.tensors(300 * 64)
for step in range(300):
    batch = slice(step * 64, (step + 1) * 64)
    loss = F.cross_entropy(classifier(train_images[batch]), train_labels[batch])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
classifier.eval()

# 2. Adaptation of the bundled purifier to it. The classifier takes [0, 1] images as they are:
#    mean 0 and std 1 say so (else PurifiedModel warns that it applies no normalisation).
purifier = load_purifier("fashion-mnist-agdm")
handling = {"mean": (0.0,), "std": (1.0,), "input_size": 28}
adapted = adapt_purifier(
    classifier, purifier, data="fashion-mnist", data_root=args.data_root, **handling,
    optimizer_steps=args.steps, batch_size=args.batch_size, attack_steps=1, sampler_steps=2,
    output_dir=args.output_dir, progress=False,
)
print(f"guidance scale {purifier.config.guidance_scale:g} -> {adapted.config.guidance_scale:g}")

# 3. The deployed pipeline: the same classifier and input handling, the adapted purifier.
model = PurifiedModel(classifier, adapted, **handling)
images, labels = test.tensors(16)
with torch.no_grad():
    accuracy = (model(images).argmax(1) == labels).float().mean().item()
print(f"clean accuracy of PurifiedModel(classifier, adapted) on 16 test images: {accuracy:.2f}")
if args.output_dir:
    print(f"saved: Purifier.from_pretrained({args.output_dir + '/final'!r})")
