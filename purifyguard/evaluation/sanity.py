"""Sanity checks for a robustness number (Carlini et al. 2019, "On Evaluating Adversarial
Robustness"). A failure means the attack, not the defence, is the likely reason for a high
number; the report flags it and never drops it.

1. eps sweep: robust accuracy is non-increasing in eps, and an (almost) unbounded attack brings
   it to about 0.
2. steps: doubling the attack's steps never raises robust accuracy beyond noise.
3. full gradient <= BPDA: the exact gradient is at least as strong as its approximation.
4. gradients exist: the input gradient of the loss is not zero for most examples (a zero
   gradient is the signature of gradient masking, e.g. a model that rounds its input).
5. gradients are right: with the noise fixed, in float64, autograd's directional derivatives
   match finite differences at several steps (gradient_check.py): tells a flat/quantised model,
   a shattered gradient (finite differences disagree across steps: recommend the smooth
   substitute) and a detached / substitute backward (they agree, autograd does not) apart;
   check 4 misses the last two, whose gradient is wrong but not zero.
6. convergence (convergence_check, also run on every record's curve by the report): within a
   restart, robust accuracy on the crafting draws at the last iteration does not exceed its
   lowest earlier value beyond noise.

The attacks are the run's own first gradient attack, at its kind and budget (sanity_base),
so that the checks cost a few attacks of that budget, not the reference PGD at every eps.

"Beyond noise" is stats.difference_tolerance: 1.96 standard errors of a difference of two
accuracies on n examples, and at least one example.

save_eps_sweep_plot draws check 1 as a PNG (robust accuracy against eps, the attack named);
evaluate(..., sanity=True, output_dir=...) writes it as eps-sweep-<model>.png beside the grids.

The public entry, run_sanity_checks, is in harness.py (purifyguard.evaluation.run_sanity_checks):
it checks the arguments and runs sanity_checks below with the harness's own evaluate function,
so that this module never imports the harness.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from purifyguard.evaluation.arguments import check_examples
from purifyguard.evaluation.attack_registry import ATTACKS
from purifyguard.evaluation.attacks import AttackSpec
from purifyguard.evaluation.example_selection import select_examples
from purifyguard.evaluation.gradient_check import run_gradient_check
from purifyguard.evaluation.pgd import eot_gradient
from purifyguard.evaluation.seeds import derive_seed, seed_everything
from purifyguard.evaluation.stats import difference_tolerance
from purifyguard.evaluation.store import CLEAN
from purifyguard.files import write_figure

NEAR_ZERO = 0.05  # robust accuracy allowed under an unbounded attack
MAX_ZERO_GRADIENT_FRACTION = 0.5
EPS_SWEEP_CHECK = "robust accuracy non-increasing in eps"
CONVERGENCE_CHECK = "more steps never raise robust accuracy (convergence curve)"
GRADIENT_CHECK_IMAGES = 8
_CLEAN_POINT = CLEAN  # the sweep's eps = 0 point: no attack name may be "clean"

EvaluateFunction = Callable[..., dict[str, Any]]


def sanity_checks(
    model: nn.Module, data: tuple[torch.Tensor, torch.Tensor] | Dataset,
    attacks: list[AttackSpec], *, evaluate: EvaluateFunction, n: int, batch_size: int,
    runs: int, seed: int, undefended: nn.Module | None, output_dir: str | Path | None,
    resume: bool, large_eps: float | None, progress: bool, device: str | torch.device | None,
) -> list[dict[str, Any]]:
    """The checks of harness.run_sanity_checks, on arguments it (or evaluate) has checked.

    evaluate: the function that runs the checks' attacks, called as harness.evaluate is
    (model, (images, labels), specs, n=, batch_size=, runs=, seed=, output_dir=, resume=,
    model_name="sanity", undefended=, progress=, device=) and returning its report; the harness
    hands in its own, which does not check the model again. Taking it as an argument keeps this
    module (and report.py, which reads convergence_check from it) from importing the harness."""
    base = sanity_base(attacks)
    images, labels = select_examples(data, n, seed)
    images = check_examples(images, labels, None)
    large = large_eps or (1.0 if base.norm == "linf" else float(images[0].numel()) ** 0.5)
    # Capped at the unbounded point (an L-inf eps above 1 allows nothing more than 1 does).
    sweep = sorted({min(eps, large) for eps in (0.0, base.eps / 2, base.eps, 2 * base.eps,
                                                large)})
    more_steps = max(2 * base.steps, 2)
    defended = getattr(model, "purifier", None) is not None
    # eps = 0 is the clean accuracy (every record has it): no attack runs there.
    specs = [_at_eps(base, eps) for eps in sweep if eps > 0]
    specs.append(base.replace(name=f"sanity-steps={more_steps}", steps=more_steps))
    if defended:
        specs.append(_as_kind(base, "bpda", name="sanity-bpda"))
    report = evaluate(
        model, (images, labels), specs, n=n, batch_size=batch_size, runs=runs, seed=seed,
        output_dir=output_dir, resume=resume, model_name="sanity", undefended=undefended,
        progress=progress, device=device, eot_check=0,  # measured by the evaluation itself
    )
    records = report["records"]
    robust = {r["attack"]["name"]: r["robust_accuracy"]["mean"] for r in records}
    intervals = {r["attack"]["name"]: r["robust_accuracy"]["ci95_mean"] for r in records}
    robust[_CLEAN_POINT] = records[0]["clean_accuracy"]["mean"]
    intervals[_CLEAN_POINT] = records[0]["clean_accuracy"]["ci95_mean"]
    count = report["settings"]["n"]
    points = [_at_eps(base, eps).label if eps > 0 else _CLEAN_POINT for eps in sweep]
    accuracies = [robust[point] for point in points]
    sweep_check = _eps_monotone(sweep, accuracies, count)
    sweep_check["values"].update({
        "ci95": [intervals[point] for point in points], "n": count, "runs": runs,
        "attack": describe_attack(base), "attack_settings": base.to_dict(),
    })
    checks = [
        sweep_check,
        _unbounded(sweep[-1], accuracies[-1]),
        _more_steps(base.steps, more_steps, robust[f"sanity-eps={base.eps:g}"],
                    robust[f"sanity-steps={more_steps}"], count),
    ]
    if defended:
        checks.append(_full_below_bpda(robust[f"sanity-eps={base.eps:g}"], robust["sanity-bpda"],
                                       count, base.gradient_mode))
    checks.append(_gradients_exist(model, images, labels, derive_seed(seed, "sanity-gradient")))
    # The model was checked by the entry point (run_sanity_checks or evaluate): not again.
    checks.append(run_gradient_check(
        model, images[:GRADIENT_CHECK_IMAGES].to(_device(model, images)),
        seed=derive_seed(seed, "sanity-finite-differences")))
    base_record = next(r for r in report["records"]
                       if r["attack"]["name"] == f"sanity-eps={base.eps:g}")
    if base_record["convergence"] is not None:
        checks.append({"check": CONVERGENCE_CHECK, **{
            k: v for k, v in base_record["convergence"]["check"].items() if k != "check"}})
    return checks


def sanity_base(attacks: Sequence[AttackSpec]) -> AttackSpec:
    """The attack the checks run: the first gradient attack of the run (white-box or BPDA
    access) with eps > 0, at its own kind and budget (steps, EOT, restarts...), so that the
    checks cost what the attack costs. A BPDA attack becomes PGD with the same budget (check 4
    compares against BPDA). Without a gradient attack: PGD at its default (reference) setting.
    The step size follows eps across the sweep (sanity-eps=...: the kind's default, or the
    attack's own step_size / eps ratio)."""
    given = next((a for a in attacks
                  if a.attack.access in ("white-box", "bpda") and a.eps > 0), None)
    if given is None:
        return AttackSpec("pgd")
    if given.attack.access == "bpda":
        return _as_kind(given, "pgd")
    return given


def convergence_check(curve: dict[str, Any], n: int) -> dict[str, Any]:
    """"More steps never raise it", read off a convergence curve (convergence.py): within each
    restart, robust accuracy at its last iteration may not exceed the lowest value at an earlier
    iteration of that restart by more than noise (stats.difference_tolerance on n examples).
    A restart begins at a new random point, so restarts are judged apart."""
    accuracy, starts = curve["robust_accuracy"], list(curve["restart_starts"]) or [0]
    rises = []
    for number, (start, end) in enumerate(zip(starts, [*starts[1:], len(accuracy)])):
        if end - start < 2:
            continue
        lowest = min(accuracy[start:end - 1])
        at = start + accuracy[start:end - 1].index(lowest)
        tolerance = difference_tolerance(lowest, n)
        if accuracy[end - 1] > lowest + tolerance:
            rises.append(f"restart {number}: {accuracy[end - 1]:.3f} at its last iteration "
                         f"{end}, {lowest:.3f} at iteration {at + 1} (tolerance {tolerance:.3f})")
    if rises:
        message = ("robust accuracy on the crafting draws rose with more steps (" +
                   "; ".join(rises) + "): the step size is too large for the end of the attack, "
                   "or its gradient does not lead anywhere; the last iterate is not the attack's "
                   "best")
    else:
        message = (f"no rise beyond noise: {accuracy[-1]:.3f} at the last of {len(accuracy)} "
                   f"iterations, lowest {min(accuracy):.3f}")
    return _check(CONVERGENCE_CHECK, not rises, message,
                  {"robust_accuracy_last": accuracy[-1], "robust_accuracy_lowest": min(accuracy),
                   "n": n})


def _at_eps(base: AttackSpec, eps: float) -> AttackSpec:
    """The base attack at `eps`, its step size scaled with eps (the sweep's spec)."""
    step = None if base.step_size is None else base.step_size * eps / base.eps
    return base.replace(name=f"sanity-eps={eps:g}", eps=eps, step_size=step)


def _as_kind(spec: AttackSpec, kind: str, **changes: Any) -> AttackSpec:
    """An attack of another kind with the same norm, eps and budget (steps, EOT); the settings
    of the original kind alone (APGD's restarts, graft...) are left at the new kind's default,
    and a step size only carries over between kinds with the same default step."""
    same_step = ATTACKS[kind].default_step == spec.attack.default_step
    settings = {"kind": kind, "name": kind, "norm": spec.norm, "eps": spec.eps,
                "steps": spec.steps, "eot": spec.eot, "random_start": spec.random_start,
                "checkpointing": spec.checkpointing,
                "step_size": spec.step_size if same_step else None}
    if kind != "bpda":
        settings.update(gradient=spec.gradient, surrogate_sampler=spec.surrogate_sampler,
                        surrogate_steps=spec.surrogate_steps)
    return AttackSpec(**{**settings, **changes})


def _device(model: nn.Module, images: torch.Tensor) -> torch.device:
    return next((p.device for p in model.parameters()), images.device)


def describe_attack(spec: AttackSpec) -> str:
    """A one-line name of the sweep's attack, for the plot and the report."""
    name = {"pgd": "PGD", "bpda": "BPDA", "apgd-eot": "APGD"}.get(spec.kind, spec.kind)
    eot = f"-EOT{spec.eot}" if spec.eot > 1 else ""
    norm = "L-inf" if spec.norm == "linf" else "L2"
    fraction = spec.alpha / spec.eps if spec.eps else spec.attack.default_step
    whole = round(1 / fraction)
    step = f"eps/{whole}" if abs(1 / fraction - whole) < 1e-6 else f"{fraction:.3g} eps"
    step = "eps" if step == "eps/1" else step
    initial = "initial " if spec.kind == "apgd-eot" else ""
    return (f"{name}{eot}, {spec.gradient_mode} gradient, {norm}, {spec.steps} steps, "
            f"{initial}step {step}" + (", random start" if spec.random_start else ""))


def save_eps_sweep_plot(
    checks: Sequence[dict[str, Any]], path: str | Path, *, title: str | None = None
) -> Path | None:
    """Robust accuracy against eps from the eps-sweep check in `checks` (eps_sweep_figure), as a
    PNG at `path`; None (and no file) when `checks` holds no eps sweep."""
    figure = eps_sweep_figure(checks, title=title)
    if figure is None:
        return None
    return write_figure(figure, path)


def eps_sweep_figure(checks: Sequence[dict[str, Any]], *, title: str | None = None):
    """The eps sweep as a matplotlib Figure: robust accuracy (mean over the R runs, 95% Wilson
    intervals) against eps, axes labelled, the attack named in the title. eps = 0 is the clean
    accuracy and the last point the (almost) unbounded attack, which should reach about 0.
    None when `checks` holds no eps sweep."""
    sweep = next((c for c in checks if c.get("check") == EPS_SWEEP_CHECK), None)
    if sweep is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = sweep["values"]
    eps, accuracy = values["eps"], values["robust_accuracy"]
    settings = values.get("attack_settings", {})
    norm = "L-inf" if settings.get("norm", "linf") == "linf" else "L2"
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    if "ci95" in values:
        low = [max(a - lo, 0.0) for a, (lo, _) in zip(accuracy, values["ci95"])]
        high = [max(hi - a, 0.0) for a, (_, hi) in zip(accuracy, values["ci95"])]
        axis.errorbar(eps, accuracy, yerr=[low, high], marker="o", capsize=3,
                      label="robust accuracy [95% CI]")
    else:
        axis.plot(eps, accuracy, marker="o", label="robust accuracy")
    axis.axhline(NEAR_ZERO, color="grey", linestyle=":", linewidth=1,
                 label=f"the unbounded attack must reach <= {NEAR_ZERO}")
    axis.set_xlabel(f"eps ({norm} budget of the attack)")
    axis.set_ylabel("robust accuracy (mean over runs)")
    axis.set_ylim(-0.02, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper right")
    attack = values.get("attack", "attack not recorded")
    counts = f"n={values['n']}, R={values['runs']}, " if "n" in values else ""
    verdict = "passed" if sweep["passed"] else "FAILED"
    heading = title or "Sanity check: robust accuracy against eps"
    axis.set_title(f"{heading}\n{attack}\n{counts}non-increasing check {verdict}", fontsize=8)
    figure.tight_layout()
    return figure


def _eps_monotone(sweep: list[float], accuracies: list[float], n: int) -> dict[str, Any]:
    rises = [
        (sweep[i], sweep[i + 1]) for i in range(len(sweep) - 1)
        if accuracies[i + 1] > accuracies[i] + difference_tolerance(accuracies[i], n)
    ]
    return _check(
        EPS_SWEEP_CHECK, not rises,
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


def _full_below_bpda(full: float, bpda: float, n: int, gradient_mode: str) -> dict[str, Any]:
    tolerance = difference_tolerance(bpda, n)
    return _check(
        "full gradient <= BPDA", full <= bpda + tolerance,
        f"{gradient_mode} gradient {full:.3f}, BPDA {bpda:.3f} (tolerance {tolerance:.3f})",
        {"full": full, "bpda": bpda, "tolerance": tolerance, "gradient_mode": gradient_mode},
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
