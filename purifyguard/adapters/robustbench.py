"""A RobustBench-style entry point: `benchmark(model, ...)` -> (clean accuracy, robust accuracy).

    from purifyguard.adapters.robustbench import benchmark
    clean, robust, report = benchmark(model, dataset="fashion-mnist", threat_model="Linf")

RobustBench's `benchmark` runs AutoAttack on a deterministic model. A purifier is randomised, so
this one runs purifyguard's own protocol (shared/METHOD.md section 5, docs/evaluation.md)
instead: full-gradient PGD-EOT, AutoAttack rand, BPDA-EOT, transfer and Square, each
adversarial example judged by R independent purifications. The robust accuracy returned is the
lowest over the attacks; the report holds every attack's figures, intervals and settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from purifyguard.evaluation.attacks import (
    REFERENCE_EOT,
    REFERENCE_SQUARE_QUERIES,
    REFERENCE_STEPS,
    AttackSpec,
    default_attacks,
    parse_attack,
)
from purifyguard.evaluation.harness import evaluate

# The protocol's budgets per data set and threat model (METHOD.md section 5; CIFAR-100 as in
# RobustBench, the same as CIFAR-10).
EPSILONS = {
    ("fashion-mnist", "linf"): 0.1,
    ("fashion-mnist", "l2"): 1.5,
    ("cifar10", "linf"): 8 / 255,
    ("cifar10", "l2"): 0.5,
    ("cifar100", "linf"): 8 / 255,
    ("cifar100", "l2"): 0.5,
}
# METHOD.md: step 0.007 for L-inf 8/255 (eps / 4 otherwise) for the PGD-type attacks.
_STEP_AT_8_255 = 0.007
_PGD_KINDS = ("pgd", "bpda", "transfer")
_BUNDLED_TEST_IMAGES = 512
STATISTICS = ("mean", "worst_case")


class BenchmarkResult(NamedTuple):
    """clean_accuracy and robust_accuracy as fractions in [0, 1], and the full report."""

    clean_accuracy: float
    robust_accuracy: float
    report: dict[str, Any]


def benchmark(
    model: nn.Module,
    dataset: str = "fashion-mnist",
    threat_model: str = "Linf",
    n_examples: int = 512,
    eps: float | None = None,
    data_dir: str | Path | None = None,
    batch_size: int = 64,
    runs: int = 5,
    seed: int = 0,
    steps: int = REFERENCE_STEPS,
    eot: int = REFERENCE_EOT,
    n_queries: int = REFERENCE_SQUARE_QUERIES,
    output_dir: str | Path | None = None,
    *,
    attacks: Sequence[AttackSpec | str] | None = None,
    statistic: str = "mean",
    sanity: bool = False,
    progress: bool = True,
    model_name: str = "model",
) -> BenchmarkResult:
    """Clean and robust accuracy of `model` (images in [0, 1] -> logits, e.g. a PurifiedModel)
    on the first n_examples test images, under the protocol's attacks.

    dataset: "fashion-mnist", "cifar10" or "cifar100", read from data_dir (see
        purifyguard.data.load_dataset); Fashion-MNIST with no data_dir and n_examples <= 512
        uses the test images bundled in the package (the first 512 of the test set).
    threat_model: "Linf" or "L2" (RobustBench's names; its ThreatModel enum works too).
    eps: None takes the protocol's budget for the data set and threat model (EPSILONS).
    steps, eot, n_queries: attack iterations, EOT samples and Square queries; the defaults are
        the protocol's reference, smaller values are marked reduced in the report.
    attacks: other attacks instead of the protocol's set (AttackSpec objects or strings).
    statistic: "mean" (accuracy averaged over the R runs) or "worst_case" (an example counts
        only if all R runs are right), for the two figures returned.
    Returns (clean_accuracy, robust_accuracy, report); robust_accuracy is the lowest over the
    attacks, and the report (see docs/evaluation.md) says which attack reached it.
    """
    norm = _norm(threat_model)
    dataset = dataset.lower().replace("_", "-")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if eps is None:
        if (dataset, norm) not in EPSILONS:
            raise ValueError(
                f"no protocol budget for {dataset} {threat_model}: pass eps (known: "
                f"{sorted({d for d, _ in EPSILONS})})"
            )
        eps = EPSILONS[dataset, norm]
    if attacks is None:
        specs = default_attacks(norm, eps, steps, eot, n_queries)
        if norm == "linf" and abs(eps - 8 / 255) < 1e-9:
            specs = [s.replace(step_size=_STEP_AT_8_255) if s.kind in _PGD_KINDS else s
                     for s in specs]
    else:
        specs = [parse_attack(a) if isinstance(a, str) else a for a in attacks]
    data, class_names = _test_data(dataset, data_dir, n_examples)
    report = evaluate(
        model, data, specs, n=n_examples, batch_size=batch_size, runs=runs, seed=seed,
        output_dir=output_dir, model_name=model_name, sanity=sanity, class_names=class_names,
        progress=progress,
    )
    records = [r for r in report["records"] if r["model"] == model_name]
    clean = records[0]["clean_accuracy"][statistic]
    robust = min(r["robust_accuracy"][statistic] for r in records)
    return BenchmarkResult(clean, robust, report)


def _norm(threat_model: Any) -> str:
    name = str(getattr(threat_model, "value", threat_model)).lower()
    if name not in ("linf", "l2"):
        raise ValueError(
            f"threat_model must be 'Linf' or 'L2', got {threat_model!r} (corruptions are not "
            "an adversarial threat model and are not supported)"
        )
    return name


def _test_data(dataset: str, data_dir: str | Path | None, n_examples: int):
    """The test split, as a Dataset or an (images, labels) pair, and its class names."""
    if dataset == "fashion-mnist" and data_dir is None and n_examples <= _BUNDLED_TEST_IMAGES:
        from purifyguard.presets import bundled_test_images

        images, labels, classes = bundled_test_images()
        return (images, labels), classes
    from purifyguard.data import load_dataset

    data = load_dataset(dataset, root=data_dir, train=False)
    return data, getattr(data, "classes", None)
