"""Share purifiers like Hub models: save_pretrained, from_pretrained, push_to_hub, from_diffusers.

A purifier folder (local or a Hub repository) holds, in safetensors only:

    purifier_config.json                      PurifierConfig.to_dict() (t*, sampler, guidance, ...)
    unet/config.json                          the denoiser, in diffusers' own format
    unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json           its DDPM noise schedule
    guidance/config.json                      the guidance network in timm's own Hub format
    guidance/model.safetensors                (timm.models.save_for_hf; only when the purifier
                                              has a guidance network)
    README.md                                 a model card (huggingface_hub.ModelCard) with
                                              model-index results

Pickle checkpoints are refused: loading one can run arbitrary code. A network folder (guidance/,
or a classifier exported by `purifyguard train guidance`) is what timm.models.save_for_hf writes,
so timm.create_model("local-dir:<folder>", pretrained=True) and "hf-hub:<repo>" load it too;
purifyguard reads it with its own loader (safetensors only, nothing followed or fetched). The
older purifyguard layout {"library": "timm", "architecture": ..., "kwargs": {...}} still loads.

This module holds the mixin that Purifier inherits; the concepts it builds on have modules of
their own: folder_safety (the layout's names, what a folder may contain), diffusers_layout (the
denoiser and its schedule), guidance_network_format (the guidance network in timm's format) and
weight_checks (weights that fit their config and compute finite numbers). The guidance network's
public helpers are importable from here too, as they always were.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from diffusers import DDPMScheduler
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects
from torch import nn

from purifyguard.config import PurifierConfig
from purifyguard.diffusers_layout import (
    DIFFUSERS_FILES,
    SCHEDULER_CONFIG,
    UNET_WEIGHTS,
    diffusers_layout,
    drop_local_path,
    load_scheduler,
    load_unet,
)
from purifyguard.files import read_json, write_atomic
from purifyguard.folder_safety import (
    GUIDANCE_DIR,
    PICKLE_SUFFIXES,
    PURIFIER_CONFIG,
    SCHEDULER_DIR,
    UNET_DIR,
    check_layout_inside,
    refuse_pickles,
    require_file,
    resolve_folder,
)
from purifyguard.guidance_network_format import (
    GUIDANCE_CONFIG,
    GUIDANCE_WEIGHTS,
    check_saveable,
    create_guidance_network,
    guidance_architecture,
    guidance_config,
    load_guidance_network,
    save_guidance_network,
)
from purifyguard.model_card import check_metrics, model_card
from purifyguard.weight_checks import LoadedPurifier, check_outputs_finite

if TYPE_CHECKING:
    from diffusers import UNet2DModel
    from typing_extensions import Self

    from purifyguard.schedule import NoiseSchedule

# The mixin and the interface it relies on; the guidance network's helpers and the pickle
# suffixes, importable from here as before.
__all__ = [
    "PICKLE_SUFFIXES",
    "PurifierHubMixin",
    "SharablePurifier",
    "create_guidance_network",
    "guidance_architecture",
    "guidance_config",
    "load_guidance_network",
    "save_guidance_network",
]

MODEL_CARD = "README.md"
# What push_to_hub uploads (the layout, nothing else) and what it never uploads, whatever else a
# component may have written: pickles and training checkpoints.
UPLOAD_PATTERNS = [
    PURIFIER_CONFIG, MODEL_CARD, f"{UNET_DIR}/config.json", f"{UNET_DIR}/{UNET_WEIGHTS}",
    f"{SCHEDULER_DIR}/{SCHEDULER_CONFIG}", f"{GUIDANCE_DIR}/{GUIDANCE_CONFIG}",
    f"{GUIDANCE_DIR}/{GUIDANCE_WEIGHTS}",
]
NEVER_UPLOAD = [f"*{suffix}" for suffix in PICKLE_SUFFIXES] + ["checkpoints/*", "*/checkpoints/*"]
# Deleted from the Hub repository by a push without a guidance network (a stale one would load).
GUIDANCE_FILES = [f"{GUIDANCE_DIR}/{GUIDANCE_CONFIG}", f"{GUIDANCE_DIR}/{GUIDANCE_WEIGHTS}"]


class SharablePurifier(LoadedPurifier, Protocol):
    """The Purifier interface the mixin relies on (purifyguard.Purifier has it): `unet`,
    `schedule.scheduler_config`, `guidance_network`, `current_config()`, `to(device)` and the
    constructor `cls(unet, scheduler, guidance_network, config, **settings)`."""

    schedule: NoiseSchedule

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler_config: dict[str, Any] | DDPMScheduler | None = ...,
        guidance_network: nn.Module | None = ...,
        config: PurifierConfig | None = ...,
        **settings: Any,
    ) -> None: ...

    def current_config(self) -> PurifierConfig: ...

    def to(self, device: str | torch.device) -> Self: ...


# What from_pretrained and from_diffusers return: the class they are called on (Purifier). It is
# bound to the interface, not the mixin, so `Self` would not do (ruff's PYI019 is silenced).
PurifierT = TypeVar("PurifierT", bound=SharablePurifier)


class PurifierHubMixin:
    """Hub sharing for Purifier, in the spirit of huggingface_hub's PyTorchModelHubMixin.

    Expects the Purifier interface, SharablePurifier: `unet`, `schedule.scheduler_config`,
    `guidance_network`, `current_config()` and the constructor `cls(unet, scheduler,
    guidance_network, config, **settings)`. The mixin names that interface, never the Purifier
    class: purifyguard.purifier imports this module, not the other way round.
    """

    def save_pretrained(
        self: SharablePurifier,
        save_directory: str | Path,
        *,
        metrics: dict[str, Any] | None = None,
        card_data: dict[str, Any] | None = None,
        guidance_kwargs: dict[str, Any] | None = None,
    ) -> Path:
        """Write the purifier folder (layout in the module docstring) and return its path.

        metrics: measured results for the model card's Results table; clean_accuracy and
            robust_accuracy (with attack, threat_model, n_examples, dataset, dataset_split) also
            become its model-index metadata, which the Hub indexes. card_data: extra YAML front
            matter (license, datasets, ...). guidance_kwargs: timm.create_model kwargs of the
            guidance network beyond num_classes and in_chans (e.g. channels), when neither timm
            nor create_guidance_network recorded them.

        Only a timm guidance network can be saved (ValueError otherwise, before anything is
        written): it is saved in timm's own Hub format.
        """
        if not isinstance(save_directory, (str, Path)) or not str(save_directory).strip():
            raise ValueError(f"save_directory must be a folder path, got {save_directory!r}")
        _check_card_arguments(metrics, card_data, guidance_kwargs)
        check_saveable(self.guidance_network)
        return _write_folder(self, Path(save_directory), metrics, card_data, guidance_kwargs)

    def push_to_hub(
        self: SharablePurifier,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str = "Upload purifier with purifyguard",
        create_pr: bool = False,
        metrics: dict[str, Any] | None = None,
        card_data: dict[str, Any] | None = None,
        guidance_kwargs: dict[str, Any] | None = None,
        dry_run: bool = False,
    ) -> str | dict[str, int]:
        """Save to a temporary folder and upload it as one commit; returns the commit URL.

        Only the layout's files are uploaded (UPLOAD_PATTERNS), never a pickle or a checkpoints/
        folder (NEVER_UPLOAD), through HfApi.upload_folder's allow_patterns and ignore_patterns.
        A purifier without a guidance network deletes guidance/ from the repository.
        dry_run=True contacts nothing and returns what would be uploaded: {path: size in bytes}.
        """
        if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ValueError(f"repo_id must be a Hub repo id of the form 'user/name', got {repo_id!r}")
        _check_card_arguments(metrics, card_data, guidance_kwargs)
        check_saveable(self.guidance_network)
        with tempfile.TemporaryDirectory() as staging:
            folder = _write_folder(
                self, Path(staging), metrics, card_data, guidance_kwargs, repo_id=repo_id
            )
            if dry_run:
                files = (path.relative_to(folder).as_posix()
                         for path in sorted(folder.rglob("*")) if path.is_file())
                return {
                    name: (folder / name).stat().st_size for name in filter_repo_objects(
                        files, allow_patterns=UPLOAD_PATTERNS, ignore_patterns=NEVER_UPLOAD
                    )
                }
            api = HfApi(token=token)
            api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                revision=revision, create_pr=create_pr, allow_patterns=UPLOAD_PATTERNS,
                ignore_patterns=NEVER_UPLOAD,
                delete_patterns=GUIDANCE_FILES if self.guidance_network is None else None,
            )
        return str(getattr(commit, "commit_url", commit))

    @classmethod
    def from_pretrained(  # noqa: PYI019
        cls: type[PurifierT],
        repo_id_or_dir: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | None = None,
        local_files_only: bool = False,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        **settings: Any,
    ) -> PurifierT:
        """Load a purifier from a local folder or a Hub repo id (through the Hub cache).

        settings override the saved PurifierConfig (e.g. t_star=50, gradient_mode="bpda").
        """
        _check_dtype(torch_dtype)
        folder = resolve_folder(
            repo_id_or_dir, revision=revision, cache_dir=cache_dir, token=token,
            local_files_only=local_files_only, allow_patterns=UPLOAD_PATTERNS,
        )
        config_file = require_file(folder / PURIFIER_CONFIG, purifier_folder=True)
        refuse_pickles(folder)
        check_layout_inside(folder)
        config = PurifierConfig.from_dict(read_json(config_file, "purifier config"), config_file)
        unet = load_unet(folder / UNET_DIR, torch_dtype)
        scheduler = load_scheduler(folder / SCHEDULER_DIR)
        guidance_network = None
        if (folder / GUIDANCE_DIR).exists():
            guidance_network = load_guidance_network(folder / GUIDANCE_DIR).to(torch_dtype)
        check_config_fits(config, config_file, unet, scheduler, guidance_network, settings)
        purifier = cls(unet, scheduler, guidance_network, config, **settings)
        check_outputs_finite(purifier, folder)
        return purifier.to(device) if device is not None else purifier

    @classmethod
    def from_diffusers(  # noqa: PYI019
        cls: type[PurifierT],
        repo_or_dir: str | Path,
        t_star: int = 100,
        *,
        guidance_network: nn.Module | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | None = None,
        local_files_only: bool = False,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        **settings: Any,
    ) -> PurifierT:
        """A purifier from a diffusers DDPM model, in either of diffusers' layouts: a pipeline
        (model_index.json, unet/, scheduler/, as DDPMPipeline.save_pretrained writes it) or a
        flat repository (the UNet's config.json and weights and scheduler_config.json at the top,
        as google/ddpm-cifar10-32 is on the Hub; legacy scheduler keys such as "timesteps" are
        read). Safetensors weights only. Unguided unless settings and guidance_network say
        otherwise.
        """
        _check_dtype(torch_dtype)
        folder = resolve_folder(
            repo_or_dir, revision=revision, cache_dir=cache_dir, token=token,
            local_files_only=local_files_only, allow_patterns=DIFFUSERS_FILES,
        )
        check_layout_inside(folder)
        unet_folder, scheduler_folder = diffusers_layout(folder, str(repo_or_dir))
        if not Path(repo_or_dir).is_dir():
            settings["extra"] = {**settings.get("extra", {}), "diffusion_model": str(repo_or_dir)}
        unet = load_unet(unet_folder, torch_dtype)
        scheduler = load_scheduler(scheduler_folder)
        purifier = cls(unet, scheduler, guidance_network, None, t_star=t_star, **settings)
        check_outputs_finite(purifier, folder)
        return purifier.to(device) if device is not None else purifier


def _write_folder(
    purifier: SharablePurifier,
    folder: Path,
    metrics: dict[str, Any] | None,
    card_data: dict[str, Any] | None,
    guidance_kwargs: dict[str, Any] | None,
    repo_id: str | None = None,
) -> Path:
    """Write the purifier's folder (the layout in the module docstring) and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    config = purifier.current_config()
    guidance = None
    if purifier.guidance_network is not None:  # first: it checks that its config rebuilds it
        guidance = save_guidance_network(
            purifier.guidance_network, folder / GUIDANCE_DIR, guidance_kwargs
        )
    else:  # a guidance network saved here before would otherwise be loaded with this purifier
        stale = folder / GUIDANCE_DIR
        for name in (GUIDANCE_CONFIG, GUIDANCE_WEIGHTS):
            (stale / name).unlink(missing_ok=True)
        if stale.is_dir() and not any(stale.iterdir()):
            stale.rmdir()
    purifier.unet.save_pretrained(folder / UNET_DIR, safe_serialization=True)
    drop_local_path(folder / UNET_DIR / "config.json")
    DDPMScheduler.from_config(purifier.schedule.scheduler_config).save_pretrained(
        folder / SCHEDULER_DIR
    )
    config.save(folder / PURIFIER_CONFIG)
    card = model_card(
        config, guidance=guidance, metrics=metrics, card_data=card_data, repo_id=repo_id,
        denoiser_parameters=sum(p.numel() for p in purifier.unet.parameters()),
        model_name=repo_id.split("/")[-1] if repo_id else folder.resolve().name,
    )
    write_atomic(folder / MODEL_CARD, card)
    return folder


def check_config_fits(
    config: PurifierConfig,
    config_file: Path,
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    guidance_network: nn.Module | None,
    settings: dict[str, Any],
) -> None:
    """ValueError naming the purifier_config.json of a folder when it contradicts the folder's
    networks (its channels or resolution, the denoiser's in_channels or sample_size; the guidance
    network's input channels) or its schedule (t_star beyond the schedule's steps), before a
    Purifier is built: the file would otherwise be overwritten silently, or fail with a message
    that does not name it. The settings given to from_pretrained override the file's values."""
    folder = config_file.parent
    unet_config = folder / UNET_DIR / "config.json"
    channels = int(unet.config.in_channels)
    size = unet.config.sample_size
    if isinstance(size, (tuple, list)):
        size = size[0] if len(set(size)) == 1 else None
    stated = {"resolution": (config.resolution, size, "sample_size"),
              "channels": (config.channels, channels, "in_channels")}
    for name, (value, actual, key) in stated.items():
        if value is not None and actual is not None and int(value) != int(actual):
            raise ValueError(
                f"{config_file} says {name}={value}, but the denoiser of the folder "
                f"({unet_config}) has {key}={actual}: the config contradicts its networks. "
                f"Correct {name} in {PURIFIER_CONFIG} (or remove it: it is read off the "
                "denoiser), or use the denoiser it was written for"
            )
    if guidance_network is not None:
        from purifyguard.normalization import input_channels

        takes = input_channels(guidance_network)
        if takes is not None and takes != channels:
            raise ValueError(
                f"the guidance network of {folder} ({folder / GUIDANCE_DIR / GUIDANCE_CONFIG}) "
                f"takes {takes}-channel images, but the denoiser ({unet_config}) has "
                f"in_channels={channels}: the guidance network reads the purifier's images, so "
                "the two must agree"
            )
    steps = int(scheduler.config.num_train_timesteps)
    try:
        config.validate(steps)
    except ValueError as error:
        file_error: str | None = f"{config_file}: {error}"
    else:
        file_error = None
    if file_error is None:
        return
    try:
        config.replace(**settings).validate(steps)
    except ValueError as error:
        if file_error.endswith(str(error)):  # the settings do not mend what the file says
            raise ValueError(file_error) from None
        raise


def _check_card_arguments(*mappings: dict[str, Any] | None) -> None:
    for name, value in zip(("metrics", "card_data", "guidance_kwargs"), mappings):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{name} must be a dict or None, got {type(value).__name__}")
    check_metrics(mappings[0])


def _check_dtype(torch_dtype: object) -> None:
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"torch_dtype must be a floating torch.dtype, got {torch_dtype!r}")

