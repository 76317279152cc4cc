"""A RobustBench model-zoo entry, loaded by name as a classifier, robustly.

    from purifyguard.adapters.robustbench_zoo import load_robustbench_model

    classifier = load_robustbench_model("robustbench:cifar10/Linf/Zhang2019Theoretically")

(purifyguard.adapters.robustbench, the benchmark half, re-exports these names.)

`load_robustbench_model` builds a RobustBench model-zoo entry with robustbench's own code
(`robustbench.utils.load_model`, its architectures, its folder layout
`<model_dir>/<dataset>/<threat model>/<model>.pt` and its Google Drive download), from the real
robustbench package that purifyguard.adapters.robustbench_package finds. RobustBench's
checkpoints are pickles, which robustbench's loader reads with torch.load: here torch.load is
held to weights_only=True while it runs (allow_pickle=True lifts that for a file you trust),
and the weights are saved once as `<model>.safetensors` beside the checkpoint, which later
loads read instead, pickle-free.

This module imports neither purifyguard.evaluation nor purifyguard.presets:
purifyguard.cifar10 builds its guidance network with it.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import pickle
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch
from torch import nn

from purifyguard.adapters.robustbench_package import (
    RobustBenchModules,
    _sha256,
    _version_tuple,
    robustbench_modules,
)
from purifyguard.files import write_atomic
from purifyguard.validation import check_bool

logger = logging.getLogger(__name__)

ROBUSTBENCH_PREFIX = "robustbench:"
DATASETS = ("cifar10", "cifar100", "imagenet")
THREAT_MODELS = ("Linf", "L2", "corruptions", "corruptions_3d")
DERIVED_FORMAT = "purifyguard: weights of a RobustBench model-zoo entry"
_WEIGHTS_ONLY_VARIABLES = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")


class RobustBenchName(NamedTuple):
    """robustbench:<dataset>/<threat model>/<model>, in RobustBench's own spelling."""

    dataset: str
    threat_model: str
    model: str

    def __str__(self) -> str:
        return f"{ROBUSTBENCH_PREFIX}{self.dataset}/{self.threat_model}/{self.model}"


def parse_robustbench_name(name: str) -> RobustBenchName:
    """'robustbench:cifar10/Linf/Zhang2019Theoretically' (the prefix may be left out; data set
    and threat model in any case) -> RobustBenchName. ValueError for anything else."""
    if not isinstance(name, str):
        raise ValueError(f"a RobustBench model name must be a string, got {type(name).__name__}")
    body = name.removeprefix(ROBUSTBENCH_PREFIX)
    parts = body.split("/")
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise ValueError(
            f"a RobustBench model is named robustbench:<dataset>/<threat model>/<model>, e.g. "
            f"robustbench:cifar10/Linf/Zhang2019Theoretically; got {name!r}"
        )
    dataset = parts[0].lower().replace("-", "")
    if dataset not in DATASETS:
        raise ValueError(f"RobustBench data set must be one of {DATASETS}, got {parts[0]!r} "
                         f"in {name!r}")
    threat = {t.lower(): t for t in THREAT_MODELS}.get(parts[1].lower())
    if threat is None:
        raise ValueError(f"RobustBench threat model must be one of {THREAT_MODELS}, got "
                         f"{parts[1]!r} in {name!r}")
    return RobustBenchName(dataset, threat, parts[2])


def default_model_dir() -> Path:
    """Where load_robustbench_model keeps checkpoints when model_dir is None:
    $PURIFYGUARD_CACHE/robustbench (~/.cache/purifyguard/robustbench)."""
    from purifyguard.files import cache_folder

    return cache_folder("robustbench")


def load_robustbench_model(
    name: str, *, model_dir: str | Path | None = None, download: bool = True,
    allow_pickle: bool = False,
) -> nn.Module:
    """A RobustBench model-zoo model, in eval mode, by its name
    'robustbench:<dataset>/<threat model>/<model>', e.g.
    'robustbench:cifar10/Linf/Zhang2019Theoretically' (parse_robustbench_name).

    The model takes images in [0, 1] and normalises them itself (RobustBench's convention), so
    use it without a normalisation of your own. It is built by robustbench's own code: its
    model-zoo entry's architecture and `robustbench.utils.load_model`, reading
    `<model_dir>/<dataset>/<threat model>/<model>.pt` (ensembles: `<model>.pt_m<i>.pt`), as
    RobustBench lays out its folder. model_dir None is default_model_dir(); pass RobustBench's
    "./models" to use checkpoints it has already downloaded.

    A missing checkpoint is downloaded as robustbench does (gdown, from Google Drive) unless
    download=False; when it cannot be, FileNotFoundError says what would be downloaded, from
    where, and how to pre-fetch it.

    RobustBench's checkpoints are pickles and robustbench's loader reads them with torch.load,
    which can run code hidden in the file. Here torch.load runs with weights_only=True while
    robustbench's loader runs (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD switch, set for the call
    and restored after; torch >= 2.4), so a checkpoint
    holding anything but tensors and plain containers is refused (ValueError);
    allow_pickle=True unpickles it in full: only for a file you trust. After the first load,
    the weights are saved beside the checkpoint as `<model>.safetensors` (with the checkpoint's
    SHA-256), and later loads read that file instead, pickle-free (it also works alone, without
    the checkpoint).

    Models whose weights come through timm or torchvision rather than a RobustBench checkpoint
    (e.g. the ImageNet Standard_R50) are loaded by robustbench's load_model as they are, with
    those libraries' own downloads and caches.

    Needs the real robustbench package (ImportError with the install command otherwise, or when
    Python finds the old copy that torchattacks installs).
    """
    reference = parse_robustbench_name(name)
    check_bool("download", download)
    check_bool("allow_pickle", allow_pickle)
    rb = robustbench_modules()
    dataset = rb.BenchmarkDataset(reference.dataset)
    # robustbench keeps the 3D-corruption models with the corruption ones (as its load_model).
    threat = rb.ThreatModel(reference.threat_model.replace("_3d", ""))
    entries = rb.model_dicts[dataset].get(threat) or {}
    entry = entries.get(reference.model)
    if entry is None:
        close = difflib.get_close_matches(reference.model, list(entries), n=5)
        raise ValueError(
            f"RobustBench {rb.version} has no model {reference.model!r} for "
            f"{reference.dataset}/{threat.value} ({len(entries)} models there"
            + (f"; did you mean {', '.join(close)}?)" if close else ")")
        )
    root = default_model_dir() if model_dir is None else Path(model_dir)
    folder = root / dataset.value / threat.value
    timm_name = (f"{reference.model.lower().replace('-', '_')}_{dataset.value.lower()}_"
                 f"{threat.value.lower()}")
    ids = entry.get("gdrive_id")
    if _timm_is_model(timm_name) or not ids or (dataset.value == "imagenet"
                                                 and "Standard" in reference.model):
        return _load_through_libraries(rb, reference, root, allow_pickle)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    checkpoint = folder / f"{reference.model}.pt"
    files = ([Path(f"{checkpoint}_m{i}.pt") for i in range(len(ids))]
             if isinstance(entry["gdrive_id"], (list, tuple)) else [checkpoint])
    derived = folder / f"{reference.model}.safetensors"
    present = all(f.is_file() for f in files)
    if derived.is_file():
        model = _load_derived(entry, derived, _digests(files) if present else None, reference)
        if model is not None:
            return model
    missing = [(f, i) for f, i in zip(files, ids) if not f.is_file()]
    if missing:
        _download(rb.utils, missing, reference, root, download)
    with _torch_load_weights_only(not allow_pickle):
        try:
            model = rb.utils.load_model(reference.model, model_dir=str(root),
                                        dataset=dataset.value,
                                        threat_model=reference.threat_model)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"RobustBench checkpoint {', '.join(map(str, files))} holds Python objects "
                f"beyond tensors, which torch.load(weights_only=True) refuses "
                f"({_refusal(error)}). Unpickling it in full can run code: if you "
                "trust the file (robustbench's own download from its model zoo), pass "
                f"allow_pickle=True once; its weights are then saved as {derived} and later "
                "loads are pickle-free."
            ) from None
    model.eval()
    _save_derived(model, derived, files, reference, rb.version)
    return model


def _refusal(error: Exception) -> str:
    """The line of torch's weights-only refusal that names what it refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported" in line or "WeightsUnpickler" in line]
    return (named or lines or [type(error).__name__])[0]


def _digests(files: Sequence[Path]) -> list[str]:
    return [_sha256(f).hexdigest() for f in files]


def _timm_is_model(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


@contextlib.contextmanager
def _torch_load_weights_only(weights_only: bool) -> Iterator[None]:
    """torch.load with weights_only=True (or, for allow_pickle, False) for everything that runs
    inside, through torch's documented environment switches; the environment is restored
    after. (robustbench's loader calls torch.load without weights_only.)"""
    if weights_only and _version_tuple(torch.__version__) < (2, 4):
        raise RuntimeError(
            f"torch {torch.__version__} cannot hold robustbench's torch.load to weights_only "
            "(TORCH_FORCE_WEIGHTS_ONLY_LOAD needs torch >= 2.4): upgrade torch, or pass "
            "allow_pickle=True for a checkpoint you trust"
        )
    force, forbid = _WEIGHTS_ONLY_VARIABLES if weights_only else _WEIGHTS_ONLY_VARIABLES[::-1]
    saved = {key: os.environ.get(key) for key in _WEIGHTS_ONLY_VARIABLES}
    os.environ[force] = "1"
    os.environ.pop(forbid, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _load_through_libraries(rb: RobustBenchModules, reference: RobustBenchName, root: Path,
                            allow_pickle: bool) -> nn.Module:
    """Entries whose weights timm or torchvision fetch (no RobustBench checkpoint file)."""
    try:
        with _torch_load_weights_only(not allow_pickle):
            model = rb.utils.load_model(reference.model, model_dir=str(root),
                                        dataset=reference.dataset,
                                        threat_model=reference.threat_model)
    except OSError as error:
        raise FileNotFoundError(
            f"{reference}: robustbench builds this model through timm or torchvision, which "
            f"download its pretrained weights (timm: the Hugging Face Hub or the URL in its "
            f"model config; torchvision: download.pytorch.org) into their caches, and that "
            f"failed ({type(error).__name__}: {error}). Pre-fetch it by loading it once on a "
            "machine with internet access and copying the cache (~/.cache/huggingface, "
            "~/.cache/torch) here."
        ) from None
    return model.eval()


def _download(utils: ModuleType, missing: list[tuple[Path, str]], reference: RobustBenchName,
              root: Path, download: bool) -> None:
    """Fetch the missing checkpoint files with robustbench's own downloader (gdown)."""
    message = _missing_message(missing, reference, root)
    if not download:
        raise FileNotFoundError(f"{message}\n(download=False: nothing was downloaded.)")
    for path, file_id in missing:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            utils.download_gdrive_new(file_id, path)
        except Exception as error:  # noqa: BLE001 (gdown, requests and the OS raise their own)
            path.unlink(missing_ok=True)
            raise FileNotFoundError(
                f"{message}\nThe download failed: {type(error).__name__}: {error}"
            ) from None
        if not path.is_file() or path.stat().st_size == 0:
            path.unlink(missing_ok=True)
            raise FileNotFoundError(f"{message}\nThe download wrote no file.")


def _missing_message(missing: list[tuple[Path, str]], reference: RobustBenchName,
                     root: Path) -> str:
    lines = [(
        f"RobustBench checkpoint for {reference} not found under {root}. robustbench's loader "
        "downloads it from Google Drive with gdown, in its layout "
        "<model_dir>/<dataset>/<threat model>/<model>.pt:"
    )]
    lines += [f"  {path}  <-  https://drive.google.com/uc?id={file_id}"
              for path, file_id in missing]
    lines.append("To pre-fetch it, on a machine with internet access run")
    lines += [f"  gdown 'https://drive.google.com/uc?id={file_id}' -O '{path}'"
              for path, file_id in missing]
    lines.append(
        f"or python -c \"from purifyguard.adapters.robustbench import load_robustbench_model; "
        f"load_robustbench_model('{reference}', model_dir='{root}')\", and copy the file(s) "
        f"to the same place here (after one load, {reference.model}.safetensors beside them "
        "is enough on its own, and holds no pickle)."
    )
    return "\n".join(lines)


def _load_derived(entry: dict, path: Path, source: list[str] | None,
                  reference: RobustBenchName) -> nn.Module | None:
    """The model from the safetensors file saved at its first load; None when that file is not
    ours or was derived from another checkpoint than the one there now."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as file:
            metadata = file.metadata() or {}
    except (SafetensorError, OSError) as error:
        logger.warning("ignoring %s, which cannot be read (%s): loading the checkpoint", path,
                       error)
        return None
    if metadata.get("format") != DERIVED_FORMAT:
        logger.warning("ignoring %s: it was not written by load_robustbench_model", path)
        return None
    if source is not None and metadata.get("source_sha256") != json.dumps(source):
        logger.info("%s was derived from another checkpoint: loading the checkpoint again", path)
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)
        model = entry["model"]()
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except (RuntimeError, SafetensorError) as error:
        raise ValueError(
            f"{path} does not hold the weights of {reference} ({str(error).splitlines()[0]}); "
            "delete it to load the checkpoint again"
        ) from None
    return model.eval()


def _save_derived(model: nn.Module, path: Path, files: list[Path], reference: RobustBenchName,
                  version: str) -> None:
    from safetensors.torch import save

    tensors = {name: value.detach().cpu().contiguous().clone()
               for name, value in model.state_dict().items() if isinstance(value, torch.Tensor)}
    metadata = {
        "format": DERIVED_FORMAT, "name": str(reference), "robustbench_version": version,
        "source_files": json.dumps([f.name for f in files]),
        "source_sha256": json.dumps(_digests(files)),
    }
    try:
        write_atomic(path, save(tensors, metadata=metadata))
    except OSError as error:
        logger.warning("could not save %s (%s): the next load reads the checkpoint again",
                       path, error)
