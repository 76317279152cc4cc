"""RobustBench's `benchmark` call, run with purifyguard's protocol on a purifyguard model.

    from purifyguard.adapters.robustbench import benchmark, load_robustbench_model

    clean, robust = benchmark(model, dataset="fashion-mnist", threat_model="Linf")
    clean, robust, report = benchmark(model, ..., return_report=True)
    classifier = load_robustbench_model("robustbench:cifar10/Linf/Zhang2019Theoretically")

`benchmark` returns what RobustBench's does, (clean accuracy, robust accuracy), and takes
`device=` as it does. RobustBench's runs AutoAttack on a deterministic model. A purifier is
randomised, so this one runs purifyguard's own protocol (docs/evaluation.md, "The
protocol") instead: full-gradient APGD-EOT and PGD-EOT, AutoAttack rand, BPDA-EOT, transfer and
Square, each adversarial example judged by R independent purifications. The robust accuracy
returned is the lowest over the attacks; the report (return_report=True) holds every attack's
figures, intervals and settings.

Loading a RobustBench model-zoo entry (`load_robustbench_model` and the names around it) lives
in purifyguard.adapters.robustbench_zoo, and finding the real robustbench package in
purifyguard.adapters.robustbench_package; both are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

# Re-exported: the robustbench package (robustbench_package) and its model zoo (robustbench_zoo).
from purifyguard.adapters.robustbench_package import (  # noqa: F401
    INSTALL_ROBUSTBENCH,
    ROBUSTBENCH_TESTED,
    RobustBenchModules,
    robustbench_modules,
)
from purifyguard.adapters.robustbench_zoo import (  # noqa: F401
    DATASETS,
    DERIVED_FORMAT,
    ROBUSTBENCH_PREFIX,
    THREAT_MODELS,
    RobustBenchName,
    default_model_dir,
    load_robustbench_model,
    parse_robustbench_name,
)
from purifyguard.evaluation.attacks import (
    REFERENCE_EOT,
    REFERENCE_SQUARE_QUERIES,
    REFERENCE_STEPS,
    AttackSpec,
    default_attacks,
    parse_attack,
)
from purifyguard.evaluation.harness import evaluate
from purifyguard.validation import check_bool

# The protocol's budgets per data set and threat model (docs/evaluation.md; CIFAR-100 as in
# RobustBench, the same as CIFAR-10).
EPSILONS = {
    ("fashion-mnist", "linf"): 0.1,
    ("fashion-mnist", "l2"): 1.5,
    ("cifar10", "linf"): 8 / 255,
    ("cifar10", "l2"): 0.5,
    ("cifar100", "linf"): 8 / 255,
    ("cifar100", "l2"): 0.5,
}
# docs/evaluation.md: step 0.007 for L-inf 8/255 (eps / 4 otherwise) for the PGD-type attacks.
_STEP_AT_8_255 = 0.007
_PGD_KINDS = ("pgd", "bpda", "transfer")
_BUNDLED_TEST_IMAGES = 512
STATISTICS = ("mean", "worst_case")


class BenchmarkResult(NamedTuple):
    """What benchmark(..., return_report=True) returns: clean_accuracy and robust_accuracy as
    fractions in [0, 1], and the full report."""

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
    runs: int = 10,
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
    device: str | torch.device | None = None,
    return_report: bool = False,
) -> tuple[float, float] | BenchmarkResult:
    """Clean and robust accuracy of `model` (images in [0, 1] -> logits, e.g. a PurifiedModel)
    on n_examples test images, under the protocol's attacks.

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
    device: where the model and images go ("cpu", "cuda:0", a torch.device), as RobustBench's
        `device`; None takes accelerate's device (the GPU when there is one; RobustBench's
        default is the CPU).
    Returns (clean_accuracy, robust_accuracy) as RobustBench's benchmark does; robust_accuracy is
    the lowest over the attacks. return_report=True returns a BenchmarkResult (clean_accuracy,
    robust_accuracy, report) instead, whose report (docs/evaluation.md) says which attack
    reached it; the report is also written to output_dir when one is given.
    """
    check_bool("return_report", return_report)
    norm = _norm(threat_model)
    dataset = str(getattr(dataset, "value", dataset)).lower().replace("_", "-")
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
        progress=progress, device=device,
    )
    records = [r for r in report["records"] if r["model"] == model_name]
    clean = records[0]["clean_accuracy"][statistic]
    robust = min(r["robust_accuracy"][statistic] for r in records)
    if return_report:
        return BenchmarkResult(clean, robust, report)
    return clean, robust


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
