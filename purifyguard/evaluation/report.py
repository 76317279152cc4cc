"""The report: one JSON record per model x attack (schema below, documented in
docs/evaluation.md), and the same numbers as a Markdown table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from purifyguard.evaluation.attacks import AttackSpec
from purifyguard.evaluation.convergence import convergence_curve
from purifyguard.evaluation.sanity import CONVERGENCE_CHECK, convergence_check
from purifyguard.evaluation.stats import wilson_interval
from purifyguard.evaluation.store import batch_key
from purifyguard.evaluation.verdict import accuracy_summary
from purifyguard.files import write_atomic, write_json

SCHEMA_VERSION = 1
_NUMBER = (int, float)
_ACCURACY = {
    "n": int, "per_run": [_NUMBER], "mean": _NUMBER, "worst_case": _NUMBER,
    "ci95_mean": [_NUMBER], "ci95_worst_case": [_NUMBER],
    "within_submissions": dict, "majority": _NUMBER,
}
RECORD_SCHEMA = {
    "model": str,
    "attack": {
        "name": str, "kind": str, "norm": str, "eps": _NUMBER, "steps": int,
        "step_size": _NUMBER, "eot": int, "random_start": bool, "gradient_mode": str,
        "checkpointing": bool, "n_queries": (int, type(None)), "reduced": bool,
        "restarts": (int, type(None)), "loss": (str, type(None)),
        "momentum": (*_NUMBER, type(None)), "select_draws": (int, type(None)),
        "eot_weighting": (str, type(None)), "graft": (bool, type(None)),
        "step_schedule": (dict, type(None)),
        "gradient_evaluations": int, "crafting_forward_passes": int,
        "selection_forward_passes": int, "init": (dict, type(None)),
    },
    "n": int, "seed": int, "runs": int,
    "clean_accuracy": _ACCURACY,
    "robust_accuracy": _ACCURACY,
    "perturbation": {"norm": str, "max": _NUMBER, "mean": _NUMBER, "within_eps": bool},
    "seconds": _NUMBER,
    "sanity": str,
    "convergence": (dict, type(None)),
    "eot_alignment": (dict, type(None)),
    "substitute": (dict, type(None)),
}
# Keys added after reports were first published: a report written before them still validates.
LATER_KEYS = frozenset({"graft", "crafting_forward_passes", "eot_alignment", "substitute",
                        "init"})
CHECK_SCHEMA = {"check": str, "passed": bool, "message": str, "values": dict}
REPORT_SCHEMA = {
    "schema_version": int,
    "purifyguard_version": str,
    "settings": {
        "seed": int, "n": int, "batch_size": int, "runs": int, "data_fingerprint": str,
        "num_processes": int, "device": str, "seconds": _NUMBER,
    },
    "models": dict,
    "records": [RECORD_SCHEMA],
    "sanity": (dict, type(None)),
}


def build_report(
    settings: dict[str, Any], records: dict[str, dict], models: dict[str, dict],
    specs: list[AttackSpec], sanity: dict[str, list[dict]] | None, *, num_processes: int,
    device: str, seconds: float, alignments: dict[tuple[str, str], dict] | None = None,
    n_per_model: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Aggregate the finished batches into one record per model x attack; `alignments` holds
    the measured EOT alignment of (model, attack) pairs (gradient_alignment.py); n_per_model
    the models evaluated on only the first k of the n images (each record's "n" says so)."""
    from purifyguard.version import __version__

    n_per_model = n_per_model or {}
    rows = []
    for model_name, description in models.items():
        count = min(n_per_model.get(model_name, settings["n"]), settings["n"])
        n_batches = -(-count // settings["batch_size"])
        version = description.get("version", "")
        clean = _batches(records, model_name, None, n_batches, version)
        labels = torch.tensor([y for r in clean for y in r["labels"]])
        clean_correct = _predictions(clean) == labels
        failed = [c["check"] for c in (sanity or {}).get(model_name, []) if not c["passed"]]
        for spec in specs:
            attacked = _batches(records, model_name, spec, n_batches, version)
            robust = clean_correct & (_predictions(attacked) == labels)
            sizes = torch.tensor([s for r in attacked for s in r["perturbation"]])
            convergence = convergence_curve(attacked, clean_correct.float().mean(0),
                                            spec.gradient_evaluations_per_iteration)
            own_failed = list(failed)
            if convergence is not None:
                convergence["final"] = float(robust.float().mean())
                convergence["check"] = convergence_check(convergence, len(labels))
                if not convergence["check"]["passed"] and CONVERGENCE_CHECK not in own_failed:
                    own_failed.append(CONVERGENCE_CHECK)
            if own_failed:
                verdict = "failed: " + ", ".join(own_failed)
            else:
                verdict = "not run" if sanity is None else "passed"
            rows.append({
                "model": model_name,
                "attack": spec.to_dict(),
                "n": len(labels), "seed": settings["seed"], "runs": settings["runs"],
                "clean_accuracy": _summary(clean_correct),
                "robust_accuracy": _summary(robust),
                "perturbation": {
                    "norm": spec.norm, "max": float(sizes.max()), "mean": float(sizes.mean()),
                    "within_eps": bool(sizes.max() <= spec.eps * (1 + 1e-5) + 1e-6),
                },
                "seconds": sum(r["seconds"] for r in attacked),
                "sanity": verdict,
                "convergence": convergence,
                "eot_alignment": (alignments or {}).get((model_name, spec.label)),
                "substitute": _substitute_summary(attacked),
            })
    return {
        "schema_version": SCHEMA_VERSION,
        "purifyguard_version": __version__,
        "settings": {**settings, "num_processes": num_processes, "device": device,
                     "seconds": seconds, **({"n_per_model": n_per_model} if n_per_model else {})},
        "models": models,
        "records": rows,
        "sanity": sanity,
    }


def _batches(records: dict, model_name: str, spec: AttackSpec | None, n_batches: int,
             version: str) -> list:
    keys = [batch_key(model_name, spec, b, version) for b in range(n_batches)]
    missing = [k for k in keys if k not in records]
    if missing:
        raise RuntimeError(f"batches never finished: {missing[:3]} ({len(missing)} in all)")
    return [records[k] for k in keys]


def _substitute_summary(batches: list[dict]) -> dict[str, Any] | None:
    """The smooth substitute an attack differentiated (smooth_substitute.py) and how far its
    forward was from the real defence's, over the batches: mean of the batch means, largest
    maximum. None for an attack without one."""
    measured = [b["substitute"] for b in batches if b.get("substitute")]
    if not measured:
        return None
    distances = [m["forward_distance"] for m in measured if m.get("forward_distance")]
    summary = {k: v for k, v in measured[0].items()
               if k not in ("forward_distance", "logit_distance_during_attack")}
    combine = {"n": sum, "seed": None}  # images in all; seeds differ per batch
    summary["forward_distance"] = {
        key: (combine.get(key, max if key.endswith("max") else _mean))([d[key] for d in distances])
        for key in (distances[0] if distances else {})
        if combine.get(key, 0) is not None and all(key in d for d in distances)
    }
    summary["batches"] = len(measured)
    return summary


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _predictions(batches: list[dict]) -> torch.Tensor:
    """(runs, n) predictions, batches side by side."""
    return torch.cat([torch.tensor(r["predictions"]) for r in batches], dim=1)


def _summary(correct: torch.Tensor) -> dict[str, Any]:
    summary = accuracy_summary(correct)
    summary["ci95_mean"] = list(wilson_interval(summary["mean"], summary["n"]))
    summary["ci95_worst_case"] = list(wilson_interval(summary["worst_case"], summary["n"]))
    return summary


def validate_report(report: dict[str, Any]) -> None:
    """Raise ValueError listing every place where `report` departs from REPORT_SCHEMA."""
    problems = _check(report, REPORT_SCHEMA, "report")
    for model_checks in (report.get("sanity") or {}).values():
        for i, check in enumerate(model_checks):
            problems += _check(check, CHECK_SCHEMA, f"sanity[{i}]")
    if problems:
        raise ValueError("report does not follow the schema:\n" + "\n".join(problems))


def _check(value: Any, schema: Any, where: str) -> list[str]:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {type(value).__name__}"]
        problems = [f"{where}: missing {k!r}" for k in schema
                    if k not in value and k not in LATER_KEYS]
        problems += [f"{where}: unexpected {k!r}" for k in value if k not in schema]
        for key in schema.keys() & value.keys():
            problems += _check(value[key], schema[key], f"{where}.{key}")
        return problems
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        return [p for i, item in enumerate(value) for p in _check(item, schema[0], f"{where}[{i}]")]
    if isinstance(value, bool) and schema in (int, _NUMBER):
        return [f"{where}: expected a number, got a bool"]
    if not isinstance(value, schema):
        return [f"{where}: expected {schema}, got {type(value).__name__}"]
    return []


def markdown_table(report: dict[str, Any]) -> str:
    """The records as a Markdown table, followed by the sanity checks (failures marked)."""
    settings = report["settings"]
    lines = [
        (f"Seed {settings['seed']}, n = {settings['n']}, R = {settings['runs']} purifications "
         "per verdict; robust = mean over runs [95% Wilson interval], worst = robust in every "
         "run."),
        "",
        ("| model | attack | norm | eps | steps | EOT | gradient | grad. evals + selection "
         "fwd / example | clean | robust (mean) [95% CI] | robust (worst) | reduced | sanity |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["records"]:
        a, clean, robust = r["attack"], r["clean_accuracy"], r["robust_accuracy"]
        steps = a["n_queries"] if a["kind"] == "square" else a["steps"]
        low, high = robust["ci95_mean"]
        sanity = r["sanity"] if r["sanity"] in ("passed", "not run") else f"**{r['sanity'].upper()}**"
        lines.append(
            f"| {r['model']} | {a['name']} | {a['norm']} | {a['eps']:g} | {steps} | {a['eot']} "
            f"| {a['gradient_mode']} "
            f"| {a['gradient_evaluations']} + "
            f"{a['selection_forward_passes'] + a.get('crafting_forward_passes', 0)} "
            f"| {100 * clean['mean']:.1f} | {100 * robust['mean']:.1f} "
            f"[{100 * low:.1f}, {100 * high:.1f}] | {100 * robust['worst_case']:.1f} "
            f"| {'yes' if a['reduced'] else 'no'} | {sanity} |"
        )
    for model_name, checks in (report["sanity"] or {}).items():
        lines += ["", f"Sanity checks for {model_name}:", ""]
        for check in checks:
            mark = "passed" if check["passed"] else "**FAILED**"
            lines.append(f"- {check['check']}: {mark}. {check['message']}")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], output_dir: str | Path) -> None:
    """report.json and report.md in output_dir, each written atomically: a full disk or a crash
    leaves the previous file (or none), never a partial one."""
    folder = Path(output_dir)
    write_json(folder / "report.json", report)
    write_atomic(folder / "report.md", markdown_table(report))
