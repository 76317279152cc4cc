"""Quickstart: put the default purifier in front of a timm and a torchvision classifier.

    python examples/quickstart.py

Runs offline: the Fashion-MNIST purifier and 512 test images ship with purifyguard.
"""

import timm
import torch
import torchvision

import purifyguard

images, labels, classes = purifyguard.bundled_test_images()
images, labels = images[:8], labels[:8]

# The bundled classifier, trained on Fashion-MNIST; no purifier argument: the registered default
# for 1-channel 28x28 input (fashion-mnist-agdm) is picked and logged.
classifier = purifyguard.bundled_classifier("fashion-mnist-resnet18")
model = purifyguard.PurifiedModel(classifier)
with torch.no_grad():
    predicted = model(images).argmax(1)
print("bundled classifier, purified:", [classes[i] for i in predicted])
print("accuracy on 8 images:", (predicted == labels).float().mean().item())

# Any timm model (untrained here, so its predictions mean nothing): PurifiedModel reads its
# normalisation from timm's pretrained config.
timm_model = timm.create_model("resnet18", num_classes=10, in_chans=1)
print("timm:", purifyguard.PurifiedModel(timm_model).normalization_source)

# A torchvision model does not record how it wants its input, so say it: mean, std and the
# side of the images it reads, as it was trained (or weights=<the torchvision Weights enum you
# loaded>, whose transforms say it). It takes RGB: the grey images are converted for the grey
# purifier and back.
tv_model = torchvision.models.resnet18(num_classes=10)
tv_purified = purifyguard.PurifiedModel(
    tv_model, "fashion-mnist-agdm", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=28
)
with torch.no_grad():
    logits = tv_purified(images.expand(-1, 3, -1, -1))
print("torchvision:", tv_purified.normalization_source, "->", tuple(logits.shape))
