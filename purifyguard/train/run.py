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
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

CHECKPOINT_PREFIX = "step_"


class TrainingRun:
    """An accelerate run with atomic checkpoints every N steps and --resume.

    The routine keeps its own loop in view; this object only holds what is the same for all:
    seeding, preparing, logging to trackers, saving and restoring state, the progress bar.
    """

    def __init__(
        self, args: argparse.Namespace, routine: str, argv: list[str] | None = None
    ) -> None:
        self.args = args
        self.routine = routine
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.output_dir = Path(args.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.metrics_file = self.output_dir / "metrics.jsonl"
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
        if tracker:
            self.accelerator.init_trackers(routine, config=_loggable(vars(args)))
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
            if not args.resume:  # a fresh run starts a fresh metrics log; a resumed one appends
                self.metrics_file.unlink(missing_ok=True)
        self.start_step = 0
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

    def resume(self) -> int:
        """Restore the last complete checkpoint when --resume is given; the step to start from."""
        if not self.args.resume:
            return 0
        last = last_checkpoint(self.checkpoint_dir)
        if last is None:
            self.accelerator.print(f"--resume: no checkpoint in {self.checkpoint_dir}, starting at 0")
            return 0
        self.accelerator.load_state(str(last))
        self.start_step = json.loads((last / "progress.json").read_text())["step"]
        self.accelerator.print(f"resumed from {last} at step {self.start_step}")
        if self.is_main and self.metrics_file.exists():  # drop lines logged after the checkpoint
            kept = [line for line in read_metrics(self.output_dir) if line["step"] <= self.start_step]
            self.metrics_file.write_text("".join(json.dumps(line) + "\n" for line in kept))
        return self.start_step

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
            "command": shlex.join(["purifyguard", "train", self.routine, *self.argv]),
            "steps": self.args.steps,
            "batch size (per process)": self.args.batch_size,
            "processes": self.accelerator.num_processes,
            "data": f"{self.args.data} (training split)",
            "seed": self.args.seed,
            **measured,
        }

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


def read_metrics(output_dir: str | Path) -> list[dict[str, float]]:
    """The lines of a run's metrics.jsonl, one dict per logged step (a resumed run appends)."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _distributed_without_gpu() -> bool:
    """Several processes (torchrun, accelerate launch --multi_gpu) on a machine with no GPU:
    accelerate joins them over gloo only when told to use the CPU, else each would run alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _loggable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}
