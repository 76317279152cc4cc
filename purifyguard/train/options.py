"""Command-line options shared by the training routines, and config files standing in for flags.

Every numeric option has a small checking `type` (positive_int, finite_float, ...): a bad value
stops the run before any work starts, with a message naming the option, the value and what was
expected. Values from a --config file go through the same checks (argparse alone would take a
file's defaults as they are).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from purifyguard.cli import HelpFormatter  # noqa: F401 (the routines' help formatter)
from purifyguard.files import read_json, read_yaml
from purifyguard.option_types import (  # noqa: F401 (the routines import them from here)
    decay_rate,
    finite_float,
    int_list,
    integer,
    json_object,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    positive_int_list,
    text,
    unit_interval,
)
from purifyguard.threads import add_threads_argument

# Options that do not change what a run computes: --resume may differ in these from the run it
# continues. Every other option defines the run (see TrainingRun and defining_options).
NOT_DEFINING = frozenset({
    "resume", "no_progress", "checkpoint_every", "keep_checkpoints", "log_every", "num_workers",
    "output_dir", "config", "data_root", "threads",
})


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every routine has: data, optimisation, precision, seed, checkpoints, logging.

    A config file names an option by its dest (steps, batch_size) or by any of its flags
    (optimizer-steps); an option's first flag is its current name, the others older ones."""
    parser.add_argument("--config",
                        help="YAML or JSON file of options; flags given too win (default: none)")
    parser.add_argument("--data", type=text, default="fashion-mnist",
                        help="fashion-mnist, cifar10, cifar100 or imagefolder")
    parser.add_argument("--data-root", type=text,
                        help="data folder; imagefolder: the class sub-folders (default: "
                             "Fashion-MNIST from $PURIFYGUARD_FASHION_MNIST or Debian's "
                             "/usr/share/datasets/fashion-mnist, CIFAR from "
                             "~/.cache/purifyguard/<name>)")
    parser.add_argument("--output-dir", type=text, default="runs/train",
                        help="checkpoints, logs, export")
    parser.add_argument("--optimizer-steps", "--steps", dest="steps", metavar="N",
                        type=positive_int, default=1000,
                        help="optimizer steps in all (--steps is the old name; config key: steps)")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="images per step, per process")
    parser.add_argument("--lr", type=positive_float, default=2e-4, help="learning rate")
    parser.add_argument("--grad-accum", type=positive_int, default=1,
                        help="micro-batches per optimizer step")
    parser.add_argument("--mixed-precision", type=text, default="no",
                        choices=["no", "fp16", "bf16"], help="accelerate's mixed precision")
    parser.add_argument("--validation-size", type=non_negative_int, default=0,
                        help="training images held out for validation (class-stratified, chosen "
                        "by --validation-seed) and never trained on; 0 trains on all")
    parser.add_argument("--validation-seed", type=integer, default=0,
                        help="seed of the validation split (the same across routines, so every "
                        "model of a defence holds out the same images)")
    parser.add_argument("--seed", type=integer, default=0,
                        help="seed of Python, NumPy and torch (per process) and the data order")
    parser.add_argument("--checkpoint-every", type=positive_int, default=200,
                        help="optimizer steps between checkpoints")
    parser.add_argument("--keep-checkpoints", type=positive_int, default=2,
                        help="checkpoints kept (the newest)")
    parser.add_argument("--log-every", type=positive_int, default=10,
                        help="optimizer steps between logged metrics")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest intact checkpoint (same options)")
    parser.add_argument("--num-workers", type=non_negative_int, default=0,
                        help="DataLoader worker processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(parser)


class RenamedOption(argparse.Action):
    """Stores the value like a plain option; given under one of its old flags, it also prints a
    note (to stderr) saying what the option counts, where the old name misleads (--train-steps is
    not the number of training steps)."""

    def __init__(self, option_strings: list[str], dest: str, old_name_note: str = "",
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.old_name_note = old_name_note

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        if option_string is not None and option_string != self.option_strings[0]:
            print(f"{parser.prog}: note: {option_string} is the old name of "
                  f"{self.option_strings[0]}{self.old_name_note}", file=sys.stderr)


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse flags; a --config file supplies defaults that explicit flags override.

    Every value of the file is checked and converted by its option's own type and choices (a
    flag needs true or false), so a file is held to what the command line is held to; an error
    names the option, the value and the file (argparse's exit status 2)."""
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config")
    first, _ = config_only.parse_known_args(argv)
    if first.config:
        try:
            values = load_config_file(first.config)
        except (OSError, ValueError) as error:
            parser.error(str(error))
        actions = {action.dest: action for action in parser._actions if action.dest != "help"}
        try:
            values = _by_dest(values, parser)
        except ValueError as error:
            parser.error(f"{first.config}: {error}")
        unknown = sorted(set(values) - set(actions))
        if unknown:
            parser.error(f"unknown options in {first.config}: {unknown}")
        if "config" in values:
            parser.error(f"{first.config}: a config file cannot name another (config: ...)")
        defaults = {}
        for dest, value in values.items():
            try:
                defaults[dest] = _config_value(actions[dest], value)
            except argparse.ArgumentTypeError as error:
                parser.error(f"option {_flag(actions[dest])} ({dest}) in {first.config}: {error}")
        parser.set_defaults(**defaults)
        for action in parser._actions:  # a required option the file supplies is supplied
            if action.dest in values:
                action.required = False
    return parser.parse_args(argv)


def options_from_keywords(
    parser: argparse.ArgumentParser, values: dict[str, Any], caller: str
) -> argparse.Namespace:
    """The options of a Python call, given by keyword as a config file names them (by dest or by
    any flag: optimizer_steps or steps), checked and converted by each option's own type and
    choices; the others take their defaults. ValueError naming the keyword and the caller."""
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    dests = _flag_dests(parser)
    unknown = sorted(key for key in values if dests.get(key, key) not in actions)
    if unknown:
        known = sorted(dest for dest in actions if dest != "config")
        raise ValueError(f"{caller}: unknown options {unknown}; the options are {known}")
    try:
        _by_dest(values, parser)  # two keys naming one option
    except ValueError as error:
        raise ValueError(f"{caller}: {error}") from None
    namespace = {dest: action.default for dest, action in actions.items()}
    for key, value in values.items():
        dest = dests.get(key, key)
        try:
            namespace[dest] = _config_value(actions[dest], value)
        except argparse.ArgumentTypeError as error:
            raise ValueError(f"{caller}: {key}={value!r}: {error}") from None
    return argparse.Namespace(**namespace)


def _by_dest(values: dict[str, Any], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """A config file's options keyed by dest: a key may also be any of an option's flags
    (optimizer_steps or steps for --optimizer-steps/--steps, dest steps); ValueError when two
    keys name the same option."""
    dests = _flag_dests(parser)
    by_dest: dict[str, Any] = {}
    named: dict[str, str] = {}
    for key, value in values.items():
        dest = dests.get(key, key)
        if dest in by_dest:
            raise ValueError(f"{named[dest]} and {key} name the same option ({dest})")
        by_dest[dest], named[dest] = value, key
    return by_dest


def _flag_dests(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each long flag as a key (optimizer_steps for --optimizer-steps) -> its option's dest."""
    return {flag[2:].replace("-", "_"): action.dest for action in parser._actions
            for flag in action.option_strings if flag.startswith("--")}


def _config_value(action: argparse.Action, value: Any) -> Any:
    """A config file's value as the flag would give it, or ArgumentTypeError."""
    if action.nargs == 0:  # store_true / store_false: the file says true or false
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
        return value
    if value is None and action.default is None:  # "t_max: null" = the option's default
        return None
    convert: Callable[[Any], Any] = action.type or text
    try:
        converted = convert(value)
    except (TypeError, ValueError) as error:  # a plain type such as int (ArgumentTypeError passes)
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: {error}") from None
    if action.choices is not None and converted not in action.choices:
        raise argparse.ArgumentTypeError(
            f"invalid choice {value!r} (choose from {', '.join(map(str, action.choices))})"
        )
    return converted


def _flag(action: argparse.Action) -> str:
    """The option's flags as argparse names them ("--optimizer-steps/--steps")."""
    longs = [option for option in action.option_strings if option.startswith("--")]
    return "/".join(longs or action.option_strings or [action.dest])


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Options from YAML or JSON; keys may use dashes or underscores. ValueError naming the file
    when it is empty, not valid YAML/JSON, or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    read = read_json if path.suffix == ".json" else read_yaml
    values = read(path, "config file", expect=None)
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values, "
                         f"got {type(values).__name__}")
    if not all(isinstance(key, str) for key in values):
        raise ValueError(f"config file {path}: option names must be strings, got "
                         f"{[key for key in values if not isinstance(key, str)]}")
    return {key.replace("-", "_"): value for key, value in values.items()}


def defining_options(args: argparse.Namespace | dict[str, Any]) -> dict[str, Any]:
    """The options that define what a run computes, as JSON values (tuples become lists)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    kept = {key: value for key, value in values.items() if key not in NOT_DEFINING}
    return json.loads(json.dumps(kept, default=str))


def option_differences(
    saved: dict[str, Any], current: dict[str, Any], ignore: frozenset[str] = frozenset()
) -> list[str]:
    """One line per defining option that differs: '--seed: 0 in the checkpoint, 1 now'.
    An option only one side knows (one added or removed by another version) is not compared,
    nor are the options in `ignore`."""
    saved, current = defining_options(saved), defining_options(current)
    return [
        f"--{key.replace('_', '-')}: {saved[key]!r} in the checkpoint, {current[key]!r} now"
        for key in sorted(set(saved) & set(current) - ignore) if saved[key] != current[key]
    ]
