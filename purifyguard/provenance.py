"""Training records fit to ship with weights: the same commands and settings, without the folders
of the machine that ran them.

A model card or a purifier_config.json that travels with weights says how they were trained
(`purifyguard train ... --data-root /data/fashion-mnist --output-dir /srv/runs/x`). The
absolute paths in such a record mean nothing on another machine and tell the world how the
trainer's disk is laid out, so records are shared with placeholders instead:
`--data-root '<fashion-mnist folder>' --output-dir '<run folder>'`.
"""

from __future__ import annotations

import shlex
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

# The placeholder of each option whose value is a file or folder ({data}: the --data value).
PATH_PLACEHOLDERS = {
    "--data-root": "<{data} folder>",
    "--output-dir": "<run folder>",
    "--purifier": "<purifier folder>",
    "--classifier": "<classifier folder>",
    "--teacher": "<teacher folder>",
    "--config": "<config file>",
    "--unet-config": "<unet config file>",
}
OTHER_PATH = "<folder>"


def is_absolute_path(value: str) -> bool:
    """Whether a string is an absolute (or home-relative) path on some machine."""
    return (PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute()
            or value.startswith("~"))


def portable_command(command: str) -> str:
    """The command with every absolute path given to an option replaced by a placeholder.

    Relative paths, names and Hub ids stay as they are: they do not depend on the machine.
    The result is quoted for a shell (shlex.join), so it still parses as the same options.
    """
    words = shlex.split(command)
    data = words[words.index("--data") + 1] if "--data" in words[:-1] else "data"
    portable = []
    for index, word in enumerate(words):
        option, equals, value = word.partition("=")
        if option.startswith("--") and equals and is_absolute_path(value):
            portable.append(f"{option}={_placeholder(option, data)}")
        elif index and words[index - 1].startswith("--") and is_absolute_path(word):
            portable.append(_placeholder(words[index - 1], data))
        else:
            portable.append(word)
    return shlex.join(portable)


def portable_record(record: dict[str, Any]) -> dict[str, Any]:
    """A training record (as kept in PurifierConfig.extra and shown in model cards) with its
    commands made portable and any other absolute path replaced by a placeholder."""
    portable: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            value = portable_record(value)
        elif isinstance(value, str) and key.endswith("command"):
            value = portable_command(value)
        elif isinstance(value, str) and is_absolute_path(value):
            value = f"<{key} folder>"
        portable[key] = value
    return portable


def portable_arguments(options: dict[str, Any]) -> dict[str, Any]:
    """A run's parsed options (its args.json: option names with underscores) with every absolute
    path replaced by the placeholder its command-line option gets (portable_command)."""
    data = str(options.get("data") or "data")
    return {key: _placeholder("--" + key.replace("_", "-"), data)
            if isinstance(value, str) and is_absolute_path(value) else value
            for key, value in options.items()}


def _placeholder(option: str, data: str) -> str:
    return PATH_PLACEHOLDERS.get(option, OTHER_PATH).format(data=data)
