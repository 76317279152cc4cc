"""Reading and writing the small files purifyguard keeps: atomically, and with errors that name
the file.

A file written here is complete or absent: it goes to a temporary file in the same folder, is
flushed to disk, then renamed over the target (a rename within a folder is atomic), so a crash or
a full disk never leaves a half-written report, settings file or checkpoint manifest behind. It
gets the mode an ordinary open() would give it (0o666 less the umask, e.g. 0o644), not the 0o600
of the temporary file.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc/self/status),
    else by setting and restoring it under a lock (os.umask is the only portable reader)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def ordinary_mode(path: str | Path) -> Path:
    """Give a file (or folder) made by tempfile (mode 0o600, or 0o700 for a folder) the mode an
    ordinary open() (or mkdir) gives: 0o666 (0o777) less the umask. Returns the path."""
    path = Path(path)
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~current_umask())
    return path


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write text or bytes to path atomically (temporary file, flush, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(raw)
            file.flush()
            os.fsync(file.fileno())
        ordinary_mode(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, value: Any) -> Path:
    """JSON with two-space indents and a final newline, written atomically."""
    return write_atomic(path, json.dumps(value, indent=2) + "\n")


def read_json(path: str | Path, what: str = "JSON file", expect: type | None = dict) -> Any:
    """The JSON value of a file; ValueError naming the file when it is empty, not JSON, or not of
    the expected type (a mapping by default)."""
    return _read_structured(path, what, expect, "JSON", json.loads, json.JSONDecodeError)


def read_yaml(path: str | Path, what: str = "YAML file", expect: type | None = dict) -> Any:
    """The same for YAML (read with yaml.safe_load, which builds no Python objects)."""
    import yaml

    return _read_structured(path, what, expect, "YAML", yaml.safe_load, yaml.YAMLError)


def _read_structured(path, what, expect, language, parse, error_type) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"{what} {path} is empty")
    try:
        value = parse(text)
    except error_type as error:
        raise ValueError(f"{what} {path} is not valid {language}: {error}") from None
    if expect is not None and not isinstance(value, expect):
        raise ValueError(
            f"{what} {path} must hold a {language} {_json_kind(expect)}, got "
            f"{_json_kind(type(value))}"
        )
    return value


def check_inside(path: Path, folder: Path, what: str = "file") -> Path:
    """path itself, after checking that it, with every link followed, lies inside folder: a
    symbolic link out of a model folder must not make purifyguard read files elsewhere."""
    resolved, root = path.resolve(), folder.resolve()
    if resolved != root and root not in resolved.parents:
        raise ValueError(
            f"{what} {path} links to {resolved}, outside the folder {folder}; a model folder "
            "loads only the files it contains"
        )
    return path


def _json_kind(kind: type) -> str:
    return {dict: "object (a mapping)", list: "array", str: "string", int: "integer",
            float: "number", bool: "boolean", type(None): "null"}.get(kind, kind.__name__)


def write_figure(figure: Any, path: str | Path) -> Path:
    """A matplotlib Figure as a PNG at `path`, written atomically; the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    picture = io.BytesIO()
    figure.savefig(picture, dpi=100, format="png")
    plt.close(figure)
    return write_atomic(Path(path), picture.getvalue())


CACHE_VARIABLE = "PURIFYGUARD_CACHE"


def cache_folder(*parts: str) -> Path:
    """purifyguard's cache folder ($PURIFYGUARD_CACHE, default ~/.cache/purifyguard), or a
    subfolder of it; ValueError naming the variable when it is set but empty, or when it (or a
    folder on the way) is a file: nothing could be cached there."""
    value = os.environ.get(CACHE_VARIABLE)
    if value is not None and not value.strip():
        raise ValueError(f"{CACHE_VARIABLE} is set but empty; set it to a folder, or unset it "
                         "for ~/.cache/purifyguard")
    root = Path(value).expanduser() if value is not None else (
        Path.home() / ".cache" / "purifyguard")
    folder = root.joinpath(*parts)
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                source = (f"{CACHE_VARIABLE}={value}" if value is not None
                          else "the default cache ~/.cache/purifyguard")
                raise ValueError(
                    f"{source}: {path} is a file, not a folder, so nothing can be cached in "
                    f"{folder}; point {CACHE_VARIABLE} at a folder (or unset it for "
                    "~/.cache/purifyguard)"
                )
            break
    return folder
