"""Robustness evaluation: attacks, R-run verdicts, resumable batches, sanity checks, reports.

    from purifyguard import evaluate
    report = evaluate(model, dataset, ["pgd:eps=0.1,steps=200,eot=20"], n=512, runs=5,
                      output_dir="runs/eval")
"""

from purifyguard.evaluation.attacks import AttackSpec, default_attacks, parse_attack
from purifyguard.evaluation.compare import build_defences, compare
from purifyguard.evaluation.harness import OutputFolderInUse, evaluate, evaluate_models
from purifyguard.evaluation.report import markdown_table, validate_report
from purifyguard.evaluation.sanity import run_sanity_checks
from purifyguard.evaluation.stats import wilson_interval

__all__ = [
    "AttackSpec",
    "OutputFolderInUse",
    "build_defences",
    "compare",
    "default_attacks",
    "evaluate",
    "evaluate_models",
    "markdown_table",
    "parse_attack",
    "run_sanity_checks",
    "validate_report",
    "wilson_interval",
]
