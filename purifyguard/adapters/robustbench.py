"""RobustBench: its `benchmark` call, and its model zoo as classifiers.

    from purifyguard.adapters.robustbench import benchmark, load_robustbench_model

    clean, robust = benchmark(model, dataset="fashion-mnist", threat_model="Linf")
    clean, robust, report = benchmark(model, ..., return_report=True)
    classifier = load_robustbench_model("robustbench:cifar10/Linf/Zhang2019Theoretically")

`benchmark` returns what RobustBench's does, (clean accuracy, robust accuracy), and takes
`device=` as it does. RobustBench's runs AutoAttack on a deterministic model. A purifier is
randomised, so this one runs purifyguard's own protocol (docs/evaluation.md, "The
protocol") instead: full-gradient APGD-EOT and PGD-EOT, AutoAttack rand, BPDA-EOT, transfer and
Square, each adversarial example judged by R independent purifications. The robust accuracy
returned is the lowest over the attacks; the report (return_report=True) holds every attack's
figures, intervals and settings.

`load_robustbench_model` builds a RobustBench model-zoo entry with robustbench's own code
(`robustbench.utils.load_model`, its architectures, its folder layout
`<model_dir>/<dataset>/<threat model>/<model>.pt` and its Google Drive download). RobustBench is
optional and installed apart (docs/adapters.md): its PyPI release pins timm==1.0.9, so install it
with --no-deps beside the light packages its model zoo imports (the `robustbench` extra).
RobustBench's checkpoints are pickles, which robustbench's loader reads with torch.load: here
torch.load is held to weights_only=True while it runs (allow_pickle=True lifts that for a file
you trust), and the weights are saved once as `<model>.safetensors` beside the checkpoint, which
later loads read instead, pickle-free.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import pickle
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch
from torch import nn

from purifyguard.evaluation.attacks import (
    REFERENCE_EOT,
    REFERENCE_SQUARE_QUERIES,
    REFERENCE_STEPS,
    AttackSpec,
    default_attacks,
    parse_attack,
)
from purifyguard.evaluation.harness import evaluate
from purifyguard.files import write_atomic
from purifyguard.validation import check_bool

logger = logging.getLogger(__name__)

# The protocol's budgets per data set and threat model (docs/evaluation.md; CIFAR-100 as in
# RobustBench, the same as CIFAR-10).
EPSILONS = {
    ("fashion-mnist", "linf"): 0.1,
    ("fashion-mnist", "l2"): 1.5,
    ("cifar10", "linf"): 8 / 255,
    ("cifar10", "l2"): 0.5,
    ("cifar100", "linf"): 8 / 255,
    ("cifar100", "l2"): 0.5,
}
# docs/evaluation.md: step 0.007 for L-inf 8/255 (eps / 4 otherwise) for the PGD-type attacks.
_STEP_AT_8_255 = 0.007
_PGD_KINDS = ("pgd", "bpda", "transfer")
_BUNDLED_TEST_IMAGES = 512
STATISTICS = ("mean", "worst_case")


class BenchmarkResult(NamedTuple):
    """What benchmark(..., return_report=True) returns: clean_accuracy and robust_accuracy as
    fractions in [0, 1], and the full report."""

    clean_accuracy: float
    robust_accuracy: float
    report: dict[str, Any]


def benchmark(
    model: nn.Module,
    dataset: str = "fashion-mnist",
    threat_model: str = "Linf",
    n_examples: int = 512,
    eps: float | None = None,
    data_dir: str | Path | None = None,
    batch_size: int = 64,
    runs: int = 10,
    seed: int = 0,
    steps: int = REFERENCE_STEPS,
    eot: int = REFERENCE_EOT,
    n_queries: int = REFERENCE_SQUARE_QUERIES,
    output_dir: str | Path | None = None,
    *,
    attacks: Sequence[AttackSpec | str] | None = None,
    statistic: str = "mean",
    sanity: bool = False,
    progress: bool = True,
    model_name: str = "model",
    device: str | torch.device | None = None,
    return_report: bool = False,
) -> tuple[float, float] | BenchmarkResult:
    """Clean and robust accuracy of `model` (images in [0, 1] -> logits, e.g. a PurifiedModel)
    on n_examples test images, under the protocol's attacks.

    dataset: "fashion-mnist", "cifar10" or "cifar100", read from data_dir (see
        purifyguard.data.load_dataset); Fashion-MNIST with no data_dir and n_examples <= 512
        uses the test images bundled in the package (the first 512 of the test set).
    threat_model: "Linf" or "L2" (RobustBench's names; its ThreatModel enum works too).
    eps: None takes the protocol's budget for the data set and threat model (EPSILONS).
    steps, eot, n_queries: attack iterations, EOT samples and Square queries; the defaults are
        the protocol's reference, smaller values are marked reduced in the report.
    attacks: other attacks instead of the protocol's set (AttackSpec objects or strings).
    statistic: "mean" (accuracy averaged over the R runs) or "worst_case" (an example counts
        only if all R runs are right), for the two figures returned.
    device: where the model and images go ("cpu", "cuda:0", a torch.device), as RobustBench's
        `device`; None takes accelerate's device (the GPU when there is one; RobustBench's
        default is the CPU).
    Returns (clean_accuracy, robust_accuracy) as RobustBench's benchmark does; robust_accuracy is
    the lowest over the attacks. return_report=True returns a BenchmarkResult (clean_accuracy,
    robust_accuracy, report) instead, whose report (docs/evaluation.md) says which attack
    reached it; the report is also written to output_dir when one is given.
    """
    check_bool("return_report", return_report)
    norm = _norm(threat_model)
    dataset = str(getattr(dataset, "value", dataset)).lower().replace("_", "-")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if eps is None:
        if (dataset, norm) not in EPSILONS:
            raise ValueError(
                f"no protocol budget for {dataset} {threat_model}: pass eps (known: "
                f"{sorted({d for d, _ in EPSILONS})})"
            )
        eps = EPSILONS[dataset, norm]
    if attacks is None:
        specs = default_attacks(norm, eps, steps, eot, n_queries)
        if norm == "linf" and abs(eps - 8 / 255) < 1e-9:
            specs = [s.replace(step_size=_STEP_AT_8_255) if s.kind in _PGD_KINDS else s
                     for s in specs]
    else:
        specs = [parse_attack(a) if isinstance(a, str) else a for a in attacks]
    data, class_names = _test_data(dataset, data_dir, n_examples)
    report = evaluate(
        model, data, specs, n=n_examples, batch_size=batch_size, runs=runs, seed=seed,
        output_dir=output_dir, model_name=model_name, sanity=sanity, class_names=class_names,
        progress=progress, device=device,
    )
    records = [r for r in report["records"] if r["model"] == model_name]
    clean = records[0]["clean_accuracy"][statistic]
    robust = min(r["robust_accuracy"][statistic] for r in records)
    if return_report:
        return BenchmarkResult(clean, robust, report)
    return clean, robust


def _norm(threat_model: Any) -> str:
    name = str(getattr(threat_model, "value", threat_model)).lower()
    if name not in ("linf", "l2"):
        raise ValueError(
            f"threat_model must be 'Linf' or 'L2', got {threat_model!r} (corruptions are not "
            "an adversarial threat model and are not supported)"
        )
    return name


def _test_data(dataset: str, data_dir: str | Path | None, n_examples: int):
    """The test split, as a Dataset or an (images, labels) pair, and its class names."""
    if dataset == "fashion-mnist" and data_dir is None and n_examples <= _BUNDLED_TEST_IMAGES:
        from purifyguard.presets import bundled_test_images

        images, labels, classes = bundled_test_images()
        return (images, labels), classes
    from purifyguard.data import load_dataset

    data = load_dataset(dataset, root=data_dir, train=False)
    return data, getattr(data, "classes", None)


# --- the RobustBench model zoo -------------------------------------------------------------

ROBUSTBENCH_PREFIX = "robustbench:"
ROBUSTBENCH_TESTED = "1.1.1"
INSTALL_ROBUSTBENCH = (
    'pip install "purifyguard[robustbench]" && pip install --no-deps robustbench==1.1.1'
)
DATASETS = ("cifar10", "cifar100", "imagenet")
THREAT_MODELS = ("Linf", "L2", "corruptions", "corruptions_3d")
DERIVED_FORMAT = "purifyguard: weights of a RobustBench model-zoo entry"
# Modules that only robustbench's benchmark half imports (its package __init__ pulls them in
# through eval.py and data.py); its model zoo and load_model need none of them.
_BENCHMARK_ONLY = frozenset({"autoattack", "pandas", "pkg_resources", "jinja2"})
# Import name -> package name of what the zoo and load_model import.
_ZOO_PACKAGES = {"gdown": "gdown", "requests": "requests", "yaml": "pyyaml",
                 "geotorch": "geotorch", "torchdiffeq": "torchdiffeq", "timm": "timm"}
# Files whose content tells the real package from torchattacks' old copy of it.
_CHECKED_FILES = ("robustbench/utils.py", "robustbench/model_zoo/models.py",
                  "robustbench/model_zoo/cifar10.py")
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
    cache = Path(os.environ.get("PURIFYGUARD_CACHE", Path.home() / ".cache" / "purifyguard"))
    return cache / "robustbench"


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


class RobustBenchModules(NamedTuple):
    """The parts of robustbench that load_robustbench_model uses."""

    utils: ModuleType
    model_dicts: Any
    BenchmarkDataset: Any
    ThreatModel: Any
    version: str


def robustbench_modules() -> RobustBenchModules:
    """robustbench.utils and its model zoo, from the real robustbench distribution.

    ImportError, with the install command, when robustbench is not installed, when the
    `robustbench` Python finds is the old copy torchattacks installs (it has no distribution of
    its own), or when the installed files were overwritten by it. When robustbench's package
    __init__ cannot run because its benchmark half lacks its imports (AutoAttack, pandas,
    pkg_resources: robustbench 1.1.1's PyPI requirements do not provide `autoattack`, and
    setuptools >= 82 has no pkg_resources), robustbench.utils and robustbench.model_zoo are
    imported without it; `robustbench.benchmark` is then unavailable in this process.
    """
    version = _robustbench_distribution()
    with warnings.catch_warnings():
        # robustbench 1.1.1 imports timm's old module paths, which newer timm warns about.
        warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)
        utils = _import_robustbench_utils()
        models = importlib.import_module("robustbench.model_zoo")
        enums = importlib.import_module("robustbench.model_zoo.enums")
    return RobustBenchModules(utils, models.model_dicts, enums.BenchmarkDataset,
                              enums.ThreatModel, version)


def _robustbench_distribution() -> str:
    """The installed robustbench's version, after checking it is the real package."""
    from importlib import metadata

    try:
        distribution = metadata.distribution("robustbench")
    except metadata.PackageNotFoundError:
        owners = metadata.packages_distributions().get("robustbench", [])
        if owners:
            raise ImportError(
                f"the `robustbench` module Python finds here was installed by "
                f"{', '.join(sorted(set(owners)))} (torchattacks ships an old copy of robustbench "
                f"without RobustBench's own metadata), not by RobustBench. Install the real one "
                f"over it: {INSTALL_ROBUSTBENCH}"
            ) from None
        raise ImportError(
            f"RobustBench models need the robustbench package, which is not installed: "
            f"{INSTALL_ROBUSTBENCH} (docs/adapters.md; --no-deps keeps purifyguard's timm)"
        ) from None
    version = distribution.version
    if _version_tuple(version) < (1, 0):
        raise ImportError(f"robustbench {version} is too old (tested: {ROBUSTBENCH_TESTED}): "
                          f"{INSTALL_ROBUSTBENCH}")
    listed = {str(f): f for f in distribution.files or []}
    reinstall = f"pip install --no-deps --force-reinstall robustbench=={version}"
    for name in _CHECKED_FILES:
        entry = listed.get(name)
        if entry is None or entry.hash is None:
            continue  # an editable or source install lists no hashes: nothing to compare
        path = Path(distribution.locate_file(entry))
        if not path.is_file() or _urlsafe_sha256(path) != entry.hash.value:
            raise ImportError(
                f"robustbench {version}'s file {path} is missing or not the one robustbench "
                f"installed (another package, such as torchattacks with its old copy of "
                f"robustbench, was installed or removed after it): {reinstall}"
            )
    try:
        spec = importlib.util.find_spec("robustbench")
    except ValueError:  # a module object without a spec in sys.modules
        spec = None
    expected = Path(distribution.locate_file("robustbench/__init__.py"))
    if (spec is not None and spec.origin and expected.is_file()
            and Path(spec.origin).resolve() != expected.resolve()):
        raise ImportError(
            f"Python imports robustbench from {spec.origin}, but the installed robustbench "
            f"{version} is at {expected}: a folder or module named robustbench shadows it"
        )
    return version


def _import_robustbench_utils() -> ModuleType:
    loaded = sys.modules.get("robustbench.utils")
    if loaded is not None:
        return loaded
    try:
        return importlib.import_module("robustbench.utils")
    except ModuleNotFoundError as error:
        missing = (error.name or "").partition(".")[0]
        if missing not in _BENCHMARK_ONLY:
            raise _missing_zoo_package(missing) from error
        logger.info("robustbench's package __init__ needs %s (its benchmark half); importing "
                    "its model zoo and load_model without it", missing)
    spec = importlib.util.find_spec("robustbench")
    package = importlib.util.module_from_spec(spec)
    package.__getattr__ = _zoo_only_attribute
    sys.modules["robustbench"] = package
    try:
        return importlib.import_module("robustbench.utils")
    except ModuleNotFoundError as error:
        raise _missing_zoo_package((error.name or "").partition(".")[0]) from error


def _zoo_only_attribute(name: str) -> Any:
    raise AttributeError(
        f"robustbench.{name} is unavailable: purifyguard imported robustbench's model zoo and "
        "load_model without its package __init__, whose benchmark half needs AutoAttack "
        "(github.com/fra31/auto-attack), pandas and pkg_resources (setuptools < 82)"
    )


def _missing_zoo_package(module: str) -> ImportError:
    package = _ZOO_PACKAGES.get(module, module)
    return ImportError(
        f"robustbench's model zoo needs the package {package!r} (module {module!r}), which is "
        f"not installed: pip install \"purifyguard[robustbench]\" (or pip install {package})"
    )


def _version_tuple(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


def _urlsafe_sha256(path: Path) -> str:
    """A file's SHA-256 as a wheel's RECORD writes it (urlsafe base64, no padding)."""
    import base64

    return base64.urlsafe_b64encode(_sha256(path).digest()).rstrip(b"=").decode()


def _sha256(path: Path) -> Any:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest


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
