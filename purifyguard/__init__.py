"""purifyguard: a robust diffusion purifier with adversarial guidance in front of any classifier.

The public names load on first use (PEP 562): `import purifyguard` and the command line's
`--help` stay fast, while `from purifyguard import PurifiedModel` works as it always did. The
built-in named purifiers join the registry here, at import (purifyguard.presets: light, no torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import purifyguard.presets  # noqa: F401  (fills the registry with the built-in purifiers)
from purifyguard.version import __version__ as __version__

# public name -> the module that defines it
_EXPORTS = {
    "PurifiedModel": "purifyguard.purified_model",
    "Purifier": "purifyguard.purifier",
    "PurifierConfig": "purifyguard.config",
    "bundled_classifier": "purifyguard.presets",
    "bundled_test_images": "purifyguard.presets",
    "evaluate": "purifyguard.evaluation.harness",
    "list_purifiers": "purifyguard.registry",
    "load_purifier": "purifyguard.registry",
    "register_purifier": "purifyguard.registry",
}

__all__ = [
    "PurifiedModel",
    "Purifier",
    "PurifierConfig",
    "bundled_classifier",
    "bundled_test_images",
    "evaluate",
    "list_purifiers",
    "load_purifier",
    "register_purifier",
]

if TYPE_CHECKING:  # what type checkers, IDEs and the API docs see
    from purifyguard.config import PurifierConfig
    from purifyguard.evaluation.harness import evaluate
    from purifyguard.presets import bundled_classifier, bundled_test_images
    from purifyguard.purified_model import PurifiedModel
    from purifyguard.purifier import Purifier
    from purifyguard.registry import list_purifiers, load_purifier, register_purifier


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'purifyguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
