"""Reading and writing the small files purifyguard keeps: atomically, and with errors that name
the file.

A file written here is complete or absent: it goes to a temporary file in the same folder, is
flushed to disk, then renamed over the target (a rename within a folder is atomic), so a crash or
a full disk never leaves a half-written report, settings file or checkpoint manifest behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


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
