"""CIFAR-10: a diffusers DDPM as the purifier, in front of a CIFAR-10 classifier.

    python examples/cifar10.py            # offline: a tiny, untrained DDPM of the same layout
    python examples/cifar10.py --online   # google/ddpm-cifar10-32 from the Hub (35.7M params)

Offline, the example saves a DDPMPipeline configured as google/ddpm-cifar10-32 (3x32x32, the
same block types and noise schedule) but shrunk and untrained, and loads it with the very call
that loads the Hub repo, so the code path is the same; its purified images are noise-like and its
accuracy means nothing. With --online the real denoiser is downloaded; either way the classifier
here is an untrained torchvision ResNet-18: put your trained CIFAR-10 classifier in its place.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

import purifyguard

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--online", action="store_true", help="use google/ddpm-cifar10-32")
parser.add_argument("--output-dir", default="purifyguard-cifar10")
args = parser.parse_args()
torch.manual_seed(0)

if args.online:
    source = "google/ddpm-cifar10-32"
else:
    # google/ddpm-cifar10-32's configuration with block_out_channels (128, 256, 256, 256) and
    # layers_per_block 2 shrunk for speed; the scheduler is the same linear 1000-step DDPM.
    unet = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3,
        block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    source = Path(args.output_dir) / "tiny-ddpm-cifar10-32"
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(source)

# Unguided DDPM purification (DiffPure-style) at t* = 100, sampled here with 10 DDIM steps.
purifier = purifyguard.Purifier.from_diffusers(source, t_star=100, sampler="ddim", n_steps=10)
classifier = torchvision.models.resnet18(num_classes=10)   # your CIFAR-10 classifier here
# How it wants its input, as it was trained: nothing is guessed for a torchvision model (pass
# weights=<the torchvision Weights enum> instead for torchvision's own weights).
model = purifyguard.PurifiedModel(
    classifier, purifier,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), input_size=32,
).eval()

images = torch.rand(4, 3, 32, 32)           # CIFAR-10 images in [0, 1], e.g. from torchvision
with torch.no_grad():
    purified = model.purify(images)
    logits = model.classify(purified)
print(f"purifier from {source}: {purifier.current_config().sampler}, "
      f"t*={purifier.current_config().t_star}, {purifier.channels}x{purifier.resolution}^2")
print("classifier normalisation:", model.normalization_source)
print("purified", tuple(purified.shape), "-> logits", tuple(logits.shape))
