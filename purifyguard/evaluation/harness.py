"""The evaluation loop: for each model and attack, attack every batch, then take the verdict.

Batches are the unit of work. Each finished batch is stored at once (see store.py) and skipped
when the run is repeated, and each batch's randomness comes from (seed, attack, batch index)
alone, so a resumed, sharded or uninterrupted run gives the same report. Launched with
`accelerate launch`, the pending batches are split between the processes and their records are
gathered before the report is built.
"""

from __future__ import annotations

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
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from purifyguard.evaluation.attacks import (
    AttackSpec,
    attacked_model,
    default_attacks,
    parse_attack,
    run_attack,
)
from purifyguard.evaluation.grid import save_grid
from purifyguard.evaluation.pgd import perturbation_norm
from purifyguard.evaluation.report import build_report, write_report
from purifyguard.evaluation.seeds import derive_seed
from purifyguard.evaluation.store import CLEAN, BatchStore, batch_key
from purifyguard.evaluation.verdict import predictions

logger = logging.getLogger(__name__)

Data = Dataset | tuple[torch.Tensor, torch.Tensor]


def evaluate(
    model: nn.Module,
    data: Data,
    attacks: Sequence[AttackSpec | str] | None = None,
    *,
    n: int = 512,
    batch_size: int = 64,
    runs: int = 5,
    seed: int = 0,
    output_dir: str | Path | None = None,
    resume: bool = True,
    model_name: str = "model",
    undefended: nn.Module | None = None,
    sanity: bool = False,
    sanity_n: int | None = None,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Clean and robust accuracy of one model (a PurifiedModel, or any [0, 1] -> logits model).

    data: a Dataset of (image, label) or a pair of tensors; the first n examples are used.
    attacks: AttackSpec objects or strings such as "pgd:eps=0.1,steps=20,eot=4"; None runs the
        protocol's set (default_attacks()).
    runs: R, the independent purifications behind each verdict.
    output_dir: where batches, report.json, report.md and the image grids go; with resume, a
        rerun skips the batches already there.
    undefended: the bare classifier for the transfer attack (taken from a PurifiedModel if None).
    sanity: also run the sanity checks (sanity.py) on the first sanity_n examples.
    Returns the report (the JSON document, as a dict).
    """
    return evaluate_models(
        {model_name: model}, data, attacks, n=n, batch_size=batch_size, runs=runs, seed=seed,
        output_dir=output_dir, resume=resume, undefended={model_name: undefended},
        sanity=sanity, sanity_n=sanity_n, class_names=class_names, progress=progress,
    )


def evaluate_models(
    models: dict[str, nn.Module],
    data: Data,
    attacks: Sequence[AttackSpec | str] | None = None,
    *,
    n: int = 512,
    batch_size: int = 64,
    runs: int = 5,
    seed: int = 0,
    output_dir: str | Path | None = None,
    resume: bool = True,
    undefended: dict[str, nn.Module | None] | None = None,
    sanity: bool = False,
    sanity_n: int | None = None,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Several models on the same images, attacks and seeds; one record per model x attack."""
    from purifyguard.evaluation.sanity import run_sanity_checks

    specs = [parse_attack(a) if isinstance(a, str) else a for a in (attacks or default_attacks())]
    names = [spec.label for spec in specs]
    if len(set(names)) != len(names) or CLEAN in names:
        raise ValueError(f"attack names must be unique and not {CLEAN!r}, got {names}")
    images, labels = select_examples(data, n)
    state = _distributed_state()
    settings = {
        "seed": seed, "n": len(labels), "batch_size": batch_size, "runs": runs,
        "data_fingerprint": fingerprint(images, labels),
    }
    store = BatchStore(output_dir, state.process_index)
    store.start(settings, resume, state.is_main_process)
    state.wait_for_everyone()
    undefended = undefended or {}
    descriptions = {name: describe_model(model) for name, model in models.items()}
    new_records = []
    started = time.perf_counter()
    for model_name, model in models.items():
        model.to(state.device).eval()
        bare = undefended.get(model_name)
        bare = _undefended_of(model) if bare is None else bare
        for spec in [None, *specs]:
            state.wait_for_everyone()
            store.load()
            new_records += _run_batches(
                model_name, descriptions[model_name]["version"], model, bare, spec, images,
                labels, settings, store, state, output_dir, progress,
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
                output_dir=None if output_dir is None else Path(output_dir) / "sanity" / name,
                resume=resume, progress=progress,
            )
            for name, model in models.items()
        }
    report = build_report(
        settings, records, descriptions, specs,
        sanity_results, num_processes=state.num_processes, device=str(state.device),
        seconds=time.perf_counter() - started,
    )
    if output_dir is not None and state.is_main_process:
        write_report(report, output_dir)
        for model_name, model in models.items():
            for spec in specs:
                _grid(model, model_name, spec, images, labels, output_dir, seed, class_names)
    return report


def _run_batches(
    model_name: str, version: str, model: nn.Module, bare: nn.Module | None, spec: AttackSpec | None,
    images: torch.Tensor, labels: torch.Tensor, settings: dict, store: BatchStore,
    state: PartialState, output_dir: str | Path | None, progress: bool,
) -> list[dict[str, Any]]:
    """Attack and judge this process's share of the batches not finished yet."""
    batch_size, seed, runs = settings["batch_size"], settings["seed"], settings["runs"]
    attack_name = CLEAN if spec is None else spec.label
    n_batches = -(-len(labels) // batch_size)
    pending = [b for b in range(n_batches)
               if batch_key(model_name, spec, b, version) not in store]
    attacker = None if spec is None else attacked_model(spec, model, bare)
    finished = []
    with state.split_between_processes(pending) as mine:
        bar = tqdm(
            mine, desc=f"{model_name} | {attack_name}", unit="batch",
            disable=not (progress and state.is_main_process),
        )
        for batch in bar:
            start = time.perf_counter()
            rows = slice(batch * batch_size, (batch + 1) * batch_size)
            x, y = images[rows].to(state.device), labels[rows].to(state.device)
            record = {
                "key": batch_key(model_name, spec, batch, version), "model": model_name,
                "attack": attack_name, "batch": batch, "indices": [rows.start, rows.start + len(y)],
                "labels": y.tolist(),
            }
            if spec is not None:
                attack_seed = derive_seed(seed, "attack", attack_name, batch)
                x_adv = run_attack(spec, attacker, x, y, attack_seed).clamp(0, 1)
                record["perturbation"] = perturbation_norm(x, x_adv, spec.norm).tolist()
                if batch == 0 and output_dir is not None:
                    _save_adversarial(output_dir, model_name, attack_name, x_adv)
                x = x_adv
            verdict_seed = derive_seed(seed, "verdict", attack_name, batch)
            record["predictions"] = predictions(model, x, runs, verdict_seed).tolist()
            record["seconds"] = time.perf_counter() - start
            store.add(record)
            finished.append(record)
    return finished


def select_examples(data: Data, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n examples as (images in [0, 1], labels)."""
    if isinstance(data, (tuple, list)):
        images, labels = data
        return images[:n].float(), torch.as_tensor(labels[:n]).long()
    if hasattr(data, "tensors"):
        return data.tensors(min(n, len(data)))
    count = min(n, len(data))
    pairs = [data[i] for i in range(count)]
    return torch.stack([p[0] for p in pairs]), torch.tensor([int(p[1]) for p in pairs])


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


def _save_adversarial(output_dir, model_name: str, attack_name: str, x_adv: torch.Tensor) -> None:
    path = Path(output_dir) / "adversarial" / f"{model_name}--{attack_name}--batch0.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(x_adv.detach().cpu(), path)


def _grid(model, model_name, spec, images, labels, output_dir, seed, class_names) -> None:
    path = Path(output_dir) / "adversarial" / f"{model_name}--{spec.label}--batch0.pt"
    if not path.exists():
        return
    adversarial = torch.load(path)
    count = min(8, len(adversarial))
    save_grid(
        model, images[:count], adversarial[:count], labels[:count],
        Path(output_dir) / f"grid-{model_name}-{spec.label}.png",
        seed=derive_seed(seed, "grid", spec.label), class_names=class_names,
        title=f"{model_name}: {spec.label} ({spec.norm}, eps={spec.eps:g}, {spec.gradient_mode})",
    )


def _crc(data: bytes | str) -> int:
    return zlib.crc32(data.encode() if isinstance(data, str) else data)
