"""What a training routine reads, checked before any work starts: its data set, and a classifier
behind the input handling (normalisation, resolution, channels) of the deployed PurifiedModel.

load_training_data finds the data or stops with one message that names the option to set and how
to get the files (Fashion-MNIST is never downloaded here: Debian's dataset-fashion-mnist, or the
four IDX files in a folder). add_classifier_arguments / classifier_from_options give a routine the
same classifier forms as `purifyguard evaluate --classifier` (a classifier folder, a bundled
classifier, a timm or torchvision name with weights), with its own mean, std and input size;
check_pipeline refuses a classifier that does not fit the data, or whose recorded input size is not
the data's (a folder written by timm.models.save_for_hf records timm's ImageNet size, 176 or 224).
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from purifyguard.option_types import positive_int, text

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset

    from purifyguard.purified_model import PurifiedModel

DEBIAN_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_VARIABLE = "PURIFYGUARD_FASHION_MNIST"


def load_training_data(name: str, root: str | Path | None, train: bool = True,
                       option: str = "--data-root") -> Dataset:
    """The data set, or ValueError saying what is missing and how to get it (option names the
    setting of the folder: --data-root on the command line, data_root= in Python).

    Fashion-MNIST comes from `root`, $PURIFYGUARD_FASHION_MNIST or Debian's
    /usr/share/datasets/fashion-mnist and is not downloaded; CIFAR-10/100 may be downloaded by
    torchvision when root holds no copy."""
    from purifyguard.data import DATASETS, fashion_mnist, load_dataset

    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r} (--data); choose one of {DATASETS}")
    if root is not None:
        root = Path(root).expanduser()
        if not root.exists():
            raise ValueError(f"{_setting(option, root)} does not exist" + (
                f". {fashion_mnist_help(option)}" if name == "fashion-mnist" else ""))
    split = "training" if train else "test"
    if name == "fashion-mnist":
        try:
            return fashion_mnist(root, train=train, download=False)
        except FileNotFoundError as error:
            found = (f"{_setting(option, root)}: {error}" if root is not None
                     else _fashion_mnist_absent())
            raise ValueError(f"Fashion-MNIST not found: {found}. {fashion_mnist_help(option)}") \
                from None
    if name == "imagefolder" and root is None:
        raise ValueError(f"--data imagefolder needs {_setting(option, '<folder of class sub-folders>')}")
    try:
        return load_dataset(name, root, train=train)
    except (OSError, RuntimeError, ValueError) as error:
        where = f" from {root}" if root is not None else ""
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot load the {name} {split} split{where}: {text} (set "
                         f"{_setting(option, '<folder>')} to the folder that holds it)") from None


def fashion_mnist_help(option: str = "--data-root") -> str:
    """How to get Fashion-MNIST and point purifyguard at it."""
    return (f"Install Debian's package {DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE}: the "
            "files land in /usr/share/datasets/fashion-mnist, found without any option), or put "
            "its four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, gzipped or not) in a folder and "
            f"pass {_setting(option, '<folder>')} or set {FASHION_MNIST_VARIABLE}=<folder>")


def _fashion_mnist_absent() -> str:
    from purifyguard.data import _DEBIAN_FASHION_MNIST

    variable = os.environ.get(FASHION_MNIST_VARIABLE)
    told = (f"${FASHION_MNIST_VARIABLE}={variable} does not hold the four IDX files"
            if variable else f"${FASHION_MNIST_VARIABLE} is not set")
    return f"no folder given, {told}, and {_DEBIAN_FASHION_MNIST} does not hold them"


def float_list(value: Any) -> tuple[float, ...]:
    """'0.5,0.5,0.5' (or a number, or a list) -> (0.5, 0.5, 0.5): per-channel statistics."""
    from purifyguard.option_types import finite_float

    parts = value if isinstance(value, (list, tuple)) else (
        str(value).split(",") if isinstance(value, (str, int, float))
        and not isinstance(value, bool) else None)
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}")
    return tuple(finite_float(part) for part in parts)


def add_classifier_arguments(parser: argparse.ArgumentParser | Any, name: str, what: str,
                             required: bool, absent: str = "none") -> None:
    """--NAME and its weights and input handling: --NAME-checkpoint, --NAME-pretrained,
    --NAME-mean, --NAME-std, --NAME-input-size (dests NAME, NAME_checkpoint, ...)."""
    flag = f"--{name}"
    parser.add_argument(
        flag, type=text, required=required,
        help=f"{what}: a classifier folder (config.json + model.safetensors, as `purifyguard "
             "train guidance` or timm's save_for_hf write it), a bundled classifier "
             f"(fashion-mnist-resnet18), or a timm or torchvision name with {flag}-checkpoint or "
             f"{flag}-pretrained (torchvision:NAME picks torchvision where timm has the name too)"
             + ("" if required else f" (default: {absent})"))
    parser.add_argument(f"{flag}-checkpoint", type=text,
                        help=f"the weights of a timm or torchvision {flag} name, a .safetensors "
                             "file (default: none)")
    parser.add_argument(f"{flag}-pretrained", action="store_true",
                        help=f"{flag} with timm's pretrained or torchvision's DEFAULT weights")
    parser.add_argument(f"{flag}-mean", type=float_list,
                        help="normalisation mean of its input, e.g. 0.4914,0.4822,0.4465 (default: "
                             "the classifier's own: its folder's or timm's config, or the "
                             "torchvision weights' transforms)")
    parser.add_argument(f"{flag}-std", type=float_list,
                        help=f"normalisation std (default: the classifier's own, as {flag}-mean)")
    parser.add_argument(f"{flag}-input-size", type=positive_int,
                        help="the side of the images it was trained on (default: the size its "
                             "config records, if any); must be the data's")


def flags_of(name: str) -> Callable[[str], str]:
    """How the command line spells a classifier's settings: flags_of("classifier")("input_size")
    is "--classifier-input-size", flags_of("classifier")("") is "--classifier"."""
    return lambda key="": f"--{name}" + (f"-{key.replace('_', '-')}" if key else "")


def keywords_of(model: str = "model") -> Callable[[str], str]:
    """How a Python call spells them: "input_size=", and `model` for the classifier itself."""
    return lambda key="": f"{key}=" if key else model


def classifier_from_options(args: argparse.Namespace, name: str, dataset: Dataset) -> PurifiedModel:
    """The classifier the options name (add_classifier_arguments), without a purifier, behind the
    input handling a deployed PurifiedModel gives it (check it against the data with
    check_pipeline)."""
    from purifyguard.evaluation.classifier_loading import resolve_classifier
    from purifyguard.purified_model import PurifiedModel

    option = flags_of(name)
    image = dataset[0][0]
    classes = tuple(getattr(dataset, "classes", ()))
    loaded = resolve_classifier(
        getattr(args, name), getattr(args, f"{name}_checkpoint"),
        getattr(args, f"{name}_pretrained"), image.shape[0], len(classes) or None,
        option=option())
    mean, std = getattr(args, f"{name}_mean"), getattr(args, f"{name}_std")
    normalization = loaded.normalization
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ValueError(f"give both {option('mean')} and {option('std')}, or neither")
        normalization = {"mean": mean, "std": std}
    input_size = getattr(args, f"{name}_input_size")
    try:
        pipeline = PurifiedModel(loaded.module, False, input_size=input_size, **normalization)
    except ValueError as error:
        raise ValueError(f"{option()} {getattr(args, name)}: {error} (on the command line: "
                         f"{option('mean')}, {option('std')}, {option('input_size')})") from None
    return pipeline


def check_pipeline(pipeline: PurifiedModel, dataset: Dataset, option: Callable[[str], str],
                   explicit_size: bool) -> None:
    """The classifier behind `pipeline` takes the data's images and predicts its classes, and its
    recorded input size is the data's: ValueError otherwise (only a warning when the size was
    given explicitly). option(key) spells a setting as the caller takes it ("--classifier-input-
    size", "input_size=")."""
    import torch

    from purifyguard.normalization import input_channels

    image = dataset[0][0]
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise ValueError("the data set must yield (image, label) pairs with images as (C, H, W) "
                         f"tensors in [0, 1], got {type(image).__name__} "
                         f"{tuple(getattr(image, 'shape', ()))}")
    channels, height, width = image.shape
    takes = input_channels(pipeline.classifier)
    if takes is not None and takes != channels:
        raise ValueError(f"{option('')} takes {takes}-channel images, the training images have "
                         f"{channels} ({channels}x{height}x{width})")
    size = pipeline.input_size
    if size is not None and (height, width) != (size, size):
        message = (
            f"{option('')}: the classifier reads {size}x{size} images (input_size {size}, from "
            f"{'the value given' if explicit_size else pipeline.normalization_source}), the "
            f"training images are {height}x{width}: the purifier would be adapted for a pipeline "
            "other than the one deployed (PurifiedModel takes input_size from the same place). "
            f"If the classifier was trained on {height}x{width} images, pass "
            f"{_setting(option('input_size'), height)} here and input_size={height} to the deployed "
            "PurifiedModel, or save it with its real input size (timm's save_for_hf records "
            "timm's ImageNet size; `purifyguard train guidance` and save_guidance_network with "
            f"pretrained_cfg_overlay={{'input_size': [{channels}, {height}, {width}]}} record "
            "the data's)")
        if not explicit_size:
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=3)
    classifier = pipeline.classifier
    device = next((p.device for p in classifier.parameters()), torch.device("cpu"))
    modes = {module: module.training for module in classifier.modules()}
    try:  # in eval mode: one image must not move a BatchNorm's running statistics
        with torch.no_grad():
            classifier.eval()
            pipeline.normalize.to(device)
            logits = pipeline.classify(image[None].to(device))
    except (RuntimeError, ValueError, TypeError) as error:
        raise ValueError(f"{option('')}: the classifier fails on one training image of shape "
                         f"{tuple(image.shape)}: {error}") from None
    finally:
        for module, training in modes.items():
            module.training = training
    classes = tuple(getattr(dataset, "classes", ()))
    if logits.dim() != 2 or (classes and logits.shape[1] != len(classes)):
        raise ValueError(f"{option('')}: the classifier gives logits of shape "
                         f"{tuple(logits.shape)} for one image; the data set has {len(classes)} "
                         "classes")


def _setting(name: str, value: object) -> str:
    """--option 28, or keyword=28."""
    return f"{name}{value}" if name.endswith("=") else f"{name} {value}"


def in_memory_label(obj: nn.Module | object) -> str:
    """How a record names an object given in memory: its class, e.g. 'torchvision ResNet'."""
    cls = type(obj)
    return f"{cls.__module__.split('.')[0]} {cls.__name__} (in memory)"
