"""The robustbench package itself: finding the real one and importing its model zoo.

    from purifyguard.adapters.robustbench_package import robustbench_modules

    rb = robustbench_modules()   # rb.utils.load_model, rb.model_dicts, rb.version, ...

RobustBench is optional and installed apart (docs/adapters.md): its PyPI release pins
timm==1.0.9, so install it with --no-deps beside the light packages its model zoo imports (the
`robustbench` extra). torchattacks ships an old copy of it under the same module name, which is
told apart here by the distribution's metadata and the installed files' hashes; and when
robustbench's package __init__ cannot run for want of its benchmark half's imports, its model
zoo and load_model are imported without it. purifyguard.adapters.robustbench_zoo loads zoo
entries through what this module returns.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

ROBUSTBENCH_TESTED = "1.1.1"
INSTALL_ROBUSTBENCH = (
    'pip install "purifyguard[robustbench]" && pip install --no-deps robustbench==1.1.1'
)
# Modules that only robustbench's benchmark half imports (its package __init__ pulls them in
# through eval.py and data.py); its model zoo and load_model need none of them.
_BENCHMARK_ONLY = frozenset({"autoattack", "pandas", "pkg_resources", "jinja2"})
# Import name -> package name of what the zoo and load_model import.
_ZOO_PACKAGES = {"gdown": "gdown", "requests": "requests", "yaml": "pyyaml",
                 "geotorch": "geotorch", "torchdiffeq": "torchdiffeq", "timm": "timm"}
# Files whose content tells the real package from torchattacks' old copy of it.
_CHECKED_FILES = ("robustbench/utils.py", "robustbench/model_zoo/models.py",
                  "robustbench/model_zoo/cifar10.py")


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
