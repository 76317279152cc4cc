"""Training checkpoints in formats that cannot run code: safetensors for tensors, JSON for the rest.

A checkpoint is a folder checkpoints/step_NNNNNNNN holding

    state.safetensors, state.json    the shared training state (main process): model weights,
                                     optimizer, lr schedule, registered objects (the EMA),
                                     gradient scaler, accelerate's step counter
    rng_<i>.safetensors, rng_<i>.json
                                     process i's random states: torch (CPU and CUDA), NumPy's
                                     global generator, Python's random
    progress.json                    the manifest, written last: the step, the routine, the
                                     number of processes, the options that define the run, and
                                     the size and sha256 of every other file

A nested state (dicts, lists, tuples, numbers, strings, tensors, NumPy arrays) is stored as one
safetensors file holding every tensor, under a key that is its path in the structure, and a JSON
skeleton holding everything else, with references to the tensors. Loading rebuilds the structure
from the two; nothing in either file can make Python run code. A state that does not fit (say a
function in a scheduler's state dict) is refused when saving, with a CheckpointError naming the
file and the place in the structure.

A checkpoint is intact when its manifest reads and every file it lists has the listed size and
sha256. Checkpoints written by earlier versions (accelerate's save_state: model.safetensors,
optimizer.bin, scheduler.bin, random_states_<i>.pkl, custom_checkpoint_<k>.pkl and a
progress.json holding only the step) are still read: their pickles go through
torch.load(weights_only=True), and whatever that refuses is refused with the file named, so a
planted pickle never runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from purifyguard.files import read_json, write_atomic, write_json

FORMAT = "purifyguard training checkpoint"
VERSION = 1
PREFIX = "step_"
MANIFEST = "progress.json"
STATE = "state"
_STEP_FOLDER = re.compile(rf"^{PREFIX}(\d+)$")
_MARKERS = ("tensor", "ndarray", "float", "tuple", "dict", "items")


class CheckpointError(ValueError):
    """A checkpoint (or a state to be saved in one) that does not fit the format."""


# --- nested states: one safetensors file and one JSON skeleton --------------------------------

def save_tree(value: Any, folder: str | Path, name: str) -> list[str]:
    """Save a nested state as folder/name.safetensors and folder/name.json; the file names."""
    folder = Path(folder)
    skeleton_file = folder / f"{name}.json"
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(value, "", tensors, set(), skeleton_file)
    tensor_file = folder / f"{name}.safetensors"
    try:
        save_file(tensors, str(tensor_file), metadata={"format": "pt"})
    except (SafetensorError, OSError) as error:  # a full disk, a folder gone
        raise OSError(
            f"could not write the checkpoint file {tensor_file}: {error}. The checkpoint being "
            "written is left incomplete (.partial) and the newest intact one is kept: free space "
            "(or fix the folder) and continue with --resume"
        ) from None
    write_atomic(skeleton_file, json.dumps(
        {"format": FORMAT, "version": VERSION, "tree": skeleton}, allow_nan=False
    ) + "\n")
    return [f"{name}.json", f"{name}.safetensors"]


def load_tree(folder: str | Path, name: str) -> Any:
    """The nested state saved by save_tree (CPU tensors); CheckpointError naming the file when a
    file is missing, unreadable or not of this format."""
    folder = Path(folder)
    skeleton_file, tensor_file = folder / f"{name}.json", folder / f"{name}.safetensors"
    try:
        document = read_json(skeleton_file, "checkpoint file")
    except (OSError, ValueError) as error:
        raise CheckpointError(str(error)) from None
    if document.get("format") != FORMAT or "tree" not in document:
        raise CheckpointError(f"{skeleton_file} is not a purifyguard checkpoint file")
    if not tensor_file.is_file():
        raise CheckpointError(f"checkpoint file {tensor_file} does not exist")
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{tensor_file} is not a readable safetensors file: {error}") \
            from None
    used: set[str] = set()
    tree = _decode(document["tree"], tensors, used, skeleton_file, "")
    if set(tensors) - used:
        raise CheckpointError(f"{tensor_file} holds tensors that {skeleton_file} does not use: "
                              f"{sorted(set(tensors) - used)[:5]}")
    return tree


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor], storages: set[int],
            file: Path) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, np.generic) and not isinstance(value, np.object_):
        return _encode(value.item(), path, tensors, storages, file)
    if isinstance(value, torch.Tensor):
        return {"tensor": _add_tensor(value, path, tensors, storages)}
    if isinstance(value, np.ndarray):
        if value.dtype == object or value.dtype.hasobject:
            raise CheckpointError(f"{file}: {path or 'the state'} is a NumPy array of Python "
                                  "objects, which a checkpoint cannot hold")
        return {"ndarray": _add_tensor(torch.from_numpy(np.ascontiguousarray(value).copy()),
                                       path, tensors, storages)}
    if isinstance(value, list):
        return [_encode(item, f"{path}/{i}", tensors, storages, file)
                for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return {"tuple": [_encode(item, f"{path}/{i}", tensors, storages, file)
                          for i, item in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {"dict": {key: _encode(item, f"{path}/{key}", tensors, storages, file)
                             for key, item in value.items()}}
        items = []
        for key, item in value.items():
            if not (key is None or isinstance(key, (bool, int, str))
                    or (isinstance(key, float) and math.isfinite(key))):
                raise CheckpointError(f"{file}: {path or 'the state'} has a key {key!r} of type "
                                      f"{type(key).__name__}, which a checkpoint cannot hold")
            items.append([key, _encode(item, f"{path}/{key}", tensors, storages, file)])
        return {"items": items}
    raise CheckpointError(
        f"{file}: {path or 'the state'} is a {type(value).__module__}.{type(value).__qualname__}, "
        "which a checkpoint cannot hold (tensors, arrays, numbers, strings, booleans, None, "
        "lists, tuples and dicts only)"
    )


def _add_tensor(tensor: torch.Tensor, path: str, tensors: dict[str, torch.Tensor],
                storages: set[int]) -> str:
    key = path.lstrip("/") or "tensor"
    if key in tensors:
        suffix = 2
        while f"{key}#{suffix}" in tensors:
            suffix += 1
        key = f"{key}#{suffix}"
    tensor = tensor.detach().cpu().contiguous()
    pointer = tensor.untyped_storage().data_ptr()
    if pointer in storages:  # safetensors refuses tensors sharing memory: store a copy
        tensor = tensor.clone()
        pointer = tensor.untyped_storage().data_ptr()
    if pointer:
        storages.add(pointer)
    tensors[key] = tensor
    return key


def _decode(node: Any, tensors: dict[str, torch.Tensor], used: set[str], file: Path,
            path: str) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(item, tensors, used, file, f"{path}/{i}") for i, item in enumerate(node)]
    if not isinstance(node, dict) or len(node) != 1 or next(iter(node)) not in _MARKERS:
        raise CheckpointError(f"{file}: {path or 'the state'} is not a value of this format: "
                              f"{str(node)[:80]}")
    kind, body = next(iter(node.items()))
    if kind in ("tensor", "ndarray"):
        if not isinstance(body, str) or body not in tensors:
            raise CheckpointError(f"{file}: {path or 'the state'} refers to a tensor {body!r} "
                                  "that the safetensors file does not hold")
        used.add(body)
        return tensors[body] if kind == "tensor" else tensors[body].numpy()
    if kind == "float":
        if body not in ("nan", "inf", "-inf"):
            raise CheckpointError(f"{file}: {path}: {body!r} is not nan, inf or -inf")
        return float(body)
    if kind == "tuple" and isinstance(body, list):
        return tuple(_decode(item, tensors, used, file, f"{path}/{i}")
                     for i, item in enumerate(body))
    if kind == "dict" and isinstance(body, dict):
        return {key: _decode(item, tensors, used, file, f"{path}/{key}")
                for key, item in body.items()}
    if kind == "items" and isinstance(body, list):
        result = {}
        for pair in body:
            if (not isinstance(pair, list) or len(pair) != 2
                    or isinstance(pair[0], (list, dict))):
                raise CheckpointError(f"{file}: {path}: {str(pair)[:80]} is not a [key, value] pair")
            result[pair[0]] = _decode(pair[1], tensors, used, file, f"{path}/{pair[0]}")
        return result
    raise CheckpointError(f"{file}: {path or 'the state'}: malformed {kind!r} entry")


# --- random states --------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """This process's random states: torch (CPU, and CUDA when available), NumPy, Python."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], file: str | Path) -> None:
    """Set the random states rng_state() returned (or an old checkpoint's equivalents)."""
    try:
        random.setstate(_python_rng(state["python"]))
        numpy_state = state["numpy"]
        np.random.set_state((numpy_state[0], np.asarray(numpy_state[1], dtype=np.uint32),
                             *numpy_state[2:]))
        torch.set_rng_state(state["torch"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        raise CheckpointError(f"{file}: the random states cannot be restored: {error!r}") from None
    if "cuda" in state and torch.cuda.is_available():
        saved = list(state["cuda"])
        for device, device_state in enumerate(saved[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)


def _python_rng(value: Any) -> tuple:
    """random.setstate needs tuples all the way down (JSON and old pickles may give lists)."""
    version, internal, gauss = value
    return (int(version), tuple(int(number) for number in internal), gauss)


# --- the manifest -----------------------------------------------------------------------------

def file_record(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def write_manifest(folder: Path, step: int, files: list[str], **details: Any) -> Path:
    """progress.json, written last: the step, the details given, every file's size and hash."""
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} lacks {missing} when its manifest is written")
    return write_json(folder / MANIFEST, {
        "format": FORMAT, "version": VERSION, "step": step, **details,
        "files": {name: file_record(folder / name) for name in sorted(files)},
    })


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a checkpoint folder (CheckpointError naming it when unreadable)."""
    try:
        manifest = read_json(folder / MANIFEST, "checkpoint manifest")
    except (OSError, ValueError) as error:
        raise CheckpointError(str(error)) from None
    step = manifest.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{folder / MANIFEST} has no step (got {step!r})")
    return manifest


def is_legacy(manifest: dict[str, Any]) -> bool:
    """A checkpoint of accelerate's save_state, from purifyguard before this format."""
    return "format" not in manifest and "files" not in manifest


def checkpoint_folders(checkpoint_dir: str | Path) -> list[Path]:
    """Every complete-looking step_N folder (no .partial), newest first."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if _STEP_FOLDER.match(path.name) and path.is_dir()]
    return sorted(found, key=folder_step, reverse=True)


def folder_step(path: Path) -> int:
    return int(_STEP_FOLDER.match(path.name).group(1))


def problem(folder: Path, process_index: int = 0) -> str | None:
    """Why the checkpoint folder cannot be resumed from (None when it is intact)."""
    try:
        manifest = read_manifest(folder)
    except CheckpointError as error:
        return str(error)
    if manifest["step"] != folder_step(folder):
        return f"its manifest says step {manifest['step']}, its name step {folder_step(folder)}"
    if is_legacy(manifest):
        return _legacy_problem(folder, process_index)
    if manifest.get("format") != FORMAT:
        return f"{folder / MANIFEST} is not a purifyguard checkpoint manifest"
    if manifest.get("version") != VERSION:
        return f"it is of checkpoint format version {manifest.get('version')!r}; this " \
               f"purifyguard reads version {VERSION}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return f"{folder / MANIFEST} lists no files"
    for name, record in files.items():
        path = folder / name
        if Path(name).name != name or name in (".", "..", MANIFEST):
            return f"its manifest lists {name!r}, which is not a file of the checkpoint folder"
        if not isinstance(record, dict):
            return f"its manifest's entry for {name} is not a record"
        if not path.is_file() or path.is_symlink():
            return f"{name} is missing (or is a link)"
        size = path.stat().st_size
        if size != record.get("bytes"):
            return f"{name} has {size} bytes, the manifest says {record.get('bytes')} " \
                   "(a cut or damaged file)"
        if file_record(path)["sha256"] != record.get("sha256"):
            return f"{name} does not match its sha256 in the manifest (changed or damaged bytes)"
    needed = {f"{STATE}.json", f"{STATE}.safetensors", f"rng_{process_index}.json",
              f"rng_{process_index}.safetensors"}
    if needed - set(files):
        return f"its manifest lists no {sorted(needed - set(files))}"
    return None


# --- checkpoints of earlier versions (accelerate's save_state) ---------------------------------

LEGACY_MODEL = "model{}.safetensors"
LEGACY_OPTIMIZER = "optimizer{}.bin"
LEGACY_SCHEDULER = "scheduler{}.bin"
LEGACY_SCALER = "scaler.pt"
LEGACY_RNG = "random_states_{}.pkl"
LEGACY_CUSTOM = "custom_checkpoint_{}.pkl"


def _legacy_name(pattern: str, index: int) -> str:
    return pattern.format("" if index == 0 else f"_{index}")


def _legacy_problem(folder: Path, process_index: int) -> str | None:
    model = folder / _legacy_name(LEGACY_MODEL, 0)
    if not model.is_file():
        return f"{model.name} is missing"
    try:
        with safe_open(str(model), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as error:
        return f"{model.name} is not a readable safetensors file ({error})"
    # Every process's random states, so that all processes judge the folder alike.
    processes = max(legacy_processes(folder), process_index + 1)
    names = [_legacy_name(LEGACY_OPTIMIZER, 0), *(LEGACY_RNG.format(i) for i in range(processes))]
    for name in names:
        path = folder / name
        if not path.is_file() or path.stat().st_size == 0:
            return f"{name} is missing or empty"
    return None


def legacy_processes(folder: Path) -> int:
    """How many processes wrote an old checkpoint: one random_states_<i>.pkl each."""
    found = [re.fullmatch(r"random_states_(\d+)\.pkl", path.name)
             for path in folder.glob(LEGACY_RNG.format("*"))]
    return max((int(match.group(1)) + 1 for match in found if match), default=0)


def read_legacy(folder: Path, process_index: int, models: int, optimizers: int, schedulers: int,
                objects: int, scaler: bool) -> dict[str, Any]:
    """The state of an accelerate save_state folder, read without unpickling anything that is not
    plain tensors, numbers and containers: {"models", "optimizers", "schedulers", "objects",
    "scaler", "rng", "accelerator_step"}. Files are named as accelerate names them: model.safetensors,
    model_1.safetensors, optimizer.bin, optimizer_1.bin, scheduler.bin, scaler.pt,
    random_states_<process>.pkl, custom_checkpoint_<k>.pkl (k in registration order)."""
    customs = sorted(folder.glob(LEGACY_CUSTOM.format("*")))
    if len(customs) != objects:
        raise CheckpointError(
            f"{folder} holds {len(customs)} custom_checkpoint_N.pkl files; this routine "
            f"registers {objects} objects for checkpointing"
        )
    state: dict[str, Any] = {"models": [], "optimizers": [], "schedulers": [], "objects": []}
    for index in range(models):
        path = folder / _legacy_name(LEGACY_MODEL, index)
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist")
        try:
            state["models"].append(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
    for index in range(optimizers):
        state["optimizers"].append(safe_torch_load(folder / _legacy_name(LEGACY_OPTIMIZER, index)))
    for index in range(schedulers):
        state["schedulers"].append(safe_torch_load(folder / _legacy_name(LEGACY_SCHEDULER, index)))
    for index in range(objects):
        state["objects"].append(safe_torch_load(folder / LEGACY_CUSTOM.format(index)))
    state["scaler"] = safe_torch_load(folder / LEGACY_SCALER) if scaler else None
    rng_file = folder / LEGACY_RNG.format(process_index)
    rng = safe_torch_load(rng_file, numpy=True)
    if not isinstance(rng, dict):
        raise CheckpointError(f"{rng_file} does not hold random states")
    state["rng"] = {"python": rng.get("random_state"), "numpy": rng.get("numpy_random_seed"),
                    "torch": rng.get("torch_manual_seed")}
    if "torch_cuda_manual_seed" in rng:
        state["rng"]["cuda"] = rng["torch_cuda_manual_seed"]
    state["accelerator_step"] = rng.get("step")
    return state


def safe_torch_load(path: Path, numpy: bool = False) -> Any:
    """torch.load(weights_only=True): plain tensors, numbers and containers (and, with numpy,
    NumPy arrays); anything else, a damaged file included, is refused with the file named."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_globals() if numpy else []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError,
            IndexError, AttributeError, ImportError) as error:  # what a damaged file raises
        reason = str(error).strip().splitlines()
        raise CheckpointError(
            f"{path} is refused: it cannot be loaded as plain tensors and numbers "
            "(torch.load with weights_only=True), so it is damaged or holds objects whose "
            f"loading would run code, which a checkpoint may not do. ({type(error).__name__}: "
            f"{_unpickler_reason(reason)})"
        ) from None


def _unpickler_reason(lines: list[str]) -> str:
    """The informative line of torch's weights_only error (it names the refused global)."""
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line or "global" in line:
            # Not torch's advice to allow-list the global: that would let the file run code.
            return line.split(" Please use")[0].strip()[:300]
    return (lines[-1].strip() if lines else "")[:300] or "no details"


def _numpy_globals() -> list[Any]:
    """What an old random_states_N.pkl needs beyond tensors: NumPy's array reconstruction."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    found = [_reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [dtypes.UInt32DType]
    return found
