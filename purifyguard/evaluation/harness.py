"""The evaluation loop: for each model and attack, attack every batch, then take the verdict.

Batches are the unit of work. Each finished batch is stored at once (see store.py) and skipped
when the run is repeated, and each batch's randomness comes from (seed, attack, batch index)
alone, so a resumed, sharded or uninterrupted run gives the same report. Launched with
`accelerate launch`, the pending batches are split between the processes and their records are
gathered before the report is built.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from filelock import FileLock, Timeout
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from purifyguard.evaluation.arguments import (
    check_attack_list,
    check_class_names,
    check_data,
    check_examples,
    check_model,
    check_models,
    check_name,
    check_output_dir,
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
from purifyguard.evaluation.grid import save_grid
from purifyguard.evaluation.pgd import perturbation_norm
from purifyguard.evaluation.report import build_report, write_report
from purifyguard.evaluation.seeds import derive_seed
from purifyguard.evaluation.store import CLEAN, BatchStore, batch_key
from purifyguard.evaluation.trace import AttackTrace
from purifyguard.evaluation.verdict import predictions
from purifyguard.files import check_inside, write_atomic
from purifyguard.validation import check_bool, check_int, check_optional_int

logger = logging.getLogger(__name__)

Data = Dataset | tuple[torch.Tensor, torch.Tensor]
LOCK_FILE = ".lock"
ADVERSARIAL_TENSOR = "adversarial"


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
    Returns the report (the JSON document, as a dict). Every argument is checked before any
    model runs (ValueError naming it).
    """
    check_model("model", model)
    check_name("model_name", model_name)
    check_model("undefended", undefended, optional=True)
    return evaluate_models(
        {model_name: model}, data, attacks, n=n, batch_size=batch_size, runs=runs, seed=seed,
        output_dir=output_dir, resume=resume, undefended={model_name: undefended},
        sanity=sanity, sanity_n=sanity_n, class_names=class_names, progress=progress,
        device=device,
    )


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
) -> dict[str, Any]:
    """Several models on the same images, attacks and seeds; one record per model x attack.

    Every argument is checked before any model runs (ValueError naming it). While it runs, the
    output folder is locked: a second evaluation into the same folder fails at once with
    OutputFolderInUse instead of computing every batch a second time.
    """
    from purifyguard.evaluation.sanity import run_sanity_checks, save_eps_sweep_plot

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
    class_names = check_class_names(class_names)
    device = _check_device(device)
    undefended = _check_undefended(undefended, models)
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
                         progress=progress, state=state, run_sanity_checks=run_sanity_checks,
                         save_eps_sweep_plot=save_eps_sweep_plot,
                         device=state.device if device is None else device)


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
    class_names: Sequence[str] | None, progress: bool, state: PartialState, run_sanity_checks,
    save_eps_sweep_plot, device: torch.device,
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
    started = time.perf_counter()
    for model_name, model in models.items():
        model.to(device).eval()
        bare = undefended.get(model_name)
        bare = _undefended_of(model) if bare is None else bare
        for spec in [None, *specs]:
            state.wait_for_everyone()
            store.load()
            new_records += _run_batches(
                model_name, descriptions[model_name]["version"], model, bare, spec, images,
                labels, settings, store, state, output_dir, progress, device,
            )
    state.wait_for_everyone()
    store.load()
    records = dict(store.records)
    records.update({r["key"]: r for r in gather_object(new_records)})
    sanity_results = None
    if sanity:
        sanity_results = {
            name: run_sanity_checks(
                model, (images, labels), specs, n=sanity_n or min(len(labels), 64),
                batch_size=batch_size, runs=runs, seed=seed, undefended=undefended.get(name),
                output_dir=None if output_dir is None else output_dir / "sanity" / name,
                resume=resume, progress=progress, device=device,
            )
            for name, model in models.items()
        }
    report = build_report(
        settings, records, descriptions, specs,
        sanity_results, num_processes=state.num_processes, device=str(device),
        seconds=time.perf_counter() - started,
    )
    if output_dir is not None and state.is_main_process:
        write_report(report, output_dir)
        for model_name, model in models.items():
            for spec in specs:
                _grid(model, model_name, spec, images, labels, output_dir, seed, class_names)
        for model_name in models:
            save_convergence_plot(
                report, model_name, Path(output_dir) / f"convergence-{model_name}.png")
        for model_name, checks in (sanity_results or {}).items():
            save_eps_sweep_plot(
                checks, Path(output_dir) / f"eps-sweep-{model_name}.png",
                title=f"{model_name}: robust accuracy against eps (sanity check)",
            )
    return report


def _check_device(value: Any) -> torch.device | None:
    if value is None:
        return None
    if not isinstance(value, (str, torch.device)):
        raise ValueError(f"device must be a torch.device, a string such as 'cpu' or 'cuda:0', or "
                         f"None, got {type(value).__name__}")
    try:
        return torch.device(value)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"device {value!r} is not a device: {error}") from None


def _check_undefended(value: Any, models: dict[str, nn.Module]) -> dict[str, nn.Module | None]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(
            f"undefended must be a dict of model name -> bare classifier (or None), got "
            f"{type(value).__name__}"
        )
    unknown = sorted(set(value) - set(models), key=str)
    if unknown:
        raise ValueError(f"undefended names models that are not evaluated: {unknown}; "
                         f"models: {sorted(models)}")
    for name, model in value.items():
        check_model(f"undefended[{name!r}]", model, optional=True)
    return dict(value)


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
                record["perturbation"] = perturbation_norm(x, x_adv, spec.norm).tolist()
                if trace.correct:
                    record["curve"] = trace.to_record()
                if batch == 0 and output_dir is not None:
                    _save_adversarial(output_dir, model_name, attack_name, x_adv)
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


def select_examples(data: Data, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n examples as (images in [0, 1], labels).

    One rule: an (images, labels) pair and a data set with a `tensors()` method (purifyguard's
    Fashion-MNIST and CIFAR test sets, whose first images already mix the classes) give their
    first n, so "the first 512 Fashion-MNIST test images" stays what it says. Any other Dataset
    (an ImageFolder, sorted by class, or your own) gives n examples drawn with `seed`,
    stratified across its classes (as equal a share per class as the class sizes allow), in
    class-interleaved order; all of it when n >= len(data). Labels come from the data set's
    `targets` when it has them, else from reading every item once.
    """
    n = check_int("n", n, 1)
    seed = check_int("seed", seed)
    if isinstance(data, (tuple, list)):
        images, labels = data
        images, labels = images[:n], torch.as_tensor(labels[:n])
    elif callable(getattr(data, "tensors", None)):  # purifyguard's data sets (not TensorDataset's)
        images, labels = data.tensors(min(n, len(data)))
    else:
        rows = range(len(data)) if n >= len(data) else stratified_indices(data, n, seed)
        pairs = [data[i] for i in rows]
        if not all(isinstance(p, (tuple, list)) and len(p) >= 2 for p in pairs):
            raise ValueError("data must yield (image, label) pairs")
        if not all(isinstance(p[0], torch.Tensor) for p in pairs):
            kind = next(type(p[0]).__name__ for p in pairs if not isinstance(p[0], torch.Tensor))
            raise ValueError(f"data's images must be torch.Tensors (C, H, W), got {kind}")
        shapes = {tuple(p[0].shape) for p in pairs}
        if len(shapes) != 1:
            raise ValueError(f"data's images differ in shape: {sorted(shapes)[:3]}")
        try:
            labels = torch.tensor([int(p[1]) for p in pairs])
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"data's labels must be integer class indices: {error}") from None
        images = torch.stack([p[0] for p in pairs])
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ValueError(
            "data's images must be floating point in [0, 1], got "
            f"{getattr(images, 'dtype', type(images).__name__)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"data's labels must be integer class indices, got dtype {labels.dtype}")
    return images.float(), labels.long()


def stratified_indices(data: Dataset, n: int, seed: int) -> list[int]:
    """n indices of `data` drawn with `seed`, split across its classes as evenly as the class
    sizes allow (the remainder goes to classes chosen by the seed), listed class by class in
    turn: the first batch, and so the image grid, shows as many classes as it can."""
    labels = _dataset_labels(data)
    generator = torch.Generator().manual_seed(derive_seed(seed, "select-examples"))
    classes = sorted(set(labels))
    members = {c: [i for i, label in enumerate(labels) if label == c] for c in classes}
    for c in classes:
        order = torch.randperm(len(members[c]), generator=generator).tolist()
        members[c] = [members[c][k] for k in order]
    share = dict.fromkeys(classes, 0)
    left = n
    while left:
        open_classes = [c for c in classes if share[c] < len(members[c])]
        if left >= len(open_classes):
            for c in open_classes:
                share[c] += 1
            left -= len(open_classes)
        else:
            chosen = torch.randperm(len(open_classes), generator=generator)[:left].tolist()
            for k in chosen:
                share[open_classes[k]] += 1
            left = 0
    picked = []
    for rank in range(max(share.values())):
        picked += [members[c][rank] for c in classes if rank < share[c]]
    return picked


def _dataset_labels(data: Dataset) -> list[int]:
    targets = getattr(data, "targets", None)
    if targets is not None and len(targets) == len(data):
        raw = targets.tolist() if isinstance(targets, torch.Tensor) else list(targets)
    else:
        raw = []
        for i in range(len(data)):
            item = data[i]
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise ValueError("data must yield (image, label) pairs")
            raw.append(item[1])
    try:
        return [int(label) for label in raw]
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"data's labels must be integer class indices: {error}") from None


def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """A checksum of the evaluated examples, so a resumed run cannot silently mix data sets."""
    data = images.detach().cpu().float().contiguous().numpy().tobytes()
    return f"{_crc(data):08x}-{_crc(labels.cpu().numpy().tobytes()):08x}"


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
    return {"purifier": purifier.current_config().to_dict(), "nfe": purifier.config.nfe,
            "n_samples": getattr(model, "n_samples", 1)}


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


def _adversarial_path(output_dir: str | Path, model_name: str, attack_name: str) -> Path:
    """Where the first batch's adversarial images go: safetensors, never a pickle (a planted
    pickle would run code when loaded)."""
    return Path(output_dir) / "adversarial" / f"{model_name}--{attack_name}--batch0.safetensors"


def _save_adversarial(output_dir, model_name: str, attack_name: str, x_adv: torch.Tensor) -> None:
    from safetensors.torch import save

    path = _adversarial_path(output_dir, model_name, attack_name)
    write_atomic(path, save({ADVERSARIAL_TENSOR: x_adv.detach().cpu().float().contiguous()}))


def _load_adversarial(path: Path, output_dir: str | Path, like: torch.Tensor) -> torch.Tensor:
    """The stored adversarial batch, checked against the clean images it belongs to."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_inside(path, Path(output_dir), "adversarial image file")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"adversarial image file {path} cannot be read ({error}); delete it or rerun with "
            "resume=False (--no-resume)"
        ) from None
    adversarial = tensors.get(ADVERSARIAL_TENSOR)
    if (adversarial is None or not adversarial.is_floating_point()
            or adversarial.dim() != 4 or adversarial.shape[1:] != like.shape[1:]
            or len(adversarial) < min(len(like), 1) or not torch.isfinite(adversarial).all()
            or adversarial.min() < 0 or adversarial.max() > 1):
        raise ValueError(
            f"adversarial image file {path} does not hold a batch of images in [0, 1] shaped "
            f"like the evaluated ones {tuple(like.shape[1:])}; delete it or rerun with resume=False "
            "(--no-resume)"
        )
    return adversarial


def _grid(model, model_name, spec, images, labels, output_dir, seed, class_names) -> None:
    path = _adversarial_path(output_dir, model_name, spec.label)
    if not path.exists():
        return
    adversarial = _load_adversarial(path, output_dir, images)
    count = min(8, len(adversarial), len(images))
    save_grid(
        model, images[:count], adversarial[:count], labels[:count],
        Path(output_dir) / f"grid-{model_name}-{spec.label}.png",
        seed=derive_seed(seed, "grid", spec.label), class_names=class_names,
        title=f"{model_name}: {spec.label} ({spec.norm}, eps={spec.eps:g}, {spec.gradient_mode})",
    )


def _crc(data: bytes | str) -> int:
    return zlib.crc32(data.encode() if isinstance(data, str) else data)
