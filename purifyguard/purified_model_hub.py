"""Share a defended model like a purifier: PurifiedModel.save_pretrained, from_pretrained and
push_to_hub.

A defended-model folder (local or a Hub repository) holds, in safetensors only:

    purified_model.json            how the model handles its input (channels, mean, std,
                                   input_size, interpolation, normalization_source), n_samples,
                                   the classifier's format and class, whether there is a purifier
    classifier/config.json         a timm classifier in timm's own Hub format (as a purifier's
    classifier/model.safetensors   guidance/: timm.create_model("local-dir:<dir>/classifier",
                                   pretrained=True) loads it too); any other classifier
                                   (torchvision, your own nn.Module): its state dict in
                                   classifier/model.safetensors, no config.json
    purifier/                      the purifier in its own layout (Purifier.save_pretrained);
                                   absent for an undefended model (purifier=False)
    README.md                      a model card: classifier, purifier, input handling, how to load

Nothing is imported from a folder: a classifier saved as a state dict is passed back in as an
instance, PurifiedModel.from_pretrained(folder, classifier=<instance>), and its weights are
loaded into it. Pickles are refused and every file must lie inside the folder
(purifyguard.folder_safety), as for a purifier.

PurifiedModel inherits PurifiedModelHubMixin; this module never imports purifyguard.purified_model
(the class comes in as `cls` and `self`).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from purifyguard.files import read_json, write_atomic, write_json
from purifyguard.folder_safety import (
    PURIFIER_CONFIG,
    check_layout_inside,
    refuse_pickles,
    resolve_folder,
)
from purifyguard.guidance_network_format import (
    GUIDANCE_CONFIG,
    GUIDANCE_WEIGHTS,
    check_saveable,
    guidance_architecture,
    is_timm_model,
    load_guidance_network,
    save_guidance_network,
)
from purifyguard.hub import MODEL_CARD, NEVER_UPLOAD
from purifyguard.hub import UPLOAD_PATTERNS as PURIFIER_PATTERNS
from purifyguard.model_card import check_metrics, defended_model_card
from purifyguard.purifier import Purifier
from purifyguard.weight_checks import check_weights_finite

if TYPE_CHECKING:
    from purifyguard.purified_model import PurifiedModel

logger = logging.getLogger(__name__)

MODEL_CONFIG = "purified_model.json"
CLASSIFIER_DIR = "classifier"
PURIFIER_DIR = "purifier"
FORMAT_VERSION = 1
TIMM_FORMAT, STATE_DICT_FORMAT = "timm", "state_dict"
CLASSIFIER_CONFIG = f"{CLASSIFIER_DIR}/{GUIDANCE_CONFIG}"
CLASSIFIER_WEIGHTS = f"{CLASSIFIER_DIR}/{GUIDANCE_WEIGHTS}"
# The layout's files: what push_to_hub uploads and from_pretrained fetches, nothing else.
UPLOAD_PATTERNS = [
    MODEL_CONFIG, MODEL_CARD, CLASSIFIER_CONFIG, CLASSIFIER_WEIGHTS,
    *(f"{PURIFIER_DIR}/{name}" for name in PURIFIER_PATTERNS),
]
# The keys of purified_model.json's "input" entry.
INPUT_KEYS = ("channels", "mean", "std", "input_size", "interpolation", "normalization_source")


class PurifiedModelHubMixin:
    """save_pretrained, from_pretrained and push_to_hub for PurifiedModel (layout in the module
    docstring). Expects PurifiedModel's attributes: classifier, purifier, normalize,
    classifier_channels, input_size, interpolation, n_samples, normalization_source."""

    def save_pretrained(
        self: PurifiedModel,
        save_directory: str | Path,
        *,
        metrics: dict[str, Any] | None = None,
        card_data: dict[str, Any] | None = None,
        classifier_kwargs: dict[str, Any] | None = None,
        guidance_kwargs: dict[str, Any] | None = None,
    ) -> Path:
        """Write the defended model's folder and return its path.

        The classifier goes to classifier/: a timm model in timm's own format (config.json +
        model.safetensors; classifier_kwargs: timm.create_model kwargs beyond num_classes and
        in_chans that rebuild it, when timm did not record them), any other nn.Module as its
        state dict in model.safetensors (load it back with from_pretrained(folder,
        classifier=<instance>)). The purifier goes to purifier/ in its own layout
        (guidance_kwargs as for Purifier.save_pretrained); the input handling to
        purified_model.json; metrics and card_data to the model card (README.md), as for a
        purifier. What cannot be saved raises a ValueError before anything is written.
        """
        folder = _check_save_arguments(
            self, save_directory, metrics, card_data, classifier_kwargs, guidance_kwargs
        )
        return _write_folder(self, folder, metrics, card_data, classifier_kwargs, guidance_kwargs)

    def push_to_hub(
        self: PurifiedModel,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str = "Upload defended model with purifyguard",
        create_pr: bool = False,
        metrics: dict[str, Any] | None = None,
        card_data: dict[str, Any] | None = None,
        classifier_kwargs: dict[str, Any] | None = None,
        guidance_kwargs: dict[str, Any] | None = None,
        dry_run: bool = False,
    ) -> str | dict[str, int]:
        """Save to a temporary folder and upload it as one commit; returns the commit URL.

        As Purifier.push_to_hub: HfApi.create_repo(exist_ok=True), then HfApi.upload_folder with
        allow_patterns set to the layout's files and ignore_patterns to pickles and checkpoints/;
        files of the layout that this model does not have (purifier/ of an undefended model,
        classifier/config.json of a state dict) are deleted from the repository in the same
        commit. dry_run=True contacts nothing and returns {path: size in bytes}.
        """
        if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ValueError(f"repo_id must be a Hub repo id of the form 'user/name', got {repo_id!r}")
        with tempfile.TemporaryDirectory() as staging:
            folder = _check_save_arguments(
                self, staging, metrics, card_data, classifier_kwargs, guidance_kwargs
            )
            _write_folder(self, folder, metrics, card_data, classifier_kwargs, guidance_kwargs,
                          repo_id=repo_id)
            files = (path.relative_to(folder).as_posix()
                     for path in sorted(folder.rglob("*")) if path.is_file())
            uploaded = list(filter_repo_objects(
                files, allow_patterns=UPLOAD_PATTERNS, ignore_patterns=NEVER_UPLOAD
            ))
            if dry_run:
                return {name: (folder / name).stat().st_size for name in uploaded}
            stale = [name for name in UPLOAD_PATTERNS if name not in uploaded]
            api = HfApi(token=token)
            api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                revision=revision, create_pr=create_pr, allow_patterns=UPLOAD_PATTERNS,
                ignore_patterns=NEVER_UPLOAD, delete_patterns=stale or None,
            )
        return str(getattr(commit, "commit_url", commit))

    @classmethod
    def from_pretrained(
        cls: type[PurifiedModel],
        repo_id_or_dir: str | Path,
        classifier: nn.Module | None = None,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | None = None,
        local_files_only: bool = False,
        n_samples: int | None = None,
        device: str | torch.device | None = None,
        **settings: Any,
    ) -> PurifiedModel:
        """A defended model from a local folder or a Hub repo id (through the Hub cache, fetching
        only the layout's files), with the input handling it was saved with.

        classifier: None rebuilds a timm classifier from classifier/; an nn.Module instance
        receives the saved weights (strict, shape by shape). A classifier saved as a state dict
        (torchvision, your own class) needs the instance: nothing is imported from a folder.
        n_samples overrides the saved one; settings override the purifier's saved settings
        (e.g. t_star=50), as in Purifier.from_pretrained.
        """
        if classifier is not None and not isinstance(classifier, nn.Module):
            raise ValueError(
                f"classifier must be an nn.Module instance or None, got {type(classifier).__name__}"
            )
        folder = resolve_folder(
            repo_id_or_dir, revision=revision, cache_dir=cache_dir, token=token,
            local_files_only=local_files_only, allow_patterns=UPLOAD_PATTERNS,
        )
        config_file = folder / MODEL_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(_missing_config_message(folder))
        for part in (folder, folder / CLASSIFIER_DIR, folder / PURIFIER_DIR):
            refuse_pickles(part, dirs=())
        check_layout_inside(folder, dirs=(CLASSIFIER_DIR, PURIFIER_DIR))
        saved = _read_config(config_file)
        network = _load_classifier(folder, saved["classifier"], classifier, repo_id_or_dir)
        purifier: Purifier | bool = False
        if saved["purifier"]:
            purifier = Purifier.from_pretrained(folder / PURIFIER_DIR, **settings)
        elif settings:
            raise ValueError(
                f"purifier settings {sorted(settings)} given, but {repo_id_or_dir} is an "
                "undefended model (no purifier/)"
            )
        handling = saved["input"]
        try:
            model = cls(
                network, purifier, mean=handling["mean"], std=handling["std"],
                input_size=handling["input_size"], interpolation=handling["interpolation"],
                n_samples=saved["n_samples"] if n_samples is None else n_samples,
                aggregate=saved["aggregate"],
            )
        except ValueError as error:
            raise ValueError(f"{config_file}: {error}") from None
        if model.classifier_channels != handling["channels"]:
            raise ValueError(
                f"{config_file}: the model was saved with a classifier of "
                f"{handling['channels']} input channels; this one takes "
                f"{model.classifier_channels}"
            )
        model.normalization_source = handling["normalization_source"]
        return model.to(device) if device is not None else model


def input_handling(model: PurifiedModel) -> dict[str, Any]:
    """How the model handles its input, as purified_model.json's "input" entry saves it."""
    normalize = model.normalize
    return {
        "channels": model.classifier_channels,
        "mean": normalize.mean.flatten().tolist() if normalize.enabled else None,
        "std": normalize.std.flatten().tolist() if normalize.enabled else None,
        "input_size": model.input_size,
        "interpolation": model.interpolation,
        "normalization_source": model.normalization_source,
    }


def _check_save_arguments(
    model: PurifiedModel,
    save_directory: str | Path,
    metrics: dict[str, Any] | None,
    card_data: dict[str, Any] | None,
    classifier_kwargs: dict[str, Any] | None,
    guidance_kwargs: dict[str, Any] | None,
) -> Path:
    """The folder, after checking everything that would stop a save half-way."""
    if not isinstance(save_directory, (str, Path)) or not str(save_directory).strip():
        raise ValueError(f"save_directory must be a folder path, got {save_directory!r}")
    for name, value in (("metrics", metrics), ("card_data", card_data),
                        ("classifier_kwargs", classifier_kwargs),
                        ("guidance_kwargs", guidance_kwargs)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{name} must be a dict or None, got {type(value).__name__}")
    check_metrics(metrics)
    if is_timm_model(model.classifier):
        try:
            guidance_architecture(model.classifier, classifier_kwargs)
        except ValueError as error:
            raise ValueError(
                "cannot save the timm classifier in timm's format: "
                + str(error).replace("guidance_kwargs", "classifier_kwargs")
                .replace("guidance network", "classifier")
            ) from None
    elif classifier_kwargs is not None:
        raise ValueError(
            "classifier_kwargs are timm.create_model kwargs; this classifier "
            f"({type(model.classifier).__name__}) is not a timm model and is saved as a state dict"
        )
    if model.purifier is not None:
        check_saveable(model.purifier.guidance_network)
        if model.purifier.guidance_network is not None:
            guidance_architecture(model.purifier.guidance_network, guidance_kwargs)
    return Path(save_directory)


def _write_folder(
    model: PurifiedModel,
    folder: Path,
    metrics: dict[str, Any] | None,
    card_data: dict[str, Any] | None,
    classifier_kwargs: dict[str, Any] | None,
    guidance_kwargs: dict[str, Any] | None,
    repo_id: str | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    network = model.classifier
    described = {"class": f"{type(network).__module__}.{type(network).__qualname__}"}
    if is_timm_model(network):
        architecture, _ = save_guidance_network(
            network, folder / CLASSIFIER_DIR, classifier_kwargs
        )
        described = {"format": TIMM_FORMAT, "architecture": architecture, **described}
    else:
        (folder / CLASSIFIER_CONFIG).unlink(missing_ok=True)  # a stale timm config
        (folder / CLASSIFIER_DIR).mkdir(exist_ok=True)
        save_model(network, str(folder / CLASSIFIER_WEIGHTS))
        described = {"format": STATE_DICT_FORMAT, **described}
    purifier_config = None
    if model.purifier is not None:
        model.purifier.save_pretrained(folder / PURIFIER_DIR, guidance_kwargs=guidance_kwargs)
        purifier_config = model.purifier.current_config()
    else:  # a purifier saved here before would otherwise sit next to an undefended model
        _remove_stale_purifier(folder / PURIFIER_DIR)
    handling = input_handling(model)
    write_json(folder / MODEL_CONFIG, {
        "format_version": FORMAT_VERSION,
        "classifier": described,
        "purifier": PURIFIER_DIR if model.purifier is not None else None,
        "n_samples": model.n_samples,
        "aggregate": model.aggregate,
        "input": handling,
    })
    shown = {
        "input": _input_shape(handling),
        "mean": _numbers(handling["mean"]),
        "std": _numbers(handling["std"]),
        "input size (side of the images the classifier reads)":
            handling["input_size"] or "not stated",
        "interpolation (resizing to and from the purifier)": handling["interpolation"],
        "n_samples (independent purifications per image)": model.n_samples,
        "aggregate (how they combine: mean logits or majority vote)": model.aggregate,
        "normalisation from": handling["normalization_source"],
    }
    card = defended_model_card(
        classifier=described, purifier=purifier_config, input_handling=shown, metrics=metrics,
        card_data=card_data, repo_id=repo_id,
        model_name=repo_id.split("/")[-1] if repo_id else folder.resolve().name,
    )
    write_atomic(folder / MODEL_CARD, card)
    return folder


def _numbers(values: list[float] | None) -> str:
    if values is None:
        return "none (the identity: the classifier takes [0, 1] images)"
    return "(" + ", ".join(f"{value:.4g}" for value in values) + ")"


def _input_shape(handling: dict[str, Any]) -> str:
    channels = handling["channels"] if handling["channels"] is not None else "C"
    size = handling["input_size"]
    side = f"{size}, {size}" if size else "H, W"
    return f"(N, {channels}, {side}) in [0, 1]"


def _remove_stale_purifier(stale: Path) -> None:
    """Remove the purifier layout's files (only those) and the folders they leave empty."""
    if not stale.is_dir():
        return
    for name in PURIFIER_PATTERNS:
        (stale / name).unlink(missing_ok=True)
    for part in sorted((p for p in stale.rglob("*") if p.is_dir()), reverse=True):
        if not any(part.iterdir()):
            part.rmdir()
    if not any(stale.iterdir()):
        stale.rmdir()


def _missing_config_message(folder: Path) -> str:
    message = (f"missing file {MODEL_CONFIG} in {folder}: a defended-model folder "
               "(PurifiedModel.save_pretrained) holds it with classifier/ and README.md")
    if (folder / PURIFIER_CONFIG).is_file():
        message += (f"; this is a purifier folder: load it with Purifier.from_pretrained, or "
                    f"put it in front of a classifier with PurifiedModel(classifier, '{folder}')")
    return message


def _read_config(path: Path) -> dict[str, Any]:
    """purified_model.json, checked key by key (the values' ranges are PurifiedModel's)."""
    config = read_json(path, "defended model config")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{path}: format_version must be an integer >= 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version}; this purifyguard reads up to "
            f"{FORMAT_VERSION}: upgrade purifyguard"
        )
    unknown = set(config) - {"format_version", "classifier", "purifier", "n_samples", "aggregate",
                             "input"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    classifier = config.get("classifier")
    if not isinstance(classifier, dict) or classifier.get("format") not in (
            TIMM_FORMAT, STATE_DICT_FORMAT):
        raise ValueError(
            f"{path}: classifier must be a mapping whose format is {TIMM_FORMAT!r} or "
            f"{STATE_DICT_FORMAT!r}, got {classifier!r}"
        )
    if config.get("purifier") not in (None, PURIFIER_DIR):
        raise ValueError(f"{path}: purifier must be {PURIFIER_DIR!r} or null, got "
                         f"{config.get('purifier')!r}")
    handling = config.get("input")
    if not isinstance(handling, dict) or set(handling) != set(INPUT_KEYS):
        raise ValueError(f"{path}: input must be a mapping of {list(INPUT_KEYS)}, got {handling!r}")
    if not isinstance(handling["normalization_source"], str):
        raise ValueError(f"{path}: input.normalization_source must be a string")
    if (handling["mean"] is None) != (handling["std"] is None):
        raise ValueError(f"{path}: input.mean and input.std must both be given or both null")
    channels = handling["channels"]
    if channels is not None and (not isinstance(channels, int) or isinstance(channels, bool)):
        raise ValueError(f"{path}: input.channels must be an integer or null, got {channels!r}")
    config.setdefault("n_samples", 1)
    config.setdefault("aggregate", "mean")  # folders saved before the vote existed
    return config


def _load_classifier(
    folder: Path, described: dict[str, Any], classifier: nn.Module | None, where: str | Path
) -> nn.Module:
    """The saved classifier: rebuilt from a timm folder, or the given instance with the saved
    weights loaded into it."""
    weights = folder / CLASSIFIER_WEIGHTS
    if classifier is None:
        if described["format"] == TIMM_FORMAT:
            return load_guidance_network(folder / CLASSIFIER_DIR)
        saved_class = described.get("class", "nn.Module")
        raise ValueError(
            f"{where} holds its classifier ({saved_class}) as a state dict "
            f"({CLASSIFIER_WEIGHTS}), and nothing is imported from a folder: pass the classifier "
            f"itself, PurifiedModel.from_pretrained({str(where)!r}, classifier=<a "
            f"{saved_class.rpartition('.')[2]} built as it was saved, e.g. "
            "torchvision.models.resnet18(num_classes=10)>); its weights are loaded into it"
        )
    if not weights.is_file():
        raise FileNotFoundError(f"missing file {CLASSIFIER_WEIGHTS} (expected at {weights})")
    saved_class = described.get("class")
    actual = f"{type(classifier).__module__}.{type(classifier).__qualname__}"
    if saved_class and saved_class != actual:
        logger.warning("%s was saved with a %s classifier; loading its weights into a %s",
                       where, saved_class, actual)
    try:
        load_model(classifier, str(weights), strict=True, device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights} is not a readable safetensors file: {error}") from None
    except RuntimeError as error:  # missing, unexpected or differently shaped tensors
        raise ValueError(
            f"{weights} does not fit the classifier given ({actual}): "
            + " ".join(str(error).split())
        ) from None
    check_weights_finite(classifier, weights)
    return classifier.eval()
