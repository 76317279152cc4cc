"""What every training routine shares: the accelerator, checkpoints, resume and progress."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

CHECKPOINT_PREFIX = "step_"


class TrainingRun:
    """An accelerate run with atomic checkpoints every N steps and --resume.

    The routine keeps its own loop in view; this object only holds what is the same for all:
    seeding, preparing, logging to trackers, saving and restoring state, the progress bar.
    """

    def __init__(self, args: argparse.Namespace, routine: str) -> None:
        self.args = args
        self.routine = routine
        self.output_dir = Path(args.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        tracker = "tensorboard" if importlib.util.find_spec("tensorboard") else None
        self.accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.grad_accum,
            log_with=tracker,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
        )
        set_seed(args.seed, device_specific=True)
        if tracker:
            self.accelerator.init_trackers(routine, config=_loggable(vars(args)))
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
        self._started = time.perf_counter()
        self._images = 0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def loader(self, dataset: Dataset, shuffle: bool = True) -> DataLoader:
        generator = torch.Generator().manual_seed(self.args.seed)
        return DataLoader(
            dataset, batch_size=self.args.batch_size, shuffle=shuffle, drop_last=True,
            num_workers=self.args.num_workers, generator=generator,
        )

    def batches(self, loader: DataLoader) -> Iterator[Any]:
        """Batches forever, epoch after epoch."""
        epoch = 0
        while True:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    def resume(self) -> int:
        """Restore the last complete checkpoint when --resume is given; the step to start from."""
        if not self.args.resume:
            return 0
        last = last_checkpoint(self.checkpoint_dir)
        if last is None:
            self.accelerator.print(f"--resume: no checkpoint in {self.checkpoint_dir}, starting at 0")
            return 0
        self.accelerator.load_state(str(last))
        step = json.loads((last / "progress.json").read_text())["step"]
        self.accelerator.print(f"resumed from {last} at step {step}")
        return step

    def save_checkpoint(self, step: int) -> Path:
        """Write the whole training state to step_N, atomically: a .partial folder, then rename."""
        final = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
        partial = final.with_name(final.name + ".partial")
        if self.is_main and partial.exists():
            shutil.rmtree(partial)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial))
        self.accelerator.wait_for_everyone()
        if self.is_main:
            (partial / "progress.json").write_text(json.dumps({"step": step}) + "\n")
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            self._prune_checkpoints()
        self.accelerator.wait_for_everyone()
        return final

    def _prune_checkpoints(self) -> None:
        complete = sorted(self.checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*[0-9]"))
        for old in complete[: -self.args.keep_checkpoints]:
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
        """Metrics to the trackers and the progress bar (main process)."""
        metrics = {**metrics, "images_per_s": self.throughput()}
        self.accelerator.log(metrics, step=step)
        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})

    def should(self, every: int, step: int) -> bool:
        """True on every `every`-th completed step (1-based) and on the last one."""
        return (step + 1) % every == 0 or step + 1 == self.args.steps

    def finish(self) -> None:
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def last_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint (partial folders from an interrupted save are skipped)."""
    complete = sorted(
        path for path in Path(checkpoint_dir).glob(f"{CHECKPOINT_PREFIX}*[0-9]")
        if (path / "progress.json").exists()
    )
    return complete[-1] if complete else None


def _loggable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}
