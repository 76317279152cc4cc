"""Building the classifier that `purifyguard evaluate` / `compare` name (--classifier,
--checkpoint, --pretrained, --robustbench-dir): a bundled classifier or a purifyguard classifier
folder, a timm or torchvision name with weights, or a RobustBench model; with the normalisation
PurifiedModel should use for it, and a check that it fits the data set.

Nothing here imports model code at import time (timm, torchvision, safetensors and the hub load
when a classifier is built), so the command's --help stays fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

CLASSIFIER_CONFIG = "config.json"
CLASSIFIER_WEIGHTS = "model.safetensors"
ROBUSTBENCH_PREFIX = "robustbench:"
TORCHVISION_PREFIX = "torchvision:"


class LoadedClassifier(NamedTuple):
    """A classifier and how PurifiedModel should normalise its input (mean/std or a torchvision
    weights enum; empty: read off the model), with where that comes from when it is not the
    model's own config."""

    module: nn.Module
    normalization: dict[str, Any]
    source: str | None = None


def load_classifier(name: str, checkpoint: str | None = None, pretrained: bool = False,
                    in_chans: int | None = None, num_classes: int | None = None, *,
                    option: str = "--classifier",
                    robustbench_dir: str | None = None) -> nn.Module:
    """The classifier the options name (see the module docstring), in eval mode on the CPU.

    A classifier folder brings its own architecture settings and normalisation (restored by
    purifyguard.hub.load_guidance_network); a bare checkpoint is loaded into
    timm.create_model(name, in_chans=..., num_classes=...) or torchvision's builder."""
    return resolve_classifier(name, checkpoint, pretrained, in_chans, num_classes,
                              option=option, robustbench_dir=robustbench_dir).module


def resolve_classifier(name: str, checkpoint: str | None, pretrained: bool,
                       in_chans: int | None, num_classes: int | None, *, option: str,
                       robustbench_dir: str | None = None) -> LoadedClassifier:
    """load_classifier's classifier with the normalisation PurifiedModel should give it."""
    if name.startswith(ROBUSTBENCH_PREFIX):
        return _robustbench_classifier(name, checkpoint, pretrained, option, robustbench_dir)
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision_classifier(name[len(TORCHVISION_PREFIX):], checkpoint, pretrained,
                                       num_classes, option)
    folder = _classifier_folder(name, checkpoint, option)
    if folder is not None:
        if pretrained:
            raise ValueError(f"--pretrained does not go with the classifier folder {folder}")
        return LoadedClassifier(_from_folder(folder, checkpoint, option), {})
    import timm

    if timm.is_model(_base_architecture(name)):
        return LoadedClassifier(
            _timm_classifier(name, checkpoint, pretrained, in_chans, num_classes, option), {})
    if name in _torchvision_names():
        return _torchvision_classifier(name, checkpoint, pretrained, num_classes, option)
    raise ValueError(
        f"{option} {name!r} is not a bundled classifier (fashion-mnist-resnet18, "
        "fashion-mnist-resnet18-trades), a classifier folder, a timm or torchvision model name, "
        "or robustbench:<dataset>/<threat model>/<model>"
    )


def _robustbench_classifier(name: str, checkpoint: str | None, pretrained: bool, option: str,
                            model_dir: str | None) -> LoadedClassifier:
    if checkpoint is not None or pretrained:
        raise ValueError(f"{option} {name} brings RobustBench's own weights; leave out "
                         "--checkpoint / --pretrained")
    try:
        from purifyguard.adapters.robustbench import load_robustbench_model

        classifier = load_robustbench_model(
            name, model_dir=None if model_dir is None else Path(model_dir).expanduser())
    except (ValueError, ImportError, RuntimeError, KeyError) as error:
        # (a missing checkpoint that cannot be downloaded is a FileNotFoundError, reported as is)
        raise ValueError(f"{option} {name}: {_first_line(error)}") from None
    # RobustBench models normalise inside: they take [0, 1] images as they are.
    return LoadedClassifier(classifier.eval(), {"mean": (0.0,), "std": (1.0,)},
                            "RobustBench model: it normalises its [0, 1] input itself")


def _torchvision_names() -> list[str]:
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_classifier(name: str, checkpoint: str | None, pretrained: bool,
                            num_classes: int | None, option: str) -> LoadedClassifier:
    """A torchvision classification model: its DEFAULT weights (--pretrained), whose transforms
    give the normalisation, or a .safetensors checkpoint in a model built for num_classes."""
    import torchvision.models

    if name not in _torchvision_names():
        raise ValueError(f"{option} torchvision:{name}: torchvision has no classification model "
                         f"{name!r} (torchvision.models.list_models())")
    if checkpoint is None and not pretrained:
        raise ValueError(f"give the weights of {option} {name!r}: a .safetensors checkpoint "
                         "(--checkpoint) or --pretrained (torchvision's DEFAULT weights)")
    weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    normalization = {} if weights is None else {"weights": weights}
    if checkpoint is None:
        categories = len(weights.meta["categories"])
        if num_classes is not None and num_classes != categories:
            raise ValueError(
                f"{option} {name} --pretrained predicts the {categories} classes of {weights}, "
                f"the data set has {num_classes}; give a --checkpoint trained on its classes"
            )
        return LoadedClassifier(torchvision.models.get_model(name, weights=weights).eval(),
                                normalization)
    extra = {} if num_classes is None else {"num_classes": num_classes}
    classifier = torchvision.models.get_model(name, weights=None, **extra)
    _load_weights(classifier, Path(checkpoint).expanduser(), option,
                  f"torchvision {name!r} ({', '.join(f'{k}={v}' for k, v in extra.items())})")
    return LoadedClassifier(classifier.eval(), normalization)


def _load_weights(classifier: nn.Module, path: Path, option: str, described: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_checkpoint(path, option)
    try:
        classifier.load_state_dict(load_file(path))
    except (SafetensorError, RuntimeError, OSError, ValueError) as error:
        raise ValueError(
            f"checkpoint {path} does not load into {described}: {_first_line(error)}"
        ) from None


def _classifier_folder(name: str, checkpoint: str | None, option: str) -> Path | None:
    """The purifyguard classifier folder the options point at, if any."""
    from purifyguard.presets import ASSETS, CLASSIFIERS

    given = Path(name).expanduser()
    folder = given if given.is_dir() else (
        ASSETS / "classifiers" / name if name in CLASSIFIERS else None)
    if folder is not None:
        if checkpoint is not None:
            raise ValueError(
                f"{option} {name} is a classifier folder with its own weights; leave out the "
                "checkpoint option (or give a timm name with it)"
            )
        if _folder_config(folder) is None:
            raise ValueError(_not_a_classifier_folder(folder, name, option))
        return folder
    if checkpoint is None:
        return None
    folder = Path(checkpoint).expanduser().parent
    config = _folder_config(folder)
    if config is None:
        if (folder / CLASSIFIER_CONFIG).is_file():
            logger.warning(
                "ignoring %s beside the checkpoint: it is not a purifyguard classifier config",
                folder / CLASSIFIER_CONFIG,
            )
        return None
    architecture = config["architecture"]
    if _base_architecture(name) != _base_architecture(architecture):
        raise ValueError(
            f"{option} {name!r} does not match the checkpoint's folder: {folder / CLASSIFIER_CONFIG} "
            f"describes a {architecture!r}; give {option} {architecture} (or the folder itself)"
        )
    return folder


def _folder_config(folder: Path) -> dict[str, Any] | None:
    """{"architecture", "kwargs"} of the folder's config.json when it describes a timm network
    (timm's Hub format or purifyguard's older layout), checked as purifier folders are; None when
    there is no such config."""
    from purifyguard.files import read_json
    from purifyguard.hub import guidance_config

    path = folder / CLASSIFIER_CONFIG
    if not path.is_file():
        return None
    try:
        config = read_json(path, "classifier config")
    except ValueError as error:
        raise ValueError(f"{error}; a classifier folder's config.json must be intact") from None
    if not isinstance(config.get("architecture"), str):
        return None
    architecture, kwargs = guidance_config(config, path)
    return {"architecture": architecture, "kwargs": kwargs}


def _not_a_classifier_folder(folder: Path, name: str, option: str) -> str:
    """Why a folder given as the classifier is not one: what it holds instead (pickle weights,
    named, with how to convert them; a purifier folder; nothing) and what a classifier folder
    holds."""
    from purifyguard.folder_safety import (
        PURIFIER_CONFIG,
        describe_folder,
        find_pickles,
    )
    from purifyguard.guidance_network_format import network_pickle_message

    holds = (f"a classifier folder holds a {CLASSIFIER_CONFIG} naming a timm \"architecture\" "
             f"and {CLASSIFIER_WEIGHTS} (as timm's save_for_hf and purifyguard train guidance "
             "write them); or give a timm model name with a .safetensors checkpoint "
             "(--checkpoint)")
    pickles = find_pickles(folder)
    if pickles:
        return f"{option} {name}: {network_pickle_message(pickles, folder)}; {holds}"
    if (folder / PURIFIER_CONFIG).is_file():
        found = ("it is a purifier folder (it holds purifier_config.json): give it as the "
                 "purifier (--purifier), not as the classifier")
    elif (folder / CLASSIFIER_CONFIG).is_file():
        found = f"its {CLASSIFIER_CONFIG} names no timm \"architecture\""
    else:
        found = describe_folder(folder)
    return f"{option} {name}: not a classifier folder, {found}; {holds}"


def _from_folder(folder: Path, checkpoint: str | None, option: str) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from purifyguard.hub import create_guidance_network, load_guidance_network

    weights = Path(checkpoint).expanduser() if checkpoint is not None else None
    if weights is not None:
        _check_checkpoint(weights, option)
    try:
        if weights is None or weights.name == CLASSIFIER_WEIGHTS:
            return load_guidance_network(folder).eval()
        config = _folder_config(folder)
        network = create_guidance_network(config["architecture"], **config.get("kwargs", {}))
        load_model(network, str(weights), strict=True, device="cpu")
        return network.eval()
    except (SafetensorError, RuntimeError, TypeError, KeyError) as error:
        raise ValueError(
            f"{option}: cannot load the classifier of {folder}: {_first_line(error)}"
        ) from None


def _timm_classifier(name: str, checkpoint: str | None, pretrained: bool, in_chans: int | None,
                     num_classes: int | None, option: str) -> nn.Module:
    import timm

    if checkpoint is None and not pretrained:
        raise ValueError(
            f"give the weights of {option} {name!r}: a .safetensors checkpoint (--checkpoint), "
            "--pretrained, or a classifier folder instead of the name"
        )
    extra = {} if num_classes is None else {"num_classes": num_classes}
    if in_chans is not None:
        extra["in_chans"] = in_chans
    classifier = timm.create_model(name, pretrained=pretrained, **extra)
    if checkpoint is not None:
        _load_weights(classifier, Path(checkpoint).expanduser(), option,
                      f"timm {name!r} ({', '.join(f'{k}={v}' for k, v in extra.items())})")
    return classifier.eval()


def _check_checkpoint(path: Path, option: str) -> None:
    from purifyguard.hub import PICKLE_SUFFIXES

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"refusing the pickle checkpoint {path} of {option}: purifyguard loads safetensors "
            "only, because unpickling can run arbitrary code; re-save the weights with "
            "safetensors.torch.save_file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} of {option} does not exist")


def check_fits(classifier: nn.Module, option: str, channels: int, n_classes: int,
                dataset: str) -> None:
    """The classifier takes the data set's images and predicts its classes."""
    from purifyguard.normalization import input_channels

    takes = input_channels(classifier)
    if takes is not None and takes != channels:
        raise ValueError(
            f"{option} takes {takes}-channel images, the {dataset} images have {channels}"
        )
    outputs = getattr(classifier, "num_classes", None)
    if n_classes and isinstance(outputs, int) and outputs != n_classes:
        raise ValueError(
            f"{option} predicts {outputs} classes, the {dataset} data set has {n_classes}: its "
            "labels would not match the classifier's outputs"
        )


def _base_architecture(name: str) -> str:
    from timm.models import split_model_name_tag

    return split_model_name_tag(name)[0]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
