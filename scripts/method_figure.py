"""The figure of docs/method.md: clean, adversarial, noised to t* and purified images.

    python scripts/method_figure.py [--output docs/images/purification.png]

Bundled assets only (offline, about a minute on a CPU): 6 Fashion-MNIST test images, PGD
(L-inf eps 0.1, 10 steps) on the bare bundled classifier, then the bundled fashion-mnist-agdm
purifier. Each image is labelled with the bundled classifier's prediction.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import purifyguard

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--output", default=str(Path(__file__).parent.parent / "docs/images/purification.png"))
args = parser.parse_args()
torch.manual_seed(0)

images, labels, classes = purifyguard.bundled_test_images()
images, labels = images[:6], labels[:6]
classifier = purifyguard.bundled_classifier("fashion-mnist-resnet18")
bare = purifyguard.PurifiedModel(classifier, purifier=False)
model = purifyguard.PurifiedModel(classifier, "fashion-mnist-agdm")
purifier = model.purifier

# PGD on the bare classifier: the perturbation the purifier has to remove.
eps, step = 0.1, 0.025
x_adv = (images + torch.empty_like(images).uniform_(-eps, eps)).clamp(0, 1)
for _ in range(10):
    x_adv.requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(bare(x_adv), labels), x_adv)
    x_adv = (images + (x_adv.detach() + step * grad.sign() - images).clamp(-eps, eps)).clamp(0, 1)

t_star = purifier.current_config().t_star
with torch.no_grad():
    noised = purifier.schedule.add_noise(2 * x_adv - 1, torch.randn_like(x_adv), t_star - 1)
    noised = ((noised + 1) / 2).clamp(0, 1)
    purified = purifier.purify(x_adv, seed=0)
    rows = [
        ("clean", images, bare(images)),
        ("adversarial (PGD, eps 0.1)", x_adv, bare(x_adv)),
        (f"noised to t* = {t_star}", noised, None),
        ("purified (fashion-mnist-agdm)", purified, bare(purified)),
    ]

fig, axes = plt.subplots(len(rows), len(images), figsize=(1.5 * len(images), 1.75 * len(rows)))
for r, (title, batch, logits) in enumerate(rows):
    for c in range(len(images)):
        ax = axes[r, c]
        ax.imshow(batch[c, 0], cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        if logits is not None:
            predicted = int(logits[c].argmax())
            ax.set_xlabel(classes[predicted], fontsize=8,
                          color="green" if predicted == int(labels[c]) else "red")
    axes[r, 0].set_ylabel(title, fontsize=8, rotation=0, ha="right", va="center")
fig.tight_layout()
Path(args.output).parent.mkdir(parents=True, exist_ok=True)
fig.savefig(args.output, dpi=80)
print("wrote", args.output)
