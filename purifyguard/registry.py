"""Named, registered purifiers, and the choice of a default for a classifier's input.

The registry is a table that others fill (timm's `register_model` pattern): the built-in entries
come from purifyguard.presets, which the package imports first, and users add theirs with
`register_purifier`. Reading it is light: the purifier code (torch, diffusers) loads only when a
purifier does, so `purifyguard list` answers at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from purifyguard.purifier import Purifier

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisteredPurifier:
    name: str
    channels: int
    resolution: int
    description: str
    load: Callable[[], Purifier]
    default: bool


_REGISTRY: dict[str, RegisteredPurifier] = {}


def register_purifier(
    name: str, *, channels: int, resolution: int, description: str, default: bool = False
) -> Callable[[Callable[[], Purifier]], Callable[[], Purifier]]:
    """Decorator: register a loader under a name; `default` marks the pick for its input shape."""

    def decorate(load: Callable[[], Purifier]) -> Callable[[], Purifier]:
        _REGISTRY[name] = RegisteredPurifier(name, channels, resolution, description, load, default)
        return load

    return decorate


def list_purifiers() -> list[str]:
    return sorted(_REGISTRY)


def registered(name: str) -> RegisteredPurifier:
    if name not in _REGISTRY:
        raise ValueError(f"no purifier registered as {name!r}; registered: {list_purifiers()}")
    return _REGISTRY[name]


def load_purifier(spec: Purifier | str | Path) -> Purifier:
    """A purifier from an object, a registered name, a local folder or a Hub repo id."""
    from purifyguard.purifier import Purifier

    if isinstance(spec, Purifier):
        return spec
    if not isinstance(spec, (str, Path)):
        raise ValueError(
            f"purifier must be a Purifier, a registered name, a folder or a Hub repo id, "
            f"got {type(spec).__name__}"
        )
    if str(spec) in _REGISTRY:
        return _REGISTRY[str(spec)].load()
    if Path(spec).exists() or str(spec).count("/") == 1:
        return Purifier.from_pretrained(str(spec))
    raise ValueError(
        f"{str(spec)!r} is neither a registered purifier ({list_purifiers()}), an existing "
        "folder, nor a Hub repo id of the form 'user/name'"
    )


def default_purifier_name(channels: int | None, resolution: int | None) -> str:
    """The default registered purifier for a classifier input; ValueError when none matches.

    A purifier matches when its channels equal the classifier's and, where the classifier
    states a resolution, the two are within a factor of two of each other.
    """
    matches = [
        entry for entry in _REGISTRY.values()
        if entry.default and entry.channels == channels
        and (resolution is None or 0.5 <= resolution / entry.resolution <= 2)
    ]
    if not matches:
        described = ", ".join(
            f"{e.name} ({e.channels}x{e.resolution}x{e.resolution})" for e in _REGISTRY.values()
        )
        raise ValueError(
            f"no registered default purifier matches a classifier input of {channels} channels at "
            f"resolution {resolution or 'unknown'}. Registered: {described or 'none'}. Pass one "
            "explicitly: PurifiedModel(clf, purifier=<Purifier, name, folder or Hub repo id>)"
        )
    return matches[0].name
