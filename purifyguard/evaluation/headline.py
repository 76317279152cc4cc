"""The headline: for each image, the worst over attacks, judged again on fresh purifications.

An attacker who may choose among attacks picks, per image, the one that works: the robust
accuracy of any single attack is an upper bound of a weak kind. headline() runs the attacks in
the order given (the cheap first) and keeps, per image, the adversarial example (or the clean
image) with the lowest share of correct runs so far, chosen on `selection_runs` purifications;
each attack runs only on the images that survive everything before it (the best example found
so far is right in at least one selection run), so the expensive attacks are spent where the
cheap ones failed. Images that the clean classifier gets wrong in every selection run need no
attack.

Choosing the worst of several noisy verdicts on the same noise flatters the attacker (the
minimum of noisy shares is biased low), so the chosen examples are judged again on R fresh
purifications whose seeds selection never used; run r counts an image as robust when both its
clean image (on its own fresh seed, as report.py does) and its chosen example are right in run
r. The result is still an upper bound on robustness, but one that no choice among these attacks,
and no selection noise, can lower: the figure to lead a page with, beside the accuracy within
N = 1, 3, 10 submissions (verdict.py).

With an output folder the state (per image: the best example, its selection count, the attack
that found it) is stored atomically after every batch in one safetensors file, keyed by the
model's version, the examples, the seed, batch_size, selection_runs and the attacks finished
so far: a rerun skips finished attacks and batches, a longer list of attacks that begins with
the stored ones carries on from them, and a store of other settings is refused.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from purifyguard.evaluation.adversarial_files import stored_examples
from purifyguard.evaluation.arguments import (
    check_attack_list,
    check_data,
    check_device,
    check_examples,
    check_model,
    check_name,
    check_output_dir,
)
from purifyguard.evaluation.attacks import AttackSpec, attacked_model, parse_attack, run_attack
from purifyguard.evaluation.example_selection import Data, fingerprint, select_examples
from purifyguard.evaluation.harness import (
    _distributed_state,
    _folder_lock,
    _undefended_of,
    model_version,
)
from purifyguard.evaluation.pgd import perturbation_norm
from purifyguard.evaluation.seeds import derive_seed
from purifyguard.evaluation.stats import wilson_interval
from purifyguard.evaluation.store import CLEAN, RUN_FILE, batch_key
from purifyguard.evaluation.verdict import accuracy_summary, predictions
from purifyguard.files import read_json, write_atomic, write_json
from purifyguard.validation import check_bool, check_int, check_optional_int

logger = logging.getLogger(__name__)

STATE_FILE = "headline-state.safetensors"
RESULT_FILE = "headline.json"
SUMMARY_FILE = "headline.md"
STATE_VERSION = 1
# Seed tags: what chooses the examples and what judges them never share a seed.
ATTACK_TAG, SELECTION_TAG, VERDICT_TAG = "headline-attack", "headline-select", "headline-verdict"
_STATE_KEY = "headline"


def headline(
    model: nn.Module,
    data: Data,
    attacks: Sequence[AttackSpec | str],
    *,
    n: int = 256,
    batch_size: int = 64,
    runs: int = 10,
    selection_runs: int | None = None,
    seed: int = 0,
    output_dir: str | Path | None = None,
    resume: bool = True,
    undefended: nn.Module | None = None,
    examples_from: str | Path | None = None,
    model_name: str | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Robust accuracy against the per-image worst of `attacks`, judged on R fresh purifications.

    attacks: AttackSpec objects or attack strings of one threat model (one norm and eps; others
        are a ValueError), in the order to run them: the cheap first. Each runs only on the
        images whose best example so far is right in at least one selection run.
    data, n: the examples, selected as by evaluate (the first n of a pair of tensors or of
        purifyguard's data sets; n stratified with `seed` otherwise).
    runs: R, the fresh purifications of the final verdict (and of the clean verdict).
    selection_runs: the purifications that choose each image's worst example (default: runs);
        their seeds are never used by the final verdict.
    output_dir: where the state (headline-state.safetensors: the chosen examples and their
        counts, stored after every batch), headline.json and headline.md go; with resume a
        rerun skips finished attacks and batches, and a headline that had finished returns
        its stored verdict (when it judged this state on these runs) without judging again.
        resume=False starts over.
    undefended: the bare classifier for transfer attacks (taken from a PurifiedModel if None).
    examples_from, model_name: an evaluate / evaluate_models output folder of the same images
        (the same n and data) and the model's name there: an attack that evaluation ran with the
        same settings on this model (the same version) is not run again on the images whose
        examples it kept (adversarial/, every batch); they are judged as the attack's own.
    device: as for evaluate (None: accelerate's device for this process). One process only.
    Returns {"n", "runs", "selection_runs", "seed", "batch_size", "threat_model", "attacks"
    (their to_dict()), "per_attack" (per attack: images attacked, images whose best example it
    improved and whose final one it provided, seconds), "clean_accuracy", "robust_accuracy"
    (mean, worst_case, within_submissions, majority, per_run, 95% Wilson intervals),
    "per_image" (labels, chosen attack, correct runs of R: robust and clean, selection count),
    "perturbation", "model_version", "data_fingerprint", "seconds"}. Every argument is checked
    before any model runs (ValueError naming it).
    """
    check_model("model", model)
    check_model("undefended", undefended, optional=True)
    check_data(data)
    specs = check_attack_list(attacks, parse_attack, AttackSpec)
    if specs is None:
        raise ValueError("attacks must list the attacks to run, the cheap first (a headline has "
                         "no default list), e.g. ['transfer:eps=0.1', 'apgd-eot:eps=0.1']")
    names = [spec.label for spec in specs]
    if len(set(names)) != len(names) or CLEAN in names:
        raise ValueError(f"attack names must be unique and not {CLEAN!r}, got {names} (name=...)")
    threat_models = sorted({(spec.norm, spec.eps) for spec in specs})
    if len(threat_models) > 1:
        raise ValueError(
            "a headline is for one threat model, but the attacks mix "
            + ", ".join(f"{norm} eps={eps:g}" for norm, eps in threat_models)
            + ": run one headline per norm and eps"
        )
    n = check_int("n", n, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    runs = check_int("runs", runs, 1)
    selection_runs = check_optional_int("selection_runs", selection_runs, 1) or runs
    seed = check_int("seed", seed)
    output_dir = check_output_dir(output_dir)
    check_bool("resume", resume)
    check_bool("progress", progress)
    device = check_device(device)
    images, labels = select_examples(data, n, seed)
    images = check_examples(images, labels, None)
    evaluation = _checked_evaluation(examples_from, model_name, images, labels, data, seed)
    device = _distributed_state().device if device is None else device
    model.to(device).eval()
    bare = undefended if undefended is not None else _undefended_of(model)
    attackers = [attacked_model(spec, model, bare) for spec in specs]  # a missing bare fails now
    with _folder_lock(output_dir, True):
        return _headline(model, attackers, specs, images, labels, batch_size=batch_size,
                         runs=runs, selection_runs=selection_runs, seed=seed,
                         output_dir=output_dir, resume=resume, progress=progress, device=device,
                         evaluation=evaluation)


def _checked_evaluation(examples_from: Any, model_name: Any, images: torch.Tensor,
                        labels: torch.Tensor, data: Data, seed: int) -> dict[str, Any] | None:
    """examples_from and model_name checked (both or neither; an evaluation folder of these
    images, or of more images whose first ones these are: a row evaluated on fewer images,
    evaluate_models' n_per_model): {"folder", "model_name", "batch_size"}, or None without
    them."""
    if examples_from is None and model_name is None:
        return None
    if examples_from is None or model_name is None:
        raise ValueError("examples_from and model_name go together (the evaluation folder and "
                         f"the model's name there), got examples_from={examples_from!r}, "
                         f"model_name={model_name!r}")
    folder = check_output_dir(examples_from)
    model_name = check_name("model_name", model_name)
    if not (folder / RUN_FILE).is_file():
        raise ValueError(f"examples_from must be an evaluation output folder (with {RUN_FILE}), "
                         f"got {str(folder)!r}")
    run = read_json(folder / RUN_FILE, "the evaluation settings file")
    mine = {"n": len(labels), "data_fingerprint": fingerprint(images, labels)}
    if isinstance(run.get("n"), int) and run["n"] > len(labels):
        theirs, their_labels = select_examples(data, run["n"], seed)
        if torch.equal(theirs[:len(labels)], images) \
                and torch.equal(their_labels[:len(labels)], labels):
            mine = {"n": run["n"], "data_fingerprint": fingerprint(theirs, their_labels)}
    if {key: run.get(key) for key in mine} != mine:
        raise ValueError(f"examples_from {str(folder)!r} evaluated other images (n "
                         f"{run.get('n')}, data {run.get('data_fingerprint')}) than this headline "
                         f"(n {mine['n']}, data {mine['data_fingerprint']})")
    return {"folder": folder, "model_name": model_name, "batch_size": int(run["batch_size"])}


def _evaluation_examples(evaluation: dict[str, Any] | None, spec: AttackSpec, version: str,
                         images: torch.Tensor) -> dict[int, torch.Tensor]:
    """image index -> the example the evaluation kept for it under this attack and model
    version (none without an evaluation, or where it kept none)."""
    if evaluation is None:
        return {}
    size, count = evaluation["batch_size"], len(images)
    keys = {batch: batch_key(evaluation["model_name"], spec, batch, version)
            for batch in range(-(-count // size))}
    found = stored_examples(evaluation["folder"], evaluation["model_name"], spec.label, keys,
                            images[:1])
    examples = {}
    for batch, stored in found.items():
        rows = range(batch * size, min((batch + 1) * size, count))
        if len(stored) != len(rows):
            raise ValueError(f"{evaluation['folder']}: the stored {spec.label} examples of batch "
                             f"{batch} are {len(stored)} images, its batch has {len(rows)}")
        examples.update(zip(rows, stored))
    return examples


def _headline(model: nn.Module, attackers: list[nn.Module], specs: list[AttackSpec],
              images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, runs: int,
              selection_runs: int, seed: int, output_dir: Path | None, resume: bool,
              progress: bool, device: torch.device,
              evaluation: dict[str, Any] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    settings = {
        "model_version": model_version(model), "data_fingerprint": fingerprint(images, labels),
        "n": len(labels), "seed": seed, "batch_size": batch_size,
        "selection_runs": selection_runs,
    }
    identities = [_identity(spec) for spec in specs]
    state = _load_state(output_dir, settings, identities, images) if resume else None
    if state is None:
        state = _clean_state(model, images, labels, settings, batch_size, selection_runs,
                             seed, device)
        _save_state(output_dir, state)
    finished_before = len(state["done"]) == len(specs) and state["current"] is None
    for index, (spec, attacker) in enumerate(zip(specs, attackers)):
        if index < len(state["done"]):
            logger.info("headline: %s finished before, skipped", spec.label)
            continue
        stored = _evaluation_examples(evaluation, spec, settings["model_version"], images)
        _run_attack(model, attacker, spec, index, state, images, labels, batch_size=batch_size,
                    selection_runs=selection_runs, seed=seed, output_dir=output_dir,
                    progress=progress, device=device, stored=stored)
    if resume and finished_before:
        judged = _stored_verdict(output_dir, specs, state, images, labels, runs=runs,
                                 batch_size=batch_size)
        if judged is not None:
            logger.info("headline: every attack and the verdict finished before, reused")
            return judged
    result = _verdict(model, specs, state, images, labels, batch_size=batch_size, runs=runs,
                      seed=seed, device=device)
    result["seconds"] = time.perf_counter() - started
    if output_dir is not None:
        write_json(output_dir / RESULT_FILE, result)
        write_atomic(output_dir / SUMMARY_FILE, headline_markdown(result))
    return result


def _identity(spec: AttackSpec) -> dict[str, Any]:
    """An attack's settings as JSON gives them back (what a stored state is compared with)."""
    return json.loads(json.dumps(spec.identity(), sort_keys=True))


def _batches(count: int, batch_size: int) -> list[slice]:
    return [slice(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def _correct_counts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, runs: int,
                    seed: int) -> torch.Tensor:
    """Per image, how many of `runs` purifications (seeded from `seed`) classify it right."""
    return (predictions(model, x, runs, seed).cpu() == y.cpu()).sum(0)


def _clean_state(model, images, labels, settings, batch_size, selection_runs, seed, device):
    """The state before any attack: every image's best example is itself, with the count of the
    selection runs that classify it right."""
    counts = torch.zeros(len(labels), dtype=torch.long)
    for batch, rows in enumerate(_batches(len(labels), batch_size)):
        counts[rows] = _correct_counts(
            model, images[rows].to(device), labels[rows], selection_runs,
            derive_seed(settings["seed"], SELECTION_TAG, CLEAN, batch))
    return {
        "version": STATE_VERSION, "settings": settings, "done": [], "current": None,
        "per_attack": [], "best": images.clone(), "best_correct": counts,
        "clean_correct": counts.clone(), "source": torch.full((len(labels),), -1),
    }


def _run_attack(model, attacker, spec, index, state, images, labels, *, batch_size,
                selection_runs, seed, output_dir, progress, device, stored=None) -> None:
    """Attack the survivors of everything before (or what is left of them after an
    interruption), keeping per image the example right in the fewest selection runs; a survivor
    with an example in `stored` (image index -> example) takes it instead of being attacked."""
    stored = stored or {}
    identity = _identity(spec)
    current = state["current"]
    if current is None:
        survivors = torch.nonzero(state["best_correct"] > 0).flatten().tolist()
        current = {"attack": identity, "survivors": survivors, "batches_done": 0,
                   "improved": 0, "seconds": 0.0, "from_evaluation": 0}
        state["current"] = current
        _save_state(output_dir, state)
    survivors = current["survivors"]
    batches = _batches(len(survivors), batch_size)
    kept = sum(index in stored for index in survivors)
    bar = tqdm(total=len(batches), initial=current["batches_done"], unit="batch",
               desc=f"headline | {spec.label} ({len(survivors)} images"
                    + (f", {kept} from the evaluation)" if kept else ")"), disable=not progress)
    for batch in range(current["batches_done"], len(batches)):
        start = time.perf_counter()
        rows = torch.tensor(survivors[batches[batch]], dtype=torch.long)
        x, y = images[rows].to(device), labels[rows].to(device)
        have = torch.tensor([int(row) in stored for row in rows], dtype=torch.bool)
        mask = have.to(x.device)
        x_adv = x.clone()
        if have.any():
            x_adv[mask] = torch.stack([stored[int(row)] for row in rows[have]]).to(x)
        if not have.all():
            x_adv[~mask] = run_attack(spec, attacker, x[~mask], y[~mask],
                                      derive_seed(seed, ATTACK_TAG, spec.label, batch)
                                      ).clamp(0, 1).detach()
        _check_ball(spec, x, x_adv, batch)
        counts = _correct_counts(model, x_adv, y, selection_runs,
                                 derive_seed(seed, SELECTION_TAG, spec.label, batch))
        better = counts < state["best_correct"][rows]  # a tie keeps the earlier, cheaper one
        chosen = rows[better]
        state["best"][chosen] = x_adv.cpu().float()[better]
        state["best_correct"][chosen] = counts[better]
        state["source"][chosen] = index
        current["improved"] += int(better.sum())
        current["from_evaluation"] = current.get("from_evaluation", 0) + int(have.sum())
        current["seconds"] += time.perf_counter() - start
        current["batches_done"] = batch + 1
        _save_state(output_dir, state)
        bar.update()
    bar.close()
    state["per_attack"].append({"name": spec.label, "attacked": len(survivors),
                                "from_evaluation": current.get("from_evaluation", 0),
                                "improved": current["improved"], "seconds": current["seconds"]})
    state["done"].append(identity)
    state["current"] = None
    _save_state(output_dir, state)
    logger.info("headline: %s attacked %d images, lowered the best example of %d",
                spec.label, len(survivors), current["improved"])


def _check_ball(spec: AttackSpec, x: torch.Tensor, x_adv: torch.Tensor, batch: int) -> None:
    sizes = perturbation_norm(x, x_adv, spec.norm)
    if len(sizes) and float(sizes.max()) > spec.eps * (1 + 1e-5) + 1e-6:
        raise ValueError(
            f"the {spec.kind!r} attack returned images outside its {spec.norm} ball of eps "
            f"{spec.eps:g} (largest perturbation {float(sizes.max()):.6g}, batch {batch} of its "
            "survivors): an attack must project its images into the ball"
        )


def _verdict(model, specs, state, images, labels, *, batch_size, runs, seed, device):
    """Judge the clean images and the chosen examples on fresh purifications, never used in
    selection; run r counts an image as robust when both are right in run r."""
    clean, chosen = [], []
    for batch, rows in enumerate(_batches(len(labels), batch_size)):
        y = labels[rows]
        clean.append(predictions(model, images[rows].to(device), runs,
                                 derive_seed(seed, VERDICT_TAG, CLEAN, batch)).cpu() == y)
        chosen.append(predictions(model, state["best"][rows].to(device), runs,
                                  derive_seed(seed, VERDICT_TAG, "chosen", batch)).cpu() == y)
    clean_correct, chosen_correct = torch.cat(clean, 1), torch.cat(chosen, 1)
    robust = clean_correct & chosen_correct
    source = state["source"].tolist()
    names = [spec.label for spec in specs]
    spec = specs[0]
    sizes = perturbation_norm(images, state["best"], spec.norm)
    per_attack = [{**stats, "provided": source.count(index)}
                  for index, stats in enumerate(state["per_attack"])]
    return {
        "n": len(labels), "runs": runs, "selection_runs": state["settings"]["selection_runs"],
        "seed": seed, "batch_size": batch_size,
        "threat_model": {"norm": spec.norm, "eps": spec.eps},
        "attacks": [s.to_dict() for s in specs],
        "per_attack": per_attack,
        "clean_unattacked": source.count(-1),
        "clean_accuracy": _summary(clean_correct),
        "robust_accuracy": _summary(robust),
        "per_image": {
            "labels": labels.tolist(),
            "attack": [CLEAN if s < 0 else names[s] for s in source],
            "correct_runs": robust.sum(0).tolist(),
            "clean_correct_runs": clean_correct.sum(0).tolist(),
            "selection_correct_runs": state["best_correct"].tolist(),
        },
        "perturbation": {
            "norm": spec.norm, "eps": spec.eps, "max": float(sizes.max()),
            "mean": float(sizes.mean()),
            "within_eps": bool(sizes.max() <= spec.eps * (1 + 1e-5) + 1e-6),
        },
        "model_version": state["settings"]["model_version"],
        "data_fingerprint": state["settings"]["data_fingerprint"],
    }


def _stored_verdict(output_dir: Path | None, specs: list[AttackSpec], state: dict[str, Any],
                    images: torch.Tensor, labels: torch.Tensor, *, runs: int,
                    batch_size: int) -> dict[str, Any] | None:
    """The stored headline.json when it judged this very state (the same settings, attacks,
    runs, and per image the same chosen attack, selection count and perturbation sizes), so a
    finished headline run again is not judged again; None otherwise. The verdict's seeds are
    derived from these settings, so judging again on the same machine gives the same figures
    (another machine draws other noise: an equally honest sample of the same verdict)."""
    if output_dir is None or not (output_dir / RESULT_FILE).is_file():
        return None
    stored = read_json(output_dir / RESULT_FILE, "the stored headline")
    names = [spec.label for spec in specs]
    sizes = perturbation_norm(images, state["best"], specs[0].norm)
    expected = {
        "n": len(labels), "runs": runs, "batch_size": batch_size,
        "seed": state["settings"]["seed"],
        "selection_runs": state["settings"]["selection_runs"],
        "attacks": [spec.to_dict() for spec in specs],
        "model_version": state["settings"]["model_version"],
        "data_fingerprint": state["settings"]["data_fingerprint"],
    }
    if json.loads(json.dumps({key: stored.get(key) for key in expected})) \
            != json.loads(json.dumps(expected)):
        return None
    per_image = stored.get("per_image") or {}
    chosen = [CLEAN if s < 0 else names[s] for s in state["source"].tolist()]
    perturbation = stored.get("perturbation") or {}
    if (per_image.get("attack") != chosen
            or per_image.get("selection_correct_runs") != state["best_correct"].tolist()
            or perturbation.get("max") != float(sizes.max())
            or perturbation.get("mean") != float(sizes.mean())):
        return None
    return stored


def _summary(correct: torch.Tensor) -> dict[str, Any]:
    """accuracy_summary with 95% Wilson intervals for the mean and the worst case (as in the
    report's records)."""
    summary = accuracy_summary(correct)
    summary["ci95_mean"] = list(wilson_interval(summary["mean"], summary["n"]))
    summary["ci95_worst_case"] = list(wilson_interval(summary["worst_case"], summary["n"]))
    return summary


# --- the stored state ---------------------------------------------------------------------------


def _save_state(output_dir: Path | None, state: dict[str, Any]) -> None:
    """The whole state in one safetensors file (its JSON part in the metadata), written
    atomically: complete or absent, never tensors of one batch with counts of another."""
    if output_dir is None:
        return
    from safetensors.torch import save

    tensors = {key: state[key].contiguous() for key in _TENSORS}
    meta = {key: state[key] for key in ("version", "settings", "done", "current", "per_attack")}
    write_atomic(output_dir / STATE_FILE,
                 save(tensors, metadata={_STATE_KEY: json.dumps(meta, sort_keys=True)}))


_TENSORS = ("best", "best_correct", "clean_correct", "source")


def _load_state(output_dir: Path | None, settings: dict[str, Any],
                identities: list[dict[str, Any]], images: torch.Tensor) -> dict[str, Any] | None:
    """The stored state, checked against this run's settings and attacks; None when there is
    none. ValueError when it belongs to other settings or cannot be read."""
    if output_dir is None or not (output_dir / STATE_FILE).exists():
        return None
    from safetensors import SafetensorError, safe_open

    path = output_dir / STATE_FILE
    start_over = "rerun with resume=False to start over, or use another output folder"
    try:
        with safe_open(str(path), framework="pt") as file:
            meta = json.loads((file.metadata() or {})[_STATE_KEY])
            tensors = {key: file.get_tensor(key) for key in _TENSORS}
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise ValueError(f"headline state {path} cannot be read ({error}); {start_over}") from None
    if meta.get("version") != STATE_VERSION or meta.get("settings") != settings:
        stored = meta.get("settings") or {}
        difference = ", ".join(
            f"{key}: stored {stored.get(key)!r}, now {settings.get(key)!r}"
            for key in sorted(set(stored) | set(settings)) if stored.get(key) != settings.get(key))
        raise ValueError(f"{output_dir} holds a headline computed with other settings "
                         f"({difference or 'another state version'}); {start_over}")
    stored = list(meta["done"]) + ([meta["current"]["attack"]] if meta["current"] else [])
    if stored != identities[:len(stored)]:
        raise ValueError(
            f"{output_dir} holds a headline of other attacks (stored, in order: "
            f"{[a.get('name') for a in stored]}; a rerun may only add attacks after them, "
            f"got {[a.get('name') for a in identities]}); {start_over}")
    n = len(images)
    if (tensors["best"].shape != images.shape or tensors["best"].dtype != images.dtype
            or any(tensors[key].shape != (n,) or tensors[key].dtype != torch.long
                   for key in _TENSORS[1:])):
        raise ValueError(f"headline state {path} does not match the {n} examples; {start_over}")
    logger.info("headline: resuming from %s (%d attacks finished)", path, len(meta["done"]))
    return {**meta, **tensors}


# --- the page -----------------------------------------------------------------------------------


def headline_markdown(result: dict[str, Any]) -> str:
    """The page's lead: one line with the headline (mean over the R fresh runs and its 95%
    interval, worst of R, within 1 / 3 / 10 submissions), then a table of which attack ran on
    how many images and found how many of the chosen examples."""
    robust, clean = result["robust_accuracy"], result["clean_accuracy"]
    threat = result["threat_model"]
    norm = {"linf": "L-inf", "l2": "L2"}.get(threat["norm"], threat["norm"])
    low, high = robust["ci95_mean"]
    within = robust["within_submissions"]
    shown = " / ".join(f"{100 * within[k]:.1f}%" for k in sorted(within, key=int))
    lines = [
        (f"**Robust accuracy {100 * robust['mean']:.1f}%** [95% CI {100 * low:.1f}, "
         f"{100 * high:.1f}] against the per-image worst of {len(result['attacks'])} attacks "
         f"({norm}, eps = {threat['eps']:g}), judged on {result['runs']} fresh purifications; "
         f"worst of {result['runs']}: {100 * robust['worst_case']:.1f}%; within "
         f"{' / '.join(sorted(within, key=int))} submissions: {shown}; clean "
         f"{100 * clean['mean']:.1f}%; n = {result['n']}, seed {result['seed']}."),
        "",
        "| attack | images attacked | lowered | chosen example from it | seconds |",
        "|---|---|---|---|---|",
    ]
    for stats in result["per_attack"]:
        taken = stats.get("from_evaluation", 0)
        attacked = f"{stats['attacked']}" + (f" ({taken} from the evaluation)" if taken else "")
        lines.append(f"| {stats['name']} | {attacked} | {stats['improved']} "
                     f"| {stats['provided']} | {stats['seconds']:.0f} |")
    lines.append(f"| (clean image: no attack did better) | | | {result['clean_unattacked']} | |")
    return "\n".join(lines) + "\n"
