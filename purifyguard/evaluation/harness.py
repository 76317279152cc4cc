"""The evaluation loop: for each model and attack, attack every batch, then take the verdict.

Batches are the unit of work. Each finished batch is stored at once (see store.py) and skipped
when the run is repeated, and each batch's randomness comes from (seed, attack, batch index)
alone, so a resumed, sharded or uninterrupted run gives the same report. Launched with
`accelerate launch`, the pending batches are split between the processes and their records are
gathered before the report is built.

The entry points evaluate, evaluate_models and run_sanity_checks check their arguments (the
models once: what they hand on is not checked again). The sanity checks (sanity.py) get this
module's evaluate function as an argument, so neither they nor report.py import the harness.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from filelock import FileLock, Timeout
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from purifyguard.evaluation.adversarial_files import save_adversarial, save_adversarial_grid
from purifyguard.evaluation.arguments import (
    check_attack_list,
    check_class_names,
    check_data,
    check_device,
    check_examples,
    check_model,
    check_models,
    check_n_per_model,
    check_name,
    check_output_dir,
    check_undefended,
)
from purifyguard.evaluation.attacks import (
    STEPPED_KINDS,
    AttackSpec,
    attacked_model,
    default_attacks,
    parse_attack,
    run_attack,
)
from purifyguard.evaluation.convergence import save_convergence_plot
from purifyguard.evaluation.example_selection import Data, fingerprint, select_examples
from purifyguard.evaluation.gradient_alignment import measured_alignment
from purifyguard.evaluation.pgd import perturbation_norm
from purifyguard.evaluation.report import build_report, write_report
from purifyguard.evaluation.sanity import sanity_checks, save_eps_sweep_plot
from purifyguard.evaluation.seeds import derive_seed
from purifyguard.evaluation.smooth_substitute import substitute_record
from purifyguard.evaluation.store import CLEAN, BatchStore, batch_key
from purifyguard.evaluation.trace import AttackTrace
from purifyguard.evaluation.verdict import predictions
from purifyguard.validation import check_bool, check_int, check_number, check_optional_int

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"


def evaluate(
    model: nn.Module,
    data: Data,
    attacks: Sequence[AttackSpec | str] | None = None,
    *,
    n: int = 512,
    batch_size: int = 64,
    runs: int = 10,
    seed: int = 0,
    output_dir: str | Path | None = None,
    resume: bool = True,
    model_name: str = "model",
    undefended: nn.Module | None = None,
    sanity: bool = False,
    sanity_n: int | None = None,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    eot_check: int = 8,
) -> dict[str, Any]:
    """Clean and robust accuracy of one model (a PurifiedModel, or any [0, 1] -> logits model).

    data: a Dataset of (image, label) or a pair of tensors; n examples are used: the first n
        of a pair of tensors or of a data set with `tensors()` (Fashion-MNIST, CIFAR), n drawn
        with `seed` and stratified across the classes of any other Dataset (select_examples).
    attacks: AttackSpec objects or strings such as "pgd:eps=0.1,steps=20,eot=4"; None runs the
        protocol's set (default_attacks()).
    runs: R, the independent purifications behind each verdict.
    output_dir: where batches, report.json, report.md and the image grids go; with resume, a
        rerun skips the batches already there.
    undefended: the bare classifier for the transfer attack (taken from a PurifiedModel if None).
    sanity: also run the sanity checks (sanity.py) on the first sanity_n examples.
    device: where the model and images go (e.g. "cpu", "cuda:1"); None takes accelerate's
        device for this process (the GPU when there is one).
    eot_check: on this many of the first examples, measure how well each gradient attack's EOT
        aligns with the expected gradient (gradient_alignment.py; the record's eot_alignment,
        a warning below 0.8); 0 skips it.
    Returns the report (the JSON document, as a dict). Every argument is checked before any
    model runs (ValueError naming it).
    """
    check_model("model", model)
    check_name("model_name", model_name)
    check_model("undefended", undefended, optional=True)
    return _evaluate_checked(
        model, data, attacks, n=n, batch_size=batch_size, runs=runs, seed=seed,
        output_dir=output_dir, resume=resume, model_name=model_name, undefended=undefended,
        sanity=sanity, sanity_n=sanity_n, class_names=class_names, progress=progress,
        device=device, eot_check=eot_check,
    )


def _evaluate_checked(model: nn.Module, data: Data, attacks: Sequence[AttackSpec | str] | None,
                      *, model_name: str, undefended: nn.Module | None,
                      **settings: Any) -> dict[str, Any]:
    """evaluate after its checks of model, model_name and undefended: what evaluate runs, and
    the evaluate function run_sanity_checks and _evaluate hand the sanity checks (whose model is
    checked already)."""
    return _evaluate_models({model_name: model}, data, attacks,
                            undefended={model_name: undefended}, models_checked=True, **settings)


def evaluate_models(
    models: dict[str, nn.Module],
    data: Data,
    attacks: Sequence[AttackSpec | str] | None = None,
    *,
    n: int = 512,
    batch_size: int = 64,
    runs: int = 10,
    seed: int = 0,
    output_dir: str | Path | None = None,
    resume: bool = True,
    undefended: dict[str, nn.Module | None] | None = None,
    sanity: bool = False,
    sanity_n: int | None = None,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    eot_check: int = 8,
    n_per_model: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Several models on the same images, attacks and seeds; one record per model x attack.

    n_per_model gives some models fewer images: name -> k, the first k of the n images (a
    multiple of batch_size), so an expensive row can run on fewer images than the others; its
    pairs are then compared on the images both have (compare_stored's `images`). It is not one
    of the run's settings: a model's stored batches mean the same whatever its k.
    Every argument is checked before any model runs (ValueError naming it). While it runs, the
    output folder is locked: a second evaluation into the same folder fails at once with
    OutputFolderInUse instead of computing every batch a second time.
    """
    return _evaluate_models(
        models, data, attacks, n=n, batch_size=batch_size, runs=runs, seed=seed,
        output_dir=output_dir, resume=resume, undefended=undefended, sanity=sanity,
        sanity_n=sanity_n, class_names=class_names, progress=progress, device=device,
        eot_check=eot_check, models_checked=False, n_per_model=n_per_model,
    )


def _evaluate_models(
    models: dict[str, nn.Module], data: Data, attacks: Sequence[AttackSpec | str] | None, *,
    n: int = 512, batch_size: int = 64, runs: int = 10, seed: int = 0,
    output_dir: str | Path | None = None, resume: bool = True,
    undefended: dict[str, nn.Module | None] | None = None, sanity: bool = False,
    sanity_n: int | None = None, class_names: Sequence[str] | None = None,
    progress: bool = True, device: str | torch.device | None = None, eot_check: int = 8,
    models_checked: bool = False, n_per_model: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """evaluate_models; models_checked: the models and undefended (one each) come from
    _evaluate_checked, whose caller checked them, so they are not checked again."""
    if not models_checked:
        models = check_models(models)
    check_data(data)
    specs = check_attack_list(attacks, parse_attack, AttackSpec) or default_attacks()
    n = check_int("n", n, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    runs = check_int("runs", runs, 1)
    seed = check_int("seed", seed)
    output_dir = check_output_dir(output_dir)
    check_bool("resume", resume)
    check_bool("sanity", sanity)
    check_bool("progress", progress)
    sanity_n = check_optional_int("sanity_n", sanity_n, 1)
    eot_check = check_int("eot_check", eot_check, 0)
    class_names = check_class_names(class_names)
    device = check_device(device)
    undefended = dict(undefended) if models_checked else check_undefended(undefended, models)
    n_per_model = check_n_per_model(n_per_model, models, n, batch_size)
    names = [spec.label for spec in specs]
    if len(set(names)) != len(names) or CLEAN in names:
        raise ValueError(f"attack names must be unique and not {CLEAN!r}, got {names}")
    images, labels = select_examples(data, n, seed)
    images = check_examples(images, labels, class_names)
    if len(labels) < n:
        logger.warning("n=%d, but the data holds %d examples: evaluating those %d",
                       n, len(labels), len(labels))
    state = _distributed_state()
    with _folder_lock(output_dir, state.is_main_process):
        return _evaluate(models, images, labels, specs, batch_size=batch_size, runs=runs,
                         seed=seed, output_dir=output_dir, resume=resume, undefended=undefended,
                         sanity=sanity, sanity_n=sanity_n, class_names=class_names,
                         progress=progress, state=state, eot_check=eot_check,
                         device=state.device if device is None else device,
                         n_per_model=n_per_model)


def run_sanity_checks(
    model: nn.Module, data: tuple[torch.Tensor, torch.Tensor] | Dataset,
    attacks: Sequence[AttackSpec | str] | None, *,
    n: int = 64, batch_size: int = 64, runs: int = 5, seed: int = 0,
    undefended: nn.Module | None = None, output_dir: str | Path | None = None,
    resume: bool = True, large_eps: float | None = None, progress: bool = True,
    device: str | torch.device | None = None,
) -> list[dict[str, Any]]:
    """Run the checks with the first gradient attack in `attacks` as the base (default: PGD at
    the default setting); a list of {"check", "passed", "message", "values"}. The eps sweep's
    values hold eps, robust_accuracy, its ci95 intervals, n, runs and the attack (a description
    and its settings), everything save_eps_sweep_plot draws. Data is selected as by evaluate
    (select_examples with `seed`). Arguments are checked first, as for evaluate."""
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
    return sanity_checks(
        model, data, attacks, evaluate=_evaluate_checked, n=n, batch_size=batch_size, runs=runs,
        seed=seed, undefended=undefended, output_dir=output_dir, resume=resume,
        large_eps=large_eps, progress=progress, device=device,
    )


class OutputFolderInUse(RuntimeError):
    """Another evaluation is writing into the same output folder."""


@contextlib.contextmanager
def _folder_lock(output_dir: Path | None, is_main: bool):
    """Hold output_dir/.lock for the duration (main process only: the other processes of the
    same accelerate run write into the folder too). The lock is the operating system's, so a
    killed run leaves nothing behind that blocks the next one."""
    if output_dir is None or not is_main:
        yield
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(output_dir / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputFolderInUse(
            f"output folder {output_dir} is in use by another evaluation (its lock file "
            f"{output_dir / LOCK_FILE} is held); wait for that one to finish or give another "
            "output_dir (--output-dir)"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _evaluate(
    models: dict[str, nn.Module], images: torch.Tensor, labels: torch.Tensor,
    specs: list[AttackSpec], *, batch_size: int, runs: int, seed: int, output_dir: Path | None,
    resume: bool, undefended: dict[str, nn.Module | None], sanity: bool, sanity_n: int | None,
    class_names: Sequence[str] | None, progress: bool, state: PartialState, device: torch.device,
    eot_check: int, n_per_model: dict[str, int],
) -> dict[str, Any]:
    settings = {
        "seed": seed, "n": len(labels), "batch_size": batch_size, "runs": runs,
        "data_fingerprint": fingerprint(images, labels),
    }
    store = BatchStore(output_dir, state.process_index)
    store.start(settings, resume, state.is_main_process)
    state.wait_for_everyone()
    descriptions = {name: describe_model(model) for name, model in models.items()}
    new_records = []
    alignments: dict[tuple[str, str], dict[str, Any]] = {}
    started = time.perf_counter()
    for model_name, model in models.items():
        model.to(device).eval()
        count = min(n_per_model.get(model_name, len(labels)), len(labels))
        bare = undefended.get(model_name)
        bare = _undefended_of(model) if bare is None else bare
        for spec in [None, *specs]:
            if spec is not None and eot_check and spec.attack.uses_eot \
                    and spec.attack.access in ("white-box", "bpda"):
                key = batch_key(model_name, spec, 0, descriptions[model_name]["version"])
                alignments[model_name, spec.label] = measured_alignment(
                    output_dir, key.rpartition("|")[0], attacked_model(spec, model, bare),
                    images[:eot_check].to(device), labels[:eot_check].to(device),
                    eot=spec.eot, seed=derive_seed(seed, "eot-alignment", spec.label),
                    write=state.is_main_process)
            state.wait_for_everyone()
            store.load()
            new_records += _run_batches(
                model_name, descriptions[model_name]["version"], model, bare, spec,
                images[:count], labels[:count], settings, store, state, output_dir, progress,
                device,
            )
    state.wait_for_everyone()
    store.load()
    records = dict(store.records)
    records.update({r["key"]: r for r in gather_object(new_records)})
    sanity_results = None
    if sanity:
        # Everything but the sanity folder is checked already (models included: not again).
        sanity_results = {
            name: sanity_checks(
                model, (images, labels), specs, evaluate=_evaluate_checked,
                n=sanity_n or min(len(labels), 64), batch_size=batch_size, runs=runs, seed=seed,
                undefended=undefended.get(name),
                output_dir=None if output_dir is None else check_output_dir(
                    output_dir / "sanity" / name),
                resume=resume, large_eps=None, progress=progress, device=device,
            )
            for name, model in models.items()
        }
    report = build_report(
        settings, records, descriptions, specs,
        sanity_results, num_processes=state.num_processes, device=str(device),
        seconds=time.perf_counter() - started, alignments=alignments, n_per_model=n_per_model,
    )
    if output_dir is not None and state.is_main_process:
        write_report(report, output_dir)
        for model_name, model in models.items():
            for spec in specs:
                save_adversarial_grid(model, model_name, spec, images, labels, output_dir, seed,
                                      class_names)
        for model_name in models:
            save_convergence_plot(
                report, model_name, Path(output_dir) / f"convergence-{model_name}.png")
        for model_name, checks in (sanity_results or {}).items():
            save_eps_sweep_plot(
                checks, Path(output_dir) / f"eps-sweep-{model_name}.png",
                title=f"{model_name}: robust accuracy against eps (sanity check)",
            )
    return report


def _run_batches(
    model_name: str, version: str, model: nn.Module, bare: nn.Module | None, spec: AttackSpec | None,
    images: torch.Tensor, labels: torch.Tensor, settings: dict, store: BatchStore,
    state: PartialState, output_dir: str | Path | None, progress: bool, device: torch.device,
) -> list[dict[str, Any]]:
    """Attack and judge this process's share of the batches not finished yet."""
    batch_size, seed, runs = settings["batch_size"], settings["seed"], settings["runs"]
    attack_name = CLEAN if spec is None else spec.label
    n_batches = -(-len(labels) // batch_size)
    pending = [b for b in range(n_batches)
               if batch_key(model_name, spec, b, version) not in store]
    attacker = None if spec is None else attacked_model(spec, model, bare)
    finished = []
    # An iterative attack advances the bar once per iteration, so a long attack shows its rate
    # and time left from the first batch on; other work advances it once per batch.
    per_step = spec is not None and spec.kind in STEPPED_KINDS and spec.steps > 0
    with state.split_between_processes(pending) as mine:
        bar = tqdm(
            total=len(mine) * (spec.steps if per_step else 1),
            desc=f"{model_name} | {attack_name}", unit="step" if per_step else "batch",
            disable=not (progress and state.is_main_process),
        )
        for batch in mine:
            start = time.perf_counter()
            rows = slice(batch * batch_size, (batch + 1) * batch_size)
            x, y = images[rows].to(device), labels[rows].to(device)
            record = {
                "key": batch_key(model_name, spec, batch, version), "model": model_name,
                "attack": attack_name, "batch": batch, "indices": [rows.start, rows.start + len(y)],
                "labels": y.tolist(),
            }
            if spec is not None:
                attack_seed = derive_seed(seed, "attack", attack_name, batch)
                trace = AttackTrace()
                x_adv = run_attack(spec, attacker, x, y, attack_seed,
                                   on_step=bar.update if per_step else None,
                                   trace=trace).clamp(0, 1)
                sizes = perturbation_norm(x, x_adv, spec.norm)
                if float(sizes.max()) > spec.eps * (1 + 1e-5) + 1e-6:
                    raise ValueError(
                        f"the {spec.kind!r} attack returned images outside its {spec.norm} "
                        f"ball of eps {spec.eps:g} (largest perturbation {float(sizes.max()):.6g}"
                        f", batch {batch}): an attack must project its images into the ball"
                    )
                record["perturbation"] = sizes.tolist()
                substitute = substitute_record(attacker)
                if substitute is not None:
                    record["substitute"] = substitute
                if trace.correct:
                    record["curve"] = trace.to_record()
                if output_dir is not None:  # the grid's first batch, the headline's every one
                    save_adversarial(output_dir, model_name, attack_name, x_adv, batch,
                                     record["key"])
                x = x_adv
            verdict_seed = derive_seed(seed, "verdict", attack_name, batch)
            record["predictions"] = predictions(model, x, runs, verdict_seed).tolist()
            record["seconds"] = time.perf_counter() - start
            store.add(record)
            finished.append(record)
            if not per_step:
                bar.update()
        bar.close()
    return finished


def model_version(model: nn.Module) -> str:
    """A checksum of the model's weights and settings: batches stored for an earlier version of a
    model (retrained, or with other purifier settings) are never taken for this one's."""
    checksum = _crc(json.dumps(_settings_of(model), sort_keys=True, default=str))
    for name, tensor in model.state_dict().items():
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        checksum = zlib.crc32(raw, zlib.crc32(name.encode(), checksum))
    return f"{checksum:08x}"


def describe_model(model: nn.Module) -> dict[str, Any]:
    """What the report says about a model: its classifier and, if any, its purifier's settings."""
    purifier = getattr(model, "purifier", None)
    classifier = getattr(model, "classifier", model)
    description: dict[str, Any] = {
        "classifier": type(classifier).__name__,
        "defended": purifier is not None if hasattr(model, "purifier") else None,
    }
    description.update(_settings_of(model))
    description["version"] = model_version(model)
    return description


def _settings_of(model: nn.Module) -> dict[str, Any]:
    purifier = getattr(model, "purifier", None)
    if purifier is None:
        return {}
    settings = {"purifier": purifier.current_config().to_dict(), "nfe": purifier.config.nfe,
                "n_samples": getattr(model, "n_samples", 1)}
    if getattr(model, "aggregate", "mean") != "mean":  # absent at the default: versions stay
        settings["aggregate"] = model.aggregate
    return settings


def _distributed_state() -> PartialState:
    """accelerate's process state. Processes launched on a machine without CUDA (torchrun or
    `accelerate launch --cpu`) must ask for CPU explicitly to be joined into one group."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (launched and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def _undefended_of(model: nn.Module) -> nn.Module | None:
    """The bare classifier behind a PurifiedModel (itself when undefended); None otherwise."""
    if not hasattr(model, "with_purifier"):
        return None
    return model if model.purifier is None else model.with_purifier(None)


def _crc(data: bytes | str) -> int:
    return zlib.crc32(data.encode() if isinstance(data, str) else data)
