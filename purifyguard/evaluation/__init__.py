"""Robustness evaluation: attacks, R-run verdicts, resumable batches, sanity checks, reports.

    from purifyguard import evaluate
    report = evaluate(model, dataset, ["pgd:eps=0.1,steps=200,eot=20"], n=512, runs=10,
                      output_dir="runs/eval")

The names below load on first use (PEP 562), so that the command line (purifyguard.evaluation.cli)
builds its options without importing torch, torchattacks or diffusers.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "Attack": "purifyguard.evaluation.attack_registry",
    "AttackSpec": "purifyguard.evaluation.attacks",
    "OutputFolderInUse": "purifyguard.evaluation.harness",
    "build_defences": "purifyguard.evaluation.compare",
    "compare": "purifyguard.evaluation.compare",
    "default_attacks": "purifyguard.evaluation.attacks",
    "evaluate": "purifyguard.evaluation.harness",
    "evaluate_models": "purifyguard.evaluation.harness",
    "headline": "purifyguard.evaluation.headline",
    "headline_markdown": "purifyguard.evaluation.headline",
    "markdown_table": "purifyguard.evaluation.report",
    "merge_outputs": "purifyguard.evaluation.merge",
    "parse_attack": "purifyguard.evaluation.attacks",
    "register_attack": "purifyguard.evaluation.attack_registry",
    "registered_attacks": "purifyguard.evaluation.attack_registry",
    "run_sanity_checks": "purifyguard.evaluation.harness",
    "validate_report": "purifyguard.evaluation.report",
    "wilson_interval": "purifyguard.evaluation.stats",
}

__all__ = [
    "Attack",
    "AttackSpec",
    "OutputFolderInUse",
    "build_defences",
    "compare",
    "default_attacks",
    "evaluate",
    "evaluate_models",
    "headline",
    "headline_markdown",
    "markdown_table",
    "merge_outputs",
    "parse_attack",
    "register_attack",
    "registered_attacks",
    "run_sanity_checks",
    "validate_report",
    "wilson_interval",
]

if TYPE_CHECKING:  # what type checkers, IDEs and the API docs see
    from purifyguard.evaluation.attack_registry import Attack, register_attack, registered_attacks
    from purifyguard.evaluation.attacks import AttackSpec, default_attacks, parse_attack
    from purifyguard.evaluation.compare import build_defences, compare
    from purifyguard.evaluation.harness import (
        OutputFolderInUse,
        evaluate,
        evaluate_models,
        run_sanity_checks,
    )
    from purifyguard.evaluation.headline import headline, headline_markdown
    from purifyguard.evaluation.merge import merge_outputs
    from purifyguard.evaluation.report import markdown_table, validate_report
    from purifyguard.evaluation.stats import wilson_interval


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'purifyguard.evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`purifyguard.evaluation.compare` is the function, as it was when this package imported
    everything at once: importing the submodule of the same name would otherwise make the
    attribute the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
