"""Checks of the evaluation entry points' arguments, run before any work starts.

Every check raises a ValueError naming the argument, the value it got and what was expected, so
that a typo (n=-5, batch_size=0, seed="abc") never turns into a silently different evaluation or a
traceback from deep inside an attack. The argparse types at the end do the same on the command
line (argparse turns their errors into a usage message naming the option).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from purifyguard.validation import check_images

FORBIDDEN_IN_NAMES = ("/", "\\", "\0")


def check_name(what: str, value: Any) -> str:
    """A model or attack name: it becomes part of file names in the output folder."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if any(c in value for c in FORBIDDEN_IN_NAMES) or value in (".", ".."):
        raise ValueError(
            f"{what} {value!r} cannot name a file in the output folder: use no '/', '\\' or NUL, "
            "and not '.' or '..'"
        )
    return value


def check_output_dir(value: Any) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise ValueError(f"output_dir must be a folder path (str or Path) or None, got {value!r}")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir {str(path)!r} exists and is not a folder")
    return path


def check_models(value: Any, what: str = "models") -> dict[str, nn.Module]:
    if not isinstance(value, Mapping) or not value:
        raise ValueError(
            f"{what} must be a non-empty dict of name -> nn.Module, got {_describe(value)}"
        )
    for name, model in value.items():
        check_name(f"{what} name", name)
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"{what}[{name!r}] must be an nn.Module (a model from [0, 1] images to logits), "
                f"got {type(model).__name__}"
            )
    return dict(value)


def check_model(name: str, value: Any, optional: bool = False) -> nn.Module | None:
    if value is None and optional:
        return None
    if not isinstance(value, nn.Module):
        expected = "an nn.Module or None" if optional else "an nn.Module"
        raise ValueError(f"{name} must be {expected}, got {type(value).__name__}")
    return value


def check_device(value: Any) -> torch.device | None:
    if value is None:
        return None
    if not isinstance(value, (str, torch.device)):
        raise ValueError(f"device must be a torch.device, a string such as 'cpu' or 'cuda:0', or "
                         f"None, got {type(value).__name__}")
    try:
        return torch.device(value)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"device {value!r} is not a device: {error}") from None


def check_undefended(value: Any, models: dict[str, nn.Module]) -> dict[str, nn.Module | None]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(
            f"undefended must be a dict of model name -> bare classifier (or None), got "
            f"{type(value).__name__}"
        )
    unknown = sorted(set(value) - set(models), key=str)
    if unknown:
        raise ValueError(f"undefended names models that are not evaluated: {unknown}; "
                         f"models: {sorted(models)}")
    for name, model in value.items():
        check_model(f"undefended[{name!r}]", model, optional=True)
    return dict(value)


def check_n_per_model(value: Any, models: dict[str, nn.Module], n: int,
                      batch_size: int) -> dict[str, int]:
    """n_per_model: model name -> k images (the first k of the n), each k a whole number of
    batches (or at least n: all of them), so that a stored batch covers the same images for
    every k."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"n_per_model must be a dict of model name -> number of images, got "
                         f"{type(value).__name__}")
    unknown = sorted(set(value) - set(models), key=str)
    if unknown:
        raise ValueError(f"n_per_model names models that are not evaluated: {unknown}; "
                         f"models: {sorted(models)}")
    for name, count in value.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"n_per_model[{name!r}] must be a positive int, got {count!r}")
        if count < n and count % batch_size:
            raise ValueError(f"n_per_model[{name!r}] must be a multiple of batch_size "
                             f"({batch_size}) or at least n ({n}), got {count}")
    return dict(value)


def check_attack_list(value: Any, parse: Callable[[str], Any], spec_type: type) -> list | None:
    """None (the protocol's set), or a list of AttackSpec / attack strings; a single one is
    taken as a list of one."""
    if value is None:
        return None
    if isinstance(value, (str, spec_type)):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, (bytes, bytearray)):
        raise ValueError(
            f"attacks must be a list of AttackSpec or attack strings (or None for the "
            f"protocol's set), got {_describe(value)}"
        )
    if not value:
        raise ValueError("attacks is empty; pass None for the protocol's set of attacks")
    specs = []
    for i, attack in enumerate(value):
        if isinstance(attack, str):
            specs.append(parse(attack))
        elif isinstance(attack, spec_type):
            specs.append(attack)
        else:
            raise ValueError(
                f"attacks[{i}] must be an AttackSpec or a string such as "
                f"'pgd:eps=0.1,steps=20', got {type(attack).__name__}"
            )
    return specs


def check_data(data: Any) -> None:
    """A Dataset of (image, label) pairs, or an (images, labels) pair of equal lengths."""
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(
                f"data must be a Dataset or an (images, labels) pair, got a {type(data).__name__} "
                f"of length {len(data)}"
            )
        images, labels = data
        if not isinstance(images, torch.Tensor):
            raise ValueError(
                f"data's images must be a torch.Tensor (N, C, H, W) in [0, 1], got "
                f"{type(images).__name__}"
            )
        if images.dim() != 4:
            raise ValueError(
                f"data's images must be 4-D (N, C, H, W), got shape {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"data's images must be floating point in [0, 1], got dtype {images.dtype}"
            )
        try:
            count = len(labels)
        except TypeError:
            raise ValueError(
                f"data's labels must be a tensor or sequence of class indices, got "
                f"{type(labels).__name__}"
            ) from None
        if count != len(images):
            raise ValueError(
                f"data holds {len(images)} images but {count} labels; they must match"
            )
        if count == 0:
            raise ValueError("data is empty: no images to evaluate")
        return
    if not isinstance(data, Dataset) and not (
        hasattr(data, "__getitem__") and hasattr(data, "__len__")
    ):
        raise ValueError(
            f"data must be a Dataset of (image, label) or an (images, labels) pair, got "
            f"{type(data).__name__}"
        )
    if len(data) == 0:
        raise ValueError("data is empty: no images to evaluate")


def check_examples(images: torch.Tensor, labels: torch.Tensor,
                   class_names: Sequence[str] | None) -> torch.Tensor:
    """The selected examples: images 4-D floats in [0, 1], labels integer class indices."""
    images = check_images(images, "data's images")
    if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(
            f"data's labels must be a 1-D tensor of integer class indices, got shape "
            f"{tuple(labels.shape)} and dtype {labels.dtype}"
        )
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(f"data's labels must be class indices >= 0, got {int(labels.min())}")
    if class_names is not None and len(labels) and int(labels.max()) >= len(class_names):
        raise ValueError(
            f"class_names has {len(class_names)} names but the data has label "
            f"{int(labels.max())}"
        )
    return images


def check_class_names(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(
            f"class_names must be a non-empty list of strings (one per class) or None, got "
            f"{_describe(value)}"
        )
    for i, name in enumerate(value):
        if not isinstance(name, str):
            raise ValueError(f"class_names[{i}] must be a string, got {name!r}")
    return list(value)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}... ({type(value).__name__})" if len(text) > 60 else (
        f"{text} ({type(value).__name__})"
    )


# --- argparse types -----------------------------------------------------------------------------
