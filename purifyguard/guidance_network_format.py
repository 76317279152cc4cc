"""The guidance network's format: timm's own Hub format, read by a checked loader.

A network folder (a purifier's guidance/, or a classifier exported by `purifyguard train
guidance`) holds config.json and model.safetensors as timm.models.save_for_hf writes them, so
timm.create_model("local-dir:<folder>", pretrained=True) and "hf-hub:<repo>" load it too.
purifyguard reads it with its own loader: the config must name a timm architecture with plain
create_model kwargs (nothing that loads or fetches weights from elsewhere), only the input
settings of its pretrained_cfg are applied, and the safetensors weights must match the
architecture tensor by tensor and be finite. The older purifyguard layout {"library": "timm",
"architecture": ..., "kwargs": {...}} still loads. Only timm models can be saved: a network is
saved with the create_model kwargs that rebuild it, checked shape by shape.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_model
from torch import nn

from purifyguard.files import check_inside, read_json, write_json
from purifyguard.folder_safety import (
    NETWORK_FOLDER_HOLDS,
    PickleInsteadError,
    find_pickles,
    link_root,
    require_file,
)
from purifyguard.weight_checks import check_weight_shapes, check_weights_finite

GUIDANCE_CONFIG = "config.json"
GUIDANCE_WEIGHTS = "model.safetensors"
# create_model kwargs that would load weights from outside a model folder.
FORBIDDEN_TIMM_KWARGS = frozenset(
    {"pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_strict", "cache_dir"}
)
# What a saved pretrained_cfg_overlay may say: how the network wants its input.
INPUT_CONFIG_KEYS = frozenset(
    {"mean", "std", "input_size", "interpolation", "crop_pct", "crop_mode", "num_classes"}
)
# The keys of a timm config's pretrained_cfg that purifyguard applies (as pretrained_cfg_overlay);
# the rest of it (file, url, hf_hub_id, state_dict, ...) is never followed.
PRETRAINED_INPUT_KEYS = ("mean", "std", "input_size", "interpolation", "crop_pct", "crop_mode")
# The older purifyguard layout of a network config.json.
OLD_LAYOUT_KEYS = frozenset({"library", "architecture", "kwargs"})
# Set on guidance networks built by create_guidance_network, so that they save themselves again.
TIMM_KWARGS_ATTRIBUTE = "purifyguard_timm_kwargs"


def create_guidance_network(architecture: str, **kwargs: Any) -> nn.Module:
    """timm.create_model(architecture, pretrained=False, **kwargs), remembering the kwargs so
    that save_pretrained can write them."""
    network = timm.create_model(architecture, pretrained=False, **kwargs)
    setattr(network, TIMM_KWARGS_ATTRIBUTE, dict(kwargs))
    return network


def is_timm_model(network: nn.Module) -> bool:
    """Whether the network is a timm model (it carries timm's pretrained_cfg with its
    architecture name), the kind of network purifyguard can save."""
    pretrained_cfg = getattr(network, "pretrained_cfg", None)
    return (isinstance(pretrained_cfg, dict) and isinstance(pretrained_cfg.get("architecture"), str)
            and hasattr(network, "num_classes"))


def guidance_architecture(
    network: nn.Module, kwargs: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """The timm name and create_model kwargs that rebuild the network, checked shape by shape.

    num_classes and in_chans are read off the network; other kwargs come from `kwargs` or from
    create_guidance_network. (save_guidance_network also takes the arguments timm itself
    recorded when it built the network.)
    """
    check_saveable(network)
    architecture = network.pretrained_cfg["architecture"]
    found = json.loads(json.dumps(_export_arguments(network, kwargs)))  # tuples become lists
    _check_rebuilds(network, architecture, found)
    return architecture, found


def save_guidance_network(
    network: nn.Module, folder: Path, kwargs: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """Write config.json and model.safetensors in timm's own Hub format, with
    timm.models.save_for_hf(safe_serialization=True): timm.create_model("local-dir:<folder>",
    pretrained=True) loads the folder, and so does "hf-hub:<repo>" once it is uploaded.

    The files are written to a staging folder first; its config.json is read back with
    load_guidance_network's own parser and must rebuild the network tensor by tensor before
    anything replaces the folder's files. Returns (architecture, the create_model kwargs that
    load_guidance_network uses). The config also says "library": "timm" (an extra top-level key,
    which timm ignores), by which older purifyguard code recognises a network folder.
    """
    check_saveable(network)
    arguments = _export_arguments(network, kwargs)
    overlay = arguments.pop("pretrained_cfg_overlay", None)
    recorded = getattr(network, TIMM_KWARGS_ATTRIBUTE, {}).get("pretrained_cfg_overlay")
    if overlay is not None and overlay != recorded:  # given in kwargs: not in pretrained_cfg yet
        if not isinstance(overlay, dict) or set(overlay) - INPUT_CONFIG_KEYS:
            raise ValueError(
                f"guidance_kwargs pretrained_cfg_overlay may set only {sorted(INPUT_CONFIG_KEYS)}, "
                f"got {overlay!r}"
            )
    else:
        overlay = None
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        try:
            timm.models.save_for_hf(
                network, staging, model_config={"library": "timm"},
                model_args=json.loads(json.dumps(arguments)), safe_serialization=True,
            )
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"cannot save the guidance network {network.pretrained_cfg['architecture']} in "
                f"timm's format: {error}; pass guidance_kwargs={{...}} with JSON values for the "
                "arguments it was created with"
            ) from None
        config = read_json(staging / GUIDANCE_CONFIG, "network config")
        if overlay:
            config["pretrained_cfg"] = {**config.get("pretrained_cfg", {}),
                                        **json.loads(json.dumps(overlay))}
            write_json(staging / GUIDANCE_CONFIG, config)
        architecture, create_kwargs = guidance_config(config, folder / GUIDANCE_CONFIG)
        _check_rebuilds(network, architecture, create_kwargs)
        folder.mkdir(parents=True, exist_ok=True)
        for name in (GUIDANCE_WEIGHTS, GUIDANCE_CONFIG):
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return architecture, create_kwargs


def load_guidance_network(folder: str | Path) -> nn.Module:
    """The timm network of a folder (guidance/, or an exported classifier), in timm's Hub format
    or purifyguard's older layout: its config is checked to name a timm architecture with plain
    kwargs, only the input settings of a saved pretrained_cfg are applied, and its safetensors
    weights must match the architecture, tensor by tensor, and be finite. Nothing is fetched,
    followed or unpickled: unlike timm's local-dir: loader, no .pth or .bin fallback, no hf-hub:
    name, no pretrained_cfg file or url."""
    folder = Path(folder)
    if not (folder / GUIDANCE_WEIGHTS).is_file() and find_pickles(folder):
        raise PickleInsteadError(network_pickle_message(find_pickles(folder), folder))
    config_file = require_file(folder / GUIDANCE_CONFIG, holds=NETWORK_FOLDER_HOLDS)
    weights = require_file(folder / GUIDANCE_WEIGHTS, holds=NETWORK_FOLDER_HOLDS)
    for path in (config_file, weights):
        check_inside(path, link_root(folder))
    architecture, kwargs = guidance_config(read_json(config_file, "network config"), config_file)
    try:
        network = create_guidance_network(architecture, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as error:
        raise ValueError(
            f"{config_file}: timm.create_model({architecture!r}, **{kwargs}) fails: {error}"
        ) from None
    check_weight_shapes(network, weights)
    load_model(network, str(weights), strict=True, device="cpu")
    check_weights_finite(network, weights)
    return network.eval()


def network_pickle_message(pickles: list[Path], folder: Path) -> str:
    """Why a network folder holding pickle weights (and no model.safetensors) is refused, and
    how to convert them."""
    names = ", ".join(path.name for path in pickles)
    return (
        f"{folder} holds the pickle weights {names} and no {GUIDANCE_WEIGHTS}: pickle files are "
        "refused because unpickling can run arbitrary code. Convert them where you trust the "
        "file: load it yourself (model.load_state_dict(torch.load(path, weights_only=True))) "
        f"and save the weights with safetensors (safetensors.torch.save_file(model.state_dict(), "
        f"'{GUIDANCE_WEIGHTS}') beside a timm config.json, or timm.models.save_for_hf(model, "
        "folder, safe_serialization=True) for a timm model); then remove the pickle file"
    )


def guidance_config(config: dict[str, Any], path: Path) -> tuple[str, dict[str, Any]]:
    """(architecture, create_model kwargs) of a network config.json, in timm's Hub format
    (architecture, num_classes, model_args, pretrained_cfg) or purifyguard's older layout
    (library, architecture, kwargs). Anything that would make timm load or fetch weights from
    elsewhere is refused (a checkpoint_path, pretrained=True, an hf-hub: or local-dir: name);
    of a timm pretrained_cfg only the input settings are kept (file, url, hf_hub_id are not)."""
    if set(config) <= OLD_LAYOUT_KEYS:
        return _old_layout_config(config, path)
    if "kwargs" in config:
        raise ValueError(
            f"{path} mixes the two layouts: 'kwargs' (purifyguard's older layout) with "
            f"{sorted(set(config) - OLD_LAYOUT_KEYS)} (timm's); write it again with "
            "save_guidance_network"
        )
    architecture, model_args = _architecture_and_arguments(config, "model_args", path)
    if "pretrained_cfg_overlay" in model_args:
        raise ValueError(
            f"{path}: model_args may not hold pretrained_cfg_overlay; the input settings belong "
            "in pretrained_cfg"
        )
    pretrained_cfg = config.get("pretrained_cfg", config)  # timm's legacy single-dict form
    if not isinstance(pretrained_cfg, dict):
        raise ValueError(f"{path}: pretrained_cfg must be a mapping, got {pretrained_cfg!r}")
    kwargs = dict(model_args)
    num_classes = config.get("num_classes")
    if num_classes is not None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"{path}: num_classes must be an integer >= 0, got {num_classes!r}")
        if kwargs.setdefault("num_classes", num_classes) != num_classes:
            raise ValueError(
                f"{path}: num_classes is {num_classes} but model_args says "
                f"{model_args['num_classes']}"
            )
    overlay = {key: pretrained_cfg[key] for key in PRETRAINED_INPUT_KEYS
               if pretrained_cfg.get(key) is not None}
    _check_input_settings(overlay, path)
    if "input_size" in overlay and isinstance(kwargs.get("in_chans"), int):  # as timm does
        overlay["input_size"] = [kwargs["in_chans"], *overlay["input_size"][1:]]
    if kwargs.get("num_classes") is not None:
        overlay["num_classes"] = kwargs["num_classes"]
    if overlay:
        kwargs["pretrained_cfg_overlay"] = overlay
    return architecture, kwargs


def _architecture_and_arguments(
    config: dict[str, Any], key: str, path: Path
) -> tuple[str, dict[str, Any]]:
    """The checks both layouts share: a timm library and architecture name, and create_model
    arguments (under `key`) that are a mapping naming nothing to load from elsewhere."""
    _check_library(config, path)
    architecture = _check_architecture(config.get("architecture"), path)
    arguments = config.get(key, {})
    if not isinstance(arguments, dict):
        raise ValueError(f"{path}: {key} must be a mapping, got {arguments!r}")
    _check_forbidden(arguments, path, key)
    return architecture, arguments


def _old_layout_config(config: dict[str, Any], path: Path) -> tuple[str, dict[str, Any]]:
    """{"library": "timm", "architecture": ..., "kwargs": {...}}, as purifyguard wrote network
    folders before it adopted timm's format; such folders still load."""
    architecture, kwargs = _architecture_and_arguments(config, "kwargs", path)
    overlay = kwargs.get("pretrained_cfg_overlay", {})
    if not isinstance(overlay, dict) or set(overlay) - INPUT_CONFIG_KEYS:
        raise ValueError(
            f"{path}: pretrained_cfg_overlay may set only {sorted(INPUT_CONFIG_KEYS)}, got "
            f"{overlay!r}"
        )
    return architecture, kwargs


def _check_library(config: dict[str, Any], path: Path) -> None:
    if config.get("library", "timm") != "timm":
        raise ValueError(f"{path}: library must be 'timm', got {config.get('library')!r}")


def _check_architecture(architecture: Any, path: Path) -> str:
    if not isinstance(architecture, str) or not architecture:
        raise ValueError(f"{path} must name the timm 'architecture', got {architecture!r}")
    if ":" in architecture or not timm.is_model(architecture):
        raise ValueError(
            f"{path}: architecture {architecture!r} is not a timm architecture name (a local "
            "folder loads only the files it contains: no hf-hub: or local-dir: names)"
        )
    return architecture


def _check_forbidden(kwargs: dict[str, Any], path: Path, field: str) -> None:
    forbidden = sorted(set(kwargs) & FORBIDDEN_TIMM_KWARGS)
    if forbidden:
        raise ValueError(
            f"{path}: create_model kwargs {forbidden} are refused (in {field}): they make timm "
            "load weights from outside the folder"
        )


def _check_input_settings(settings: dict[str, Any], path: Path) -> None:
    """The input settings of a timm pretrained_cfg have the types timm gives them."""
    for key in ("mean", "std"):
        value = settings.get(key)
        if value is not None and (
            not isinstance(value, list) or not value or not all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                for v in value)
        ):
            raise ValueError(f"{path}: pretrained_cfg {key} must be a list of finite numbers, "
                             f"got {value!r}")
    size = settings.get("input_size")
    if size is not None and (
        not isinstance(size, list) or len(size) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise ValueError(f"{path}: pretrained_cfg input_size must be [channels, height, width], "
                         f"got {size!r}")
    for key in ("interpolation", "crop_mode"):
        if key in settings and not isinstance(settings[key], str):
            raise ValueError(f"{path}: pretrained_cfg {key} must be a string, got "
                             f"{settings[key]!r}")
    crop = settings.get("crop_pct")
    if crop is not None and (not isinstance(crop, numbers.Real) or isinstance(crop, bool)
                             or not 0 < crop <= 1):
        raise ValueError(f"{path}: pretrained_cfg crop_pct must be a number in (0, 1], got "
                         f"{crop!r}")


def check_saveable(network: nn.Module | None) -> None:
    """ValueError, before anything is written, when the guidance network cannot be saved."""
    if network is not None and not is_timm_model(network):
        raise ValueError(
            f"cannot save the guidance network {type(network).__name__}: purifyguard saves "
            "guidance networks that are timm models (built by timm.create_model or "
            "purifyguard.hub.create_guidance_network), in timm's own format. Any nn.Module "
            "classifier can guide a purifier in memory; to share this purifier, use a timm "
            "architecture for its guidance network"
        )


def _export_arguments(network: nn.Module, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """num_classes and in_chans read off the network, then the kwargs create_guidance_network
    recorded, then `kwargs`."""
    found = {"num_classes": int(network.num_classes)}
    first_conv = network.pretrained_cfg.get("first_conv")
    if isinstance(first_conv, str):
        try:
            found["in_chans"] = int(network.get_submodule(first_conv).in_channels)
        except AttributeError:
            pass
    found.update(getattr(network, TIMM_KWARGS_ATTRIBUTE, {}))
    found.update(kwargs or {})
    return found


def _check_rebuilds(network: nn.Module, architecture: str, kwargs: dict[str, Any]) -> None:
    """ValueError naming the first tensor whose shape differs between the network and
    timm.create_model(architecture, **kwargs) (built on the meta device: no memory, no time)."""
    try:
        with torch.device("meta"):
            rebuilt = timm.create_model(architecture, pretrained=False, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as error:
        raise ValueError(
            f"timm.create_model({architecture!r}, **{kwargs}) fails: {error}; pass "
            "guidance_kwargs={...} with the kwargs the guidance network was created with"
        ) from None
    expected = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    if expected != actual:
        difference = min(
            k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k)
        )
        raise ValueError(
            f"timm.create_model({architecture!r}, **{kwargs}) does not rebuild the guidance "
            f"network: {difference} is {actual.get(difference)} in it, {expected.get(difference)} "
            "rebuilt; pass guidance_kwargs={...} with the kwargs it was created with"
        )

