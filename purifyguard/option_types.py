"""argparse types for the command line: each takes a flag's text, or a value from a config file,
and refuses what does not fit with a message saying what was expected (argparse names the option).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any


def _integer(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}")


def _real(value: Any) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if number is None:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}")
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


def _within(convert: Callable[[Any], Any], accept: Callable[[Any], bool], expected: str,
            name: str) -> Callable[[Any], Any]:
    """An argparse type: convert, then accept or refuse saying what was expected."""

    def parse(value: Any) -> Any:
        converted = convert(value)
        if not accept(converted):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
        return converted

    parse.__name__ = name
    parse.__doc__ = f"{expected[0].upper()}{expected[1:]}."
    return parse


integer = _within(_integer, lambda n: True, "an integer", "integer")
positive_int = _within(_integer, lambda n: n >= 1, "an integer >= 1", "positive_int")
non_negative_int = _within(_integer, lambda n: n >= 0, "an integer >= 0", "non_negative_int")
finite_float = _within(_real, lambda x: True, "a finite number", "finite_float")
positive_float = _within(_real, lambda x: x > 0, "a finite number > 0", "positive_float")
non_negative_float = _within(_real, lambda x: x >= 0, "a finite number >= 0",
                             "non_negative_float")
unit_interval = _within(_real, lambda x: 0 <= x <= 1, "a number in [0, 1]", "unit_interval")
# An exponential moving average's decay.
decay_rate = _within(_real, lambda x: 0 <= x < 1, "a number in [0, 1)", "decay_rate")


def text(value: Any) -> str:
    """A string (a config file's number is not taken for a name or a path)."""
    if not isinstance(value, str):
        raise argparse.ArgumentTypeError(f"expected a string, got {value!r}")
    return value


def _int_list(value: Any, least: int) -> tuple[int, ...]:
    parts = value if isinstance(value, (list, tuple)) else (
        str(value).split(",") if isinstance(value, (str, int)) and not isinstance(value, bool)
        else None
    )
    if parts is None:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}")
    parts = [part for part in parts if not (isinstance(part, str) and not part.strip())]
    try:
        numbers = tuple(_integer(part) for part in parts)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {value!r}") from None
    if any(number < least for number in numbers):
        raise argparse.ArgumentTypeError(f"expected integers >= {least}, got {value!r}")
    return numbers


def int_list(value: Any) -> tuple[int, ...]:
    """'32,64,64' (or a list) -> (32, 64, 64); integers >= 0."""
    return _int_list(value, 0)


def positive_int_list(value: Any) -> tuple[int, ...]:
    """'32,64,64' (or a list) -> (32, 64, 64); integers >= 1, at least one."""
    numbers = _int_list(value, 1)
    if not numbers:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {value!r}")
    return numbers


def json_object(value: Any) -> dict[str, Any]:
    """A JSON object given as text ('{"channels": [16, 32]}') or, in a config file, a mapping."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}: {error}") \
                from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return value
