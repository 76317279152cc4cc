"""The diffusers layout: the denoiser and its noise schedule in diffusers' own files.

A purifier folder keeps its denoiser in unet/ (a UNet2DModel's config.json and safetensors
weights) and its DDPM schedule in scheduler/ (scheduler_config.json), as diffusers writes them.
Purifier.from_diffusers reads the same files from a diffusers repository in either of its
layouts: a pipeline (model_index.json, unet/, scheduler/) or a flat repository (everything at the
top, as google/ddpm-cifar10-32 is on the Hub). Safetensors weights only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors import SafetensorError

from purifyguard.files import read_json, write_json
from purifyguard.folder_safety import (
    PICKLE_SUFFIXES,
    SCHEDULER_DIR,
    UNET_DIR,
    pickle_message,
    require_file,
)
from purifyguard.weight_checks import check_weights_finite

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler_config.json"
# The files from_diffusers needs from a diffusers repository, in the pipeline layout (unet/,
# scheduler/) or the flat one (everything at the top); pickles are never fetched.
DIFFUSERS_FILES = ["model_index.json", f"{UNET_DIR}/*.json", f"{UNET_DIR}/{UNET_WEIGHTS}",
                   f"{SCHEDULER_DIR}/*.json", "config.json", UNET_WEIGHTS, SCHEDULER_CONFIG]
# Keys of early diffusers scheduler configs, and their names now.
LEGACY_SCHEDULER_KEYS = {"timesteps": "num_train_timesteps"}


def load_unet(folder: Path, torch_dtype: torch.dtype = torch.float32) -> UNet2DModel:
    """A diffusers UNet2DModel from its safetensors weights; pickle-only folders are refused."""
    weights = folder / UNET_WEIGHTS
    if not weights.is_file():
        pickles = [p for p in sorted(folder.glob("*")) if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            raise ValueError(pickle_message(Path(folder.name) / pickles[0].name, folder.parent))
    read_json(require_file(folder / "config.json"), "denoiser config")
    require_file(weights)
    try:
        unet = UNet2DModel.from_pretrained(folder, use_safetensors=True, torch_dtype=torch_dtype)
    except (OSError, RuntimeError, ValueError, TypeError, SafetensorError) as error:
        raise ValueError(
            f"cannot load the denoiser from {folder} (config.json and {UNET_WEIGHTS} must be a "
            f"diffusers UNet2DModel and its weights): {error}"
        ) from None
    check_weights_finite(unet, weights)
    return unet


def diffusers_layout(folder: Path, name: str) -> tuple[Path, Path]:
    """(UNet folder, scheduler folder) of a diffusers repository: unet/ and scheduler/ of a
    pipeline, or the top folder itself when the repository is flat."""
    if (folder / UNET_DIR / "config.json").is_file():
        components = read_json(require_file(folder / "model_index.json"), "pipeline index")
        entry = components.get(UNET_DIR)
        unet_class = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        unet_folder, scheduler_folder = folder / UNET_DIR, folder / SCHEDULER_DIR
    elif (folder / "config.json").is_file():
        unet_class = read_json(folder / "config.json", "denoiser config").get("_class_name")
        unet_folder, scheduler_folder = folder, folder
    else:
        raise FileNotFoundError(
            f"{name}: neither a diffusers pipeline (unet/config.json) nor a flat diffusers model "
            "(config.json at the top)"
        )
    if unet_class != "UNet2DModel":
        raise ValueError(
            f"{name}: from_diffusers needs an unconditional UNet2DModel denoiser, the repository "
            f"says {unet_class!r}"
        )
    if not (unet_folder / UNET_WEIGHTS).is_file():
        pickles = [p for p in sorted(unet_folder.glob("*")) if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            raise ValueError(pickle_message(pickles[0].relative_to(folder), folder))
        raise FileNotFoundError(
            f"{name}: no safetensors weights ({unet_folder.relative_to(folder) / UNET_WEIGHTS}); "
            "purifyguard does not load pickle weights (.bin). Convert them in a trusted "
            "environment: UNet2DModel.from_pretrained(...).save_pretrained(dir, "
            "safe_serialization=True)"
        )
    return unet_folder, scheduler_folder


def load_scheduler(folder: Path) -> DDPMScheduler:
    """The DDPM noise schedule of a diffusers scheduler folder (DDIM/PNDM configs share it);
    early configs' keys ("timesteps") are read under their current names."""
    path = require_file(folder / SCHEDULER_CONFIG)
    config = read_json(path, "scheduler config")
    for old, new in LEGACY_SCHEDULER_KEYS.items():
        if old in config:
            config.setdefault(new, config.pop(old))
    config.pop("_class_name", None)  # e.g. "GaussianDDPMScheduler": the schedule is what counts
    try:
        return DDPMScheduler.from_config(config)
    except (TypeError, ValueError, NotImplementedError) as error:
        raise ValueError(f"invalid scheduler config {path}: {error}") from None


def drop_local_path(config_file: Path) -> None:
    """Remove diffusers' `_name_or_path` (the folder a model was loaded from, an absolute path of
    this machine) from a saved config: a shared folder must not carry it."""
    config = read_json(config_file, "denoiser config")
    if config.pop("_name_or_path", None) is not None:
        write_json(config_file, config)
