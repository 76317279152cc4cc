"""What every training routine shares: the accelerator, checkpoints, resume and progress."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from purifyguard.files import read_json, write_atomic, write_json
from purifyguard.provenance import portable_command
from purifyguard.threads import use_threads
from purifyguard.train import checkpoint
from purifyguard.train.checkpoint import CheckpointError
from purifyguard.train.options import defining_options, option_differences

CHECKPOINT_PREFIX = checkpoint.PREFIX


class TrainingRun:
    """An accelerate run with atomic checkpoints every N steps and --resume.

    The routine keeps its own loop in view; this object only holds what is the same for all:
    seeding, preparing, logging to trackers, saving and restoring state, the progress bar.
    What a checkpoint holds: the models, optimizers and lr schedulers given to prepare(), the
    objects given to register() (anything with state_dict / load_state_dict, e.g. an EMA), the
    gradient scaler and every process's random states (purifyguard.train.checkpoint: safetensors
    and JSON, never pickle).

    With --resume the newest intact checkpoint is chosen as the run starts (a damaged one is
    skipped, and said so), and a run whose defining options differ from it is refused before any
    work starts; resume() restores it once everything is prepared and registered.
    extendable: --steps may grow on resume (a routine whose learning-rate schedule is built for
    the total number of steps passes False).
    """

    def __init__(
        self, args: argparse.Namespace, routine: str, argv: list[str] | None = None,
        extendable: bool = True,
    ) -> None:
        self.args = args
        self.extendable = extendable
        self.routine = routine
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.output_dir = Path(args.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.metrics_file = self.output_dir / "metrics.jsonl"
        use_threads(getattr(args, "threads", None))
        tracker = "tensorboard" if importlib.util.find_spec("tensorboard") else None
        self.accelerator = Accelerator(
            cpu=_distributed_without_gpu(),
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.grad_accum,
            log_with=tracker,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
        )
        set_seed(args.seed, device_specific=True)
        self.start_step = 0
        self._started = time.perf_counter()
        self._images = 0
        self._models: list[torch.nn.Module] = []
        self._optimizers: list[torch.optim.Optimizer] = []
        self._schedulers: list[Any] = []
        self._objects: dict[str, Any] = {}
        # Chosen and checked now, before the routine loads data or builds models.
        self._resume_from = self._choose_checkpoint() if args.resume else None
        if tracker:
            self.accelerator.init_trackers(routine, config=_loggable(vars(args)))
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.output_dir / "args.json", vars(args))
            if not args.resume:  # a fresh run starts a fresh metrics log; a resumed one appends
                self.metrics_file.unlink(missing_ok=True)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def training_part(self, dataset: Dataset) -> Dataset:
        """The training set less the --validation-size images held out for validation."""
        if not self.args.validation_size:
            return dataset
        from purifyguard.data import validation_split

        return validation_split(dataset, self.args.validation_size, self.args.validation_seed)[0]

    def validation_part(self, dataset: Dataset) -> Dataset | None:
        """The --validation-size held-out images (None when nothing is held out)."""
        if not self.args.validation_size:
            return None
        from purifyguard.data import validation_split

        return validation_split(dataset, self.args.validation_size, self.args.validation_seed)[1]

    def loader(self, dataset: Dataset, shuffle: bool = True) -> DataLoader:
        generator = torch.Generator().manual_seed(self.args.seed)
        return DataLoader(
            dataset, batch_size=self.args.batch_size, shuffle=shuffle, drop_last=True,
            num_workers=self.args.num_workers, generator=generator,
        )

    def batches(self, loader: DataLoader) -> Iterator[Any]:
        """Batches forever, epoch after epoch. After resume() the batches the restored steps
        already used are drawn and dropped, so a resumed run sees the data an uninterrupted
        one would (the shuffling generator starts again from the seed)."""
        epoch, skip = 0, self.start_step * self.args.grad_accum
        while True:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            for batch in loader:
                if skip > 0:
                    skip -= 1
                    continue
                yield batch
            epoch += 1

    def prepare(self, *objects: Any) -> Any:
        """accelerator.prepare, remembering the models, optimizers and lr schedulers among the
        objects: checkpoints save them and resume() restores them."""
        prepared = self.accelerator.prepare(*objects)
        for item in prepared if isinstance(prepared, tuple) else (prepared,):
            if isinstance(item, torch.nn.Module):
                self._models.append(item)
            elif isinstance(item, torch.optim.Optimizer):
                self._optimizers.append(item)
            elif isinstance(item, (AcceleratedScheduler, torch.optim.lr_scheduler.LRScheduler)):
                self._schedulers.append(item)
        return prepared

    def register(self, name: str, obj: Any) -> None:
        """Save obj.state_dict() in every checkpoint and restore it with obj.load_state_dict() on
        resume (its tensors are moved to the run's device first)."""
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(f"{name}: {type(obj).__name__} has no state_dict/load_state_dict")
        if name in self._objects:
            raise ValueError(f"an object named {name!r} is registered already")
        self._objects[name] = obj

    def resume(self) -> int:
        """Restore the checkpoint chosen at the start when --resume is given; the step to start
        from (0 without --resume, or when there is no checkpoint yet)."""
        if not self.args.resume:
            return 0
        if self._resume_from is not None:
            folder, manifest = self._resume_from
            if checkpoint.is_legacy(manifest):
                self._load_legacy(folder)
            else:
                self._load(folder)
            self.start_step = manifest["step"]
            self.accelerator.print(f"resumed from {folder} at step {self.start_step}")
        if self.is_main and self.metrics_file.exists():  # drop lines logged after the checkpoint
            kept = [line for line in read_metrics(self.output_dir)
                    if line.get("step", 0) <= self.start_step]
            write_atomic(self.metrics_file, "".join(json.dumps(line) + "\n" for line in kept))
        self.accelerator.wait_for_everyone()
        return self.start_step

    def _choose_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest intact checkpoint, after checking that it belongs to a run with the same
        defining options and process count; None when there is none at all."""
        chosen, skipped = _newest_intact(self.checkpoint_dir, self.accelerator.process_index)
        for folder, reason in skipped:
            self.accelerator.print(f"--resume: skipping checkpoint {folder}: {reason}")
        if chosen is None:
            if skipped:
                raise ValueError(
                    f"--resume: no intact checkpoint in {self.checkpoint_dir}; every one is "
                    f"damaged ({'; '.join(f'{f.name}: {r}' for f, r in skipped)}). Remove them "
                    "to start again from step 0, or use another --output-dir."
                )
            self.accelerator.print(
                f"--resume: no checkpoint in {self.checkpoint_dir}, starting at step 0")
            return None
        folder, manifest = chosen
        if checkpoint.is_legacy(manifest):
            saved, source = self._legacy_options(), self.output_dir / "args.json"
            processes = checkpoint.legacy_processes(folder)
        else:
            saved, source = manifest.get("options"), folder / checkpoint.MANIFEST
            processes = manifest.get("processes")
            if manifest.get("routine") != self.routine:
                raise ValueError(f"--resume: {folder} is a checkpoint of `purifyguard train "
                                 f"{manifest.get('routine')}`, not of {self.routine}")
        if saved is not None:
            ignore = frozenset({"steps"}) if self.extendable else frozenset()
            differences = option_differences(saved, vars(self.args), ignore)
            if differences:
                raise ValueError(
                    f"--resume: the options differ from those of the run that wrote {folder} "
                    f"(recorded in {source}):\n  " + "\n  ".join(differences)
                    + "\nResume with the same options, or start a new run in another "
                    "--output-dir."
                )
        if processes != self.accelerator.num_processes:
            raise ValueError(
                f"--resume: {folder} was written by {processes} processes, this run has "
                f"{self.accelerator.num_processes}; resume with {processes} processes"
            )
        if skipped:
            self.accelerator.print(f"--resume: resuming from {folder} (step {manifest['step']})")
        return folder, manifest

    def _legacy_options(self) -> dict[str, Any] | None:
        """An old checkpoint records no options: those of args.json, written by its run."""
        path = self.output_dir / "args.json"
        if not path.exists():
            self.accelerator.print(f"--resume: {path} is missing; the options cannot be checked")
            return None
        return read_json(path, "options file")

    def _state(self) -> dict[str, Any]:
        """The shared training state (main process), as checkpoint.save_tree stores it."""
        return {
            "models": [self.accelerator.unwrap_model(m).state_dict() for m in self._models],
            "optimizers": [optimizer.state_dict() for optimizer in self._optimizers],
            "schedulers": [schedule.state_dict() for schedule in self._schedulers],
            "objects": {name: obj.state_dict() for name, obj in self._objects.items()},
            "scaler": None if self.accelerator.scaler is None
            else self.accelerator.scaler.state_dict(),
            "accelerator_step": self.accelerator.step,
        }

    def _load(self, folder: Path) -> None:
        state = checkpoint.load_tree(folder, checkpoint.STATE)
        file = folder / f"{checkpoint.STATE}.json"
        if not isinstance(state, dict) or set(state) != {"models", "optimizers", "schedulers",
                                                         "objects", "scaler", "accelerator_step"}:
            raise CheckpointError(f"{file} does not hold a training state")
        self._check_counts(file, len(state["models"]), len(state["optimizers"]),
                           len(state["schedulers"]))
        if set(state["objects"]) != set(self._objects):
            raise CheckpointError(f"{file} holds the objects {sorted(state['objects'])}; this "
                                  f"routine registers {sorted(self._objects)}")
        self._restore(file, state["models"], state["optimizers"], state["schedulers"],
                      [state["objects"][name] for name in self._objects], state["scaler"],
                      state["accelerator_step"])
        rng = f"rng_{self.accelerator.process_index}"
        checkpoint.restore_rng(checkpoint.load_tree(folder, rng), folder / f"{rng}.json")

    def _load_legacy(self, folder: Path) -> None:
        state = checkpoint.read_legacy(
            folder, self.accelerator.process_index, len(self._models), len(self._optimizers),
            len(self._schedulers), len(self._objects), self.accelerator.scaler is not None,
        )
        models = []
        for model, weights in zip(self._models, state["models"]):
            own = self.accelerator.unwrap_model(model).state_dict()
            if not set(weights) & set(own) and all(k.startswith("module.") for k in weights):
                weights = {k.removeprefix("module."): v for k, v in weights.items()}  # DDP's
            models.append(weights)
        self._restore(folder, models, state["optimizers"], state["schedulers"],
                      state["objects"], state["scaler"], state["accelerator_step"])
        checkpoint.restore_rng(state["rng"], folder / checkpoint.LEGACY_RNG.format(
            self.accelerator.process_index))

    def _check_counts(self, file: Path, models: int, optimizers: int, schedulers: int) -> None:
        found = (models, optimizers, schedulers)
        wanted = (len(self._models), len(self._optimizers), len(self._schedulers))
        if found != wanted:
            raise CheckpointError(f"{file} holds {found} (models, optimizers, lr schedulers); "
                                  f"this routine has {wanted}")

    def _restore(self, file: Path, models: list, optimizers: list, schedulers: list,
                 objects: list, scaler: Any, step: Any) -> None:
        try:
            for model, weights in zip(self._models, models):
                self.accelerator.unwrap_model(model).load_state_dict(weights)
            for optimizer, state in zip(self._optimizers, optimizers):
                optimizer.load_state_dict(state)
            for schedule, state in zip(self._schedulers, schedulers):
                schedule.load_state_dict(state)
            for obj, state in zip(self._objects.values(), objects):
                obj.load_state_dict(_to_device(state, self.device))
            if self.accelerator.scaler is not None and scaler is not None:
                self.accelerator.scaler.load_state_dict(scaler)
        except (RuntimeError, KeyError, TypeError, ValueError) as error:
            if isinstance(error, CheckpointError):
                raise
            raise CheckpointError(f"{file}: the saved state does not fit this run's models and "
                                  f"optimizers: {error}") from None
        if isinstance(step, int) and not isinstance(step, bool):
            self.accelerator.step = step

    def save_checkpoint(self, step: int) -> Path:
        """Write the whole training state to step_N, atomically: a .partial folder, then rename.

        The main process writes the shared state, every process its own random states; the
        manifest (progress.json), with every file's size and sha256, is written last."""
        final = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
        partial = final.with_name(final.name + ".partial")
        if self.is_main:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            checkpoint.save_tree(self._state(), partial, checkpoint.STATE)
        checkpoint.save_tree(checkpoint.rng_state(), partial,
                             f"rng_{self.accelerator.process_index}")
        self.accelerator.wait_for_everyone()
        if self.is_main:
            processes = self.accelerator.num_processes
            files = [f"{checkpoint.STATE}.json", f"{checkpoint.STATE}.safetensors"]
            files += [f"rng_{i}.{ext}" for i in range(processes) for ext in ("json", "safetensors")]
            checkpoint.write_manifest(
                partial, step, files, routine=self.routine, processes=processes,
                options=defining_options(self.args),
            )
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            self._prune_checkpoints()
        self.accelerator.wait_for_everyone()
        return final

    def _prune_checkpoints(self) -> None:
        for old in checkpoint.checkpoint_folders(self.checkpoint_dir)[self.args.keep_checkpoints:]:
            shutil.rmtree(old)

    def progress(self, start: int) -> tqdm:
        return tqdm(
            range(start, self.args.steps), initial=start, total=self.args.steps,
            desc=self.routine, disable=not self.is_main or self.args.no_progress,
            dynamic_ncols=True,
        )

    def count_images(self, per_process: int) -> None:
        self._images += per_process * self.accelerator.num_processes

    def throughput(self) -> float:
        """Images per second across all processes since the run (or resume) began."""
        return self._images / max(time.perf_counter() - self._started, 1e-9)

    def log(self, bar: tqdm, step: int, metrics: dict[str, float]) -> None:
        """Metrics to the trackers, the progress bar and one line of metrics.jsonl (main process)."""
        metrics = {**metrics, "images_per_s": self.throughput()}
        self.accelerator.log(metrics, step=step)
        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
        if self.is_main:
            with open(self.metrics_file, "a") as handle:
                handle.write(json.dumps({"step": step, **metrics}) + "\n")

    def should(self, every: int, step: int) -> bool:
        """True on every `every`-th completed step (1-based) and on the last one."""
        return (step + 1) % every == 0 or step + 1 == self.args.steps

    def training_record(self, **measured: Any) -> dict[str, Any]:
        """How this run trained, for model cards: the command, steps, data, seed, processes."""
        return {
            "command": portable_command(
                shlex.join(["purifyguard", "train", self.routine, *self.argv])),
            "steps": self.args.steps,
            "batch size (per process)": self.args.batch_size,
            "processes": self.accelerator.num_processes,
            "data": f"{self.args.data} (training split)" + (
                f", less {self.args.validation_size} validation images (class-stratified, seed "
                f"{self.args.validation_seed})" if self.args.validation_size else ""),
            "seed": self.args.seed,
            **measured,
        }

    def finish(self) -> None:
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def last_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest intact checkpoint (partial folders from an interrupted save, and checkpoints
    whose files do not match their manifest, are passed over)."""
    chosen, _ = _newest_intact(Path(checkpoint_dir))
    return chosen[0] if chosen else None


def _newest_intact(
    checkpoint_dir: Path, process_index: int = 0
) -> tuple[tuple[Path, dict[str, Any]] | None, list[tuple[Path, str]]]:
    """(the newest intact checkpoint and its manifest, or None; the newer ones passed over and
    why)."""
    skipped = []
    for folder in checkpoint.checkpoint_folders(checkpoint_dir):
        reason = checkpoint.problem(folder, process_index)
        if reason is None:
            return (folder, checkpoint.read_manifest(folder)), skipped
        skipped.append((folder, reason))
    return None, skipped


def read_metrics(output_dir: str | Path) -> list[dict[str, float]]:
    """The lines of a run's metrics.jsonl, one dict per logged step (a resumed run appends).
    A line that is not a JSON object (say one cut short by a kill) is skipped."""
    path = Path(output_dir) / "metrics.jsonl"
    lines = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            lines.append(value)
    return lines


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    return value


def _distributed_without_gpu() -> bool:
    """Several processes (torchrun, accelerate launch --multi_gpu) on a machine with no GPU:
    accelerate joins them over gloo only when told to use the CPU, else each would run alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _loggable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}
