"""Convergence shown, not assumed: robust accuracy against the attack's iterations.

Every iterative attack (trace.py) stores, per batch and gradient iteration, how many of its
crafting draws classify each example correctly. The curve of a record is, at iteration k,

    mean over examples of (share of runs whose clean image is right) x (share of iteration k's
    crafting draws that are right),

so it is on the scale of the verdict's mean robust accuracy, which the record also gives (on
fresh draws) as `final`. The x axis of the plot is gradient evaluations per example (iteration x
EOT), so attacks at the same budget end at the same place. sanity.convergence_check reads the
curve ("more steps never raise it").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from purifyguard.files import write_figure


def convergence_curve(batches: list[dict], clean_share: torch.Tensor,
                      evaluations_per_iteration: int | None = None) -> dict[str, Any] | None:
    """The curve from one attack's batch records, or None when a batch has none (attacks run
    inside torchattacks, or batches stored before curves existed). clean_share: (n,) share of
    the R runs that get each clean image right."""
    curves = [b.get("curve") for b in batches]
    if not curves or any(c is None for c in curves):
        return None
    lengths = {len(c["correct"]) for c in curves}
    draws = {c["draws"] for c in curves}
    if len(lengths) != 1 or len(draws) != 1 or not lengths.pop():
        return None
    (eot,) = draws
    correct = torch.cat([torch.tensor(c["correct"], dtype=torch.float) for c in curves], dim=1)
    accuracy = (correct / eot * clean_share.float()).mean(1)
    return {
        "draws": eot,
        "iterations": list(range(1, len(accuracy) + 1)),
        "gradient_evaluations": [(evaluations_per_iteration or eot) * k
                                 for k in range(1, len(accuracy) + 1)],
        "robust_accuracy": [round(float(a), 6) for a in accuracy],
        "restart_starts": curves[0]["restart_starts"],
    }


def convergence_figure(report: dict[str, Any], model_name: str):
    """Robust accuracy against gradient evaluations per example for every attack on
    `model_name` that has a curve, the final verdict (fresh draws) marked at the end; None when
    no record has a curve."""
    records = [r for r in report["records"]
               if r["model"] == model_name and r.get("convergence")]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for record in records:
        curve, attack = record["convergence"], record["attack"]
        line, = axis.plot(curve["gradient_evaluations"], curve["robust_accuracy"],
                          label=f"{attack['name']} (crafting draws, EOT {curve['draws']})")
        axis.plot([curve["gradient_evaluations"][-1]], [curve["final"]], marker="o",
                  color=line.get_color(), linestyle="none",
                  label=f"{attack['name']}: verdict on fresh draws")
        for start in curve["restart_starts"][1:]:
            axis.axvline(curve["gradient_evaluations"][start - 1], color=line.get_color(),
                         linestyle=":", linewidth=0.8)
    axis.set_xlabel("gradient evaluations per example (iteration x EOT)")
    axis.set_ylabel("robust accuracy")
    axis.set_ylim(-0.02, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper right")
    settings = report["settings"]
    axis.set_title(f"{model_name}: robust accuracy against attack iterations\n"
                   f"n={settings['n']}, R={settings['runs']}; dotted: a restart begins",
                   fontsize=8)
    figure.tight_layout()
    return figure


def save_convergence_plot(report: dict[str, Any], model_name: str, path: str | Path
                          ) -> Path | None:
    """convergence_figure as a PNG at `path`; None (and no file) when there is no curve."""
    figure = convergence_figure(report, model_name)
    if figure is None:
        return None
    return write_figure(figure, path)
