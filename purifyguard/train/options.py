"""Command-line options shared by the training routines, and config files standing in for flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every routine has: data, optimisation, precision, seed, checkpoints, logging."""
    parser.add_argument("--config", help="YAML or JSON file of options; flags given too win")
    parser.add_argument("--data", default="fashion-mnist",
                        help="fashion-mnist, cifar10, cifar100 or imagefolder")
    parser.add_argument("--data-root", help="data folder (for Fashion-MNIST: the IDX files)")
    parser.add_argument("--output-dir", default="runs/train", help="checkpoints, logs, export")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps in all")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=200, help="steps")
    parser.add_argument("--keep-checkpoints", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10, help="steps")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse flags; a --config file supplies defaults that explicit flags override."""
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config")
    first, _ = config_only.parse_known_args(argv)
    if first.config:
        values = load_config_file(first.config)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"unknown options in {first.config}: {unknown}")
        parser.set_defaults(**values)
        for action in parser._actions:  # a required option the file supplies is supplied
            if action.dest in values:
                action.required = False
    return parser.parse_args(argv)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Options from YAML or JSON; keys may use dashes or underscores."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values")
    return {key.replace("-", "_"): value for key, value in values.items()}


def int_list(text: str) -> tuple[int, ...]:
    """'32,64,64' -> (32, 64, 64)."""
    return tuple(int(part) for part in str(text).split(",") if part)
