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
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from diffusers import DDPMScheduler, UNet2DModel
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.utils import filter_repo_objects
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model
from torch import nn

from purifyguard.config import PurifierConfig
from purifyguard.files import check_inside, read_json, write_atomic, write_json
from purifyguard.model_card import check_metrics, model_card

if TYPE_CHECKING:
    from purifyguard.purifier import Purifier

PURIFIER_CONFIG = "purifier_config.json"
UNET_DIR = "unet"
SCHEDULER_DIR = "scheduler"
GUIDANCE_DIR = "guidance"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler_config.json"
GUIDANCE_CONFIG = "config.json"
GUIDANCE_WEIGHTS = "model.safetensors"
MODEL_CARD = "README.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# The files from_diffusers needs from a diffusers repository, in the pipeline layout (unet/,
# scheduler/) or the flat one (everything at the top); pickles are never fetched.
DIFFUSERS_FILES = ["model_index.json", f"{UNET_DIR}/*.json", f"{UNET_DIR}/{UNET_WEIGHTS}",
                   f"{SCHEDULER_DIR}/*.json", "config.json", UNET_WEIGHTS, SCHEDULER_CONFIG]
# Keys of early diffusers scheduler configs, and their names now.
LEGACY_SCHEDULER_KEYS = {"timesteps": "num_train_timesteps"}
LAYOUT_DIRS = (UNET_DIR, SCHEDULER_DIR, GUIDANCE_DIR)
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

class PurifierHubMixin:
    """Hub sharing for Purifier, in the spirit of huggingface_hub's PyTorchModelHubMixin.

    Expects the Purifier interface: `unet`, `schedule.scheduler_config`, `guidance_network`,
    `current_config()` and the constructor `cls(unet, scheduler, guidance_network, config,
    **settings)`.
    """

    def save_pretrained(
        self,
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
        _check_saveable(self.guidance_network)
        return self._write_folder(Path(save_directory), metrics, card_data, guidance_kwargs)

    def push_to_hub(
        self,
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
        _check_saveable(self.guidance_network)
        with tempfile.TemporaryDirectory() as staging:
            folder = self._write_folder(
                Path(staging), metrics, card_data, guidance_kwargs, repo_id=repo_id
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
    def from_pretrained(
        cls,
        repo_id_or_dir: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | None = None,
        local_files_only: bool = False,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        **settings: Any,
    ) -> Purifier:
        """Load a purifier from a local folder or a Hub repo id (through the Hub cache).

        settings override the saved PurifierConfig (e.g. t_star=50, gradient_mode="bpda").
        """
        _check_dtype(torch_dtype)
        folder = resolve_folder(
            repo_id_or_dir, revision=revision, cache_dir=cache_dir, token=token,
            local_files_only=local_files_only, allow_patterns=UPLOAD_PATTERNS,
        )
        config_file = require_file(folder / PURIFIER_CONFIG)
        refuse_pickles(folder)
        check_layout_inside(folder)
        config = PurifierConfig.from_dict(read_json(config_file, "purifier config"), config_file)
        unet = load_unet(folder / UNET_DIR, torch_dtype)
        scheduler = load_scheduler(folder / SCHEDULER_DIR)
        guidance_network = None
        if (folder / GUIDANCE_DIR).exists():
            guidance_network = load_guidance_network(folder / GUIDANCE_DIR).to(torch_dtype)
        purifier = cls(unet, scheduler, guidance_network, config, **settings)
        check_outputs_finite(purifier, folder)
        return purifier.to(device) if device is not None else purifier

    @classmethod
    def from_diffusers(
        cls,
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
    ) -> Purifier:
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
        self,
        folder: Path,
        metrics: dict[str, Any] | None,
        card_data: dict[str, Any] | None,
        guidance_kwargs: dict[str, Any] | None,
        repo_id: str | None = None,
    ) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        config = self.current_config()
        guidance = None
        if self.guidance_network is not None:  # first: it checks that its config rebuilds it
            guidance = save_guidance_network(
                self.guidance_network, folder / GUIDANCE_DIR, guidance_kwargs
            )
        else:  # a guidance network saved here before would otherwise be loaded with this purifier
            stale = folder / GUIDANCE_DIR
            for name in (GUIDANCE_CONFIG, GUIDANCE_WEIGHTS):
                (stale / name).unlink(missing_ok=True)
            if stale.is_dir() and not any(stale.iterdir()):
                stale.rmdir()
        self.unet.save_pretrained(folder / UNET_DIR, safe_serialization=True)
        drop_local_path(folder / UNET_DIR / "config.json")
        DDPMScheduler.from_config(self.schedule.scheduler_config).save_pretrained(
            folder / SCHEDULER_DIR
        )
        config.save(folder / PURIFIER_CONFIG)
        card = model_card(
            config, guidance=guidance, metrics=metrics, card_data=card_data, repo_id=repo_id,
            denoiser_parameters=sum(p.numel() for p in self.unet.parameters()),
            model_name=repo_id.split("/")[-1] if repo_id else folder.resolve().name,
        )
        write_atomic(folder / MODEL_CARD, card)
        return folder


def resolve_folder(
    repo_id_or_dir: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    local_files_only: bool = False,
    allow_patterns: list[str] | None = None,
) -> Path:
    """A local folder as it is, or a Hub repo id through snapshot_download (cache, revision,
    HF_HUB_OFFLINE)."""
    if not isinstance(repo_id_or_dir, (str, Path)) or not str(repo_id_or_dir).strip():
        raise ValueError(
            "expected a purifier folder or a Hub repo id of the form 'user/name', got "
            f"{repo_id_or_dir!r}"
        )
    path = Path(repo_id_or_dir).expanduser()
    if path.is_dir():
        return path
    name = str(repo_id_or_dir)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(
            f"{name!r} is not a folder, nor a Hub repo id of the form 'user/name'"
        )
    from purifyguard import __version__

    return Path(snapshot_download(
        name, revision=revision, cache_dir=cache_dir, token=token,
        local_files_only=local_files_only, allow_patterns=allow_patterns,
        library_name="purifyguard", library_version=__version__,
    ))


def refuse_pickles(folder: Path) -> None:
    """ValueError if the folder or one of its component folders holds a pickle checkpoint:
    purifyguard reads safetensors only. Only the layout's own folders are looked at, never
    the whole tree under the folder."""
    for part in (folder, *(folder / name for name in LAYOUT_DIRS)):
        if not part.is_dir():
            continue
        for path in sorted(part.iterdir()):
            if path.suffix.lower() in PICKLE_SUFFIXES and path.is_file():
                raise ValueError(_pickle_message(path.relative_to(folder), folder))


def check_layout_inside(folder: Path) -> None:
    """ValueError if a file of the layout is a link that leads out of the folder. A Hub
    snapshot's files link into the cache's blobs/ folder, two levels up, which is allowed."""
    snapshot = folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir()
    root = folder.parent.parent if snapshot else folder
    for part in (folder, *(folder / name for name in LAYOUT_DIRS)):
        if part.exists():
            check_inside(part, root, "folder")
        if part.is_dir():
            for path in part.iterdir():
                check_inside(path, root)


def require_file(path: Path) -> Path:
    """The path, or FileNotFoundError naming the missing file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"missing file {path.parent.name}/{path.name} (expected at {path}); a purifier "
            f"folder holds {PURIFIER_CONFIG}, {UNET_DIR}/, {SCHEDULER_DIR}/ and optionally "
            f"{GUIDANCE_DIR}/ (see docs/hub.md)"
        )
    return path


def load_unet(folder: Path, torch_dtype: torch.dtype = torch.float32) -> UNet2DModel:
    """A diffusers UNet2DModel from its safetensors weights; pickle-only folders are refused."""
    weights = folder / UNET_WEIGHTS
    if not weights.is_file():
        pickles = [p for p in sorted(folder.glob("*")) if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            raise ValueError(_pickle_message(Path(folder.name) / pickles[0].name, folder.parent))
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
            raise ValueError(_pickle_message(pickles[0].relative_to(folder), folder))
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
    _check_saveable(network)
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
    _check_saveable(network)
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
    config_file = require_file(folder / GUIDANCE_CONFIG)
    weights = require_file(folder / GUIDANCE_WEIGHTS)
    for path in (config_file, weights):
        check_inside(path, folder.parent.parent if _in_snapshot(folder) else folder)
    architecture, kwargs = guidance_config(read_json(config_file, "network config"), config_file)
    try:
        network = create_guidance_network(architecture, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as error:
        raise ValueError(
            f"{config_file}: timm.create_model({architecture!r}, **{kwargs}) fails: {error}"
        ) from None
    _check_weight_shapes(network, weights)
    load_model(network, str(weights), strict=True, device="cpu")
    check_weights_finite(network, weights)
    return network.eval()


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


def _check_saveable(network: nn.Module | None) -> None:
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


def check_weights_finite(module: nn.Module, path: Path) -> None:
    """ValueError naming the first tensor with NaN or Inf values: corrupt weights purify to NaN."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {name} holds NaN or Inf values; the file is corrupt")


@torch.no_grad()
def check_outputs_finite(purifier: Purifier, folder: Path) -> None:
    """One denoiser call (and one guidance-network call) on a fixed input must give finite
    outputs: weights that are finite but absurd (random bytes) would purify every image to NaN."""
    size, channels = purifier.resolution, purifier.channels
    generator = torch.Generator().manual_seed(0)
    dtype = purifier.unet.dtype
    x = torch.randn(1, channels, size, size, generator=generator).to(dtype)
    step = torch.full((1,), max(purifier.config.t_star, 1) - 1, dtype=torch.long)
    checks = [("denoiser", lambda: purifier.unet(x, step).sample)]
    if purifier.guidance_network is not None:
        checks.append(("guidance network", lambda: purifier.guidance_network((x + 1) / 2)))
    for what, call in checks:
        try:
            output = call()
        except RuntimeError as error:
            raise ValueError(f"{folder}: the {what} fails on a {tuple(x.shape)} input: {error}") \
                from None
        if not torch.isfinite(output).all():
            raise ValueError(
                f"{folder}: the {what} returns NaN or Inf on a normal input; its weights are "
                "corrupt"
            )


def _check_weight_shapes(network: nn.Module, weights: Path) -> None:
    """ValueError naming the first tensor whose name or shape differs between the config's
    architecture and the weights file (and the file when it is not readable safetensors)."""
    try:
        with safe_open(str(weights), framework="pt") as file:
            stored = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights} is not a readable safetensors file: {error}") from None
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    if stored != expected:
        key = min(k for k in stored.keys() | expected.keys() if stored.get(k) != expected.get(k))
        raise ValueError(
            f"{weights} does not match the architecture of its config.json: tensor {key} is "
            f"{stored.get(key, 'absent')} in the file, {expected.get(key, 'absent')} in the "
            "architecture"
        )


def drop_local_path(config_file: Path) -> None:
    """Remove diffusers' `_name_or_path` (the folder a model was loaded from, an absolute path of
    this machine) from a saved config: a shared folder must not carry it."""
    config = read_json(config_file, "denoiser config")
    if config.pop("_name_or_path", None) is not None:
        write_json(config_file, config)


def _check_card_arguments(*mappings: dict[str, Any] | None) -> None:
    for name, value in zip(("metrics", "card_data", "guidance_kwargs"), mappings):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{name} must be a dict or None, got {type(value).__name__}")
    check_metrics(mappings[0])


def _in_snapshot(folder: Path) -> bool:
    return any(parent.name == "snapshots" for parent in folder.parents)


def _check_dtype(torch_dtype: object) -> None:
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"torch_dtype must be a floating torch.dtype, got {torch_dtype!r}")


def _pickle_message(relative: Path, folder: Path) -> str:
    return (
        f"refusing pickle checkpoint {relative.as_posix()} in {folder}: purifyguard loads "
        "safetensors only, because unpickling can run arbitrary code. Re-save the weights "
        "with safetensors (e.g. unet.save_pretrained(dir, safe_serialization=True)) and "
        "remove the pickle file"
    )
