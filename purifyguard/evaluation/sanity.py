"""Sanity checks for a robustness number (Carlini et al. 2019, "On Evaluating Adversarial
Robustness"). A failure means the attack, not the defence, is the likely reason for a high
number; the report flags it and never drops it.

1. eps sweep: robust accuracy is non-increasing in eps, and an (almost) unbounded attack brings
   it to about 0.
2. steps: doubling the attack's steps never raises robust accuracy beyond noise.
3. full gradient <= BPDA: the exact gradient is at least as strong as its approximation.
4. gradients exist: the input gradient of the loss is not zero for most examples (a zero
   gradient is the signature of gradient masking, e.g. a model that rounds its input).

"Beyond noise" is stats.difference_tolerance: 1.96 standard errors of a difference of two
accuracies on n examples, and at least one example.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from purifyguard.evaluation.arguments import (
    check_attack_list,
    check_data,
    check_examples,
    check_model,
    check_output_dir,
)
from purifyguard.evaluation.attacks import AttackSpec, parse_attack
from purifyguard.evaluation.pgd import eot_gradient
from purifyguard.evaluation.seeds import derive_seed, seed_everything
from purifyguard.evaluation.stats import difference_tolerance
from purifyguard.validation import check_bool, check_int, check_number

NEAR_ZERO = 0.05  # robust accuracy allowed under an unbounded attack
MAX_ZERO_GRADIENT_FRACTION = 0.5


def run_sanity_checks(
    model: nn.Module, data: tuple[torch.Tensor, torch.Tensor] | Dataset,
    attacks: Sequence[AttackSpec | str] | None, *,
    n: int = 64, batch_size: int = 64, runs: int = 5, seed: int = 0,
    undefended: nn.Module | None = None, output_dir: str | Path | None = None,
    resume: bool = True, large_eps: float | None = None, progress: bool = True,
) -> list[dict[str, Any]]:
    """Run the checks with the first gradient attack in `attacks` as the base (default: PGD at
    the default setting); a list of {"check", "passed", "message", "values"}. Arguments are
    checked first, as for evaluate."""
    from purifyguard.evaluation.harness import evaluate, select_examples

    check_model("model", model)
    check_data(data)
    attacks = check_attack_list(attacks, parse_attack, AttackSpec) or []
    n = check_int("n", n, 1)
    check_int("batch_size", batch_size, 1)
    check_int("runs", runs, 1)
    check_int("seed", seed)
    check_model("undefended", undefended, optional=True)
    check_output_dir(output_dir)
    check_bool("resume", resume)
    check_bool("progress", progress)
    if large_eps is not None:
        large_eps = check_number("large_eps", large_eps, positive=True)
    base = next((a for a in attacks if a.kind in ("pgd", "bpda")), None) or AttackSpec("pgd")
    # Full gradients, step eps / 4 at every eps of the sweep.
    base = base.replace(kind="pgd", gradient="full", step_size=None)
    images, labels = select_examples(data, n)
    images = check_examples(images, labels, None)
    large = large_eps or (1.0 if base.norm == "linf" else float(images[0].numel()) ** 0.5)
    sweep = sorted({0.0, base.eps / 2, base.eps, 2 * base.eps, large})
    more_steps = max(2 * base.steps, 2)
    defended = getattr(model, "purifier", None) is not None
    specs = [
        base.replace(name=f"sanity-eps={eps:g}", eps=eps, steps=base.steps if eps else 0)
        for eps in sweep
    ]
    specs.append(base.replace(name=f"sanity-steps={more_steps}", steps=more_steps))
    if defended:
        specs.append(base.replace(name="sanity-bpda", kind="bpda"))
    report = evaluate(
        model, (images, labels), specs, n=n, batch_size=batch_size, runs=runs, seed=seed,
        output_dir=output_dir, resume=resume, model_name="sanity", undefended=undefended,
        progress=progress,
    )
    robust = {r["attack"]["name"]: r["robust_accuracy"]["mean"] for r in report["records"]}
    count = report["settings"]["n"]
    accuracies = [robust[s.label] for s in specs[: len(sweep)]]
    checks = [
        _eps_monotone(sweep, accuracies, count),
        _unbounded(sweep[-1], accuracies[-1]),
        _more_steps(base.steps, more_steps, robust[f"sanity-eps={base.eps:g}"],
                    robust[f"sanity-steps={more_steps}"], count),
    ]
    if defended:
        checks.append(_full_below_bpda(robust[f"sanity-eps={base.eps:g}"], robust["sanity-bpda"],
                                       count))
    checks.append(_gradients_exist(model, images, labels, derive_seed(seed, "sanity-gradient")))
    return checks


def _eps_monotone(sweep: list[float], accuracies: list[float], n: int) -> dict[str, Any]:
    rises = [
        (sweep[i], sweep[i + 1]) for i in range(len(sweep) - 1)
        if accuracies[i + 1] > accuracies[i] + difference_tolerance(accuracies[i], n)
    ]
    return _check(
        "robust accuracy non-increasing in eps", not rises,
        "no rise beyond noise" if not rises else f"accuracy rises between eps pairs {rises}",
        {"eps": sweep, "robust_accuracy": accuracies},
    )


def _unbounded(eps: float, accuracy: float) -> dict[str, Any]:
    return _check(
        "unbounded attack succeeds", accuracy <= NEAR_ZERO,
        f"robust accuracy {accuracy:.3f} at eps={eps:g} (must be <= {NEAR_ZERO})",
        {"eps": eps, "robust_accuracy": accuracy, "threshold": NEAR_ZERO},
    )


def _more_steps(steps: int, more: int, accuracy: float, accuracy_more: float, n: int) -> dict:
    tolerance = difference_tolerance(accuracy, n)
    return _check(
        "more steps never raise robust accuracy", accuracy_more <= accuracy + tolerance,
        f"{accuracy:.3f} at {steps} steps, {accuracy_more:.3f} at {more} steps "
        f"(tolerance {tolerance:.3f})",
        {"steps": [steps, more], "robust_accuracy": [accuracy, accuracy_more],
         "tolerance": tolerance},
    )


def _full_below_bpda(full: float, bpda: float, n: int) -> dict[str, Any]:
    tolerance = difference_tolerance(bpda, n)
    return _check(
        "full gradient <= BPDA", full <= bpda + tolerance,
        f"full gradient {full:.3f}, BPDA {bpda:.3f} (tolerance {tolerance:.3f})",
        {"full": full, "bpda": bpda, "tolerance": tolerance},
    )


def _gradients_exist(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int
) -> dict[str, Any]:
    seed_everything(seed)
    device = next((p.device for p in model.parameters()), images.device)
    gradient = eot_gradient(model, images.to(device), labels.to(device))
    zero = float((gradient.flatten(1).abs().amax(1) == 0).float().mean())
    return _check(
        "input gradients are non-zero", zero <= MAX_ZERO_GRADIENT_FRACTION,
        f"{100 * zero:.0f}% of examples have an exactly zero input gradient "
        f"(gradient masking if above {100 * MAX_ZERO_GRADIENT_FRACTION:.0f}%)",
        {"zero_gradient_fraction": zero},
    )


def _check(name: str, passed: bool, message: str, values: dict[str, Any]) -> dict[str, Any]:
    return {"check": name, "passed": bool(passed), "message": message, "values": values}
