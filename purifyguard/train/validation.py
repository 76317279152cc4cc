"""Validation while training: clean and robust accuracy on the held-out split, the best network kept.

Robust networks overfit (Rice et al., 2020): robust accuracy on held-out images peaks and then
falls while training accuracy keeps rising. So a routine that holds out a validation split
measures it every so often (here, under torchattacks' L-inf PGD with a random start), logs the
learning curve and keeps the network of the best measurement as its export.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from purifyguard.files import read_json, write_figure, write_json

if TYPE_CHECKING:
    from purifyguard.train.run import TrainingRun

BEST_FOLDER = "best"
BEST_RECORD = "best.json"
CURVE_PICTURE = "learning_curve.png"


@dataclass
class ValidationResult:
    """One measurement: after `step` optimizer steps, accuracy on the validation images.
    robust_accuracy is None when the run validates clean accuracy only."""

    step: int
    clean_accuracy: float
    robust_accuracy: float | None

    def score(self) -> float:
        """What "best" means: robust accuracy when measured, clean accuracy otherwise."""
        return self.clean_accuracy if self.robust_accuracy is None else self.robust_accuracy

    def metrics(self) -> dict[str, float]:
        """The metrics.jsonl fields of this measurement."""
        values = {"validation_clean_accuracy": self.clean_accuracy}
        if self.robust_accuracy is not None:
            values["validation_robust_accuracy"] = self.robust_accuracy
        return values


def validation_tensors(validation: Dataset, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` validation examples as (images, labels) tensors."""
    examples = [validation[i] for i in range(min(count, len(validation)))]
    images = torch.stack([image for image, _ in examples])
    labels = torch.tensor([int(label) for _, label in examples])
    return images, labels


def measure(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, step: int, eps: float,
    attack_steps: int, seed: int, batch_size: int = 256,
) -> ValidationResult:
    """Clean accuracy, and accuracy under L-inf PGD (eps, attack_steps of eps / 4, random start)
    when attack_steps > 0, with the network in eval mode.

    The attack's random start comes from `seed` inside a forked random state, so validating
    changes nothing in the training run's own random sequence (a resumed run stays the same)."""
    import torchattacks

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    attack = None
    if attack_steps > 0 and eps > 0:
        attack = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=attack_steps,
                                  random_start=True)
    clean = robust = 0
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for begin in range(0, len(labels), batch_size):
            x = images[begin:begin + batch_size].to(device)
            y = labels[begin:begin + batch_size].to(device)
            with torch.no_grad():
                clean += (model(x).argmax(1) == y).sum().item()
            if attack is not None:
                x_adv = attack(x, y)
                with torch.no_grad():
                    robust += (model(x_adv).argmax(1) == y).sum().item()
    model.train(was_training)
    count = len(labels)
    return ValidationResult(step, clean / count, robust / count if attack is not None else None)


def history_from_metrics(lines: list[dict[str, Any]]) -> list[ValidationResult]:
    """The validation measurements logged in a run's metrics.jsonl (a resumed run keeps those up
    to its checkpoint)."""
    return [
        ValidationResult(int(line["step"]), float(line["validation_clean_accuracy"]),
                         line.get("validation_robust_accuracy"))
        for line in lines if "validation_clean_accuracy" in line
    ]


class BestNetwork:
    """output_dir/best: the network of the best validation so far, with best.json saying which.

    offer() saves the network when a measurement beats every earlier one (ties keep the
    earlier). After a resume, restore() forgets a best saved after the checkpoint resumed from,
    since those steps will be trained again."""

    def __init__(self, output_dir: str | Path) -> None:
        self.folder = Path(output_dir) / BEST_FOLDER
        self.record = Path(output_dir) / BEST_RECORD
        self.best: ValidationResult | None = None

    def restore(self, history: list[ValidationResult]) -> None:
        saved = self.saved()
        if saved is not None and any(asdict(saved) == asdict(item) for item in history):
            self.best = saved
        else:
            self.record.unlink(missing_ok=True)
            self.best = None

    def saved(self) -> ValidationResult | None:
        """The measurement whose network is in the best folder, if any."""
        if not self.record.exists() or not self.folder.exists():
            return None
        try:
            return ValidationResult(**read_json(self.record))
        except (TypeError, ValueError):
            return None

    def offer(self, result: ValidationResult, save: Any) -> bool:
        """Call save(folder) and record `result` when it is the best so far."""
        if self.best is not None and result.score() <= self.best.score():
            return False
        self.record.unlink(missing_ok=True)  # a kill while saving leaves no stale record
        save(self.folder)
        write_json(self.record, asdict(result))
        self.best = result
        return True


def curve_table(history: list[ValidationResult], best: ValidationResult | None) -> str:
    """The learning curve as a Markdown table, the best measurement marked."""
    robust = any(item.robust_accuracy is not None for item in history)
    header = "| step | clean accuracy |" + (" robust accuracy |" if robust else "") + " kept |"
    rule = "|---|---|" + ("---|" if robust else "") + "---|"
    rows = []
    for item in history:
        cells = [str(item.step), f"{item.clean_accuracy:.4f}"]
        if robust:
            cells.append("" if item.robust_accuracy is None else f"{item.robust_accuracy:.4f}")
        cells.append("best" if best is not None and item.step == best.step else "")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *rows])


def plot_curve(history: list[ValidationResult], path: str | Path, title: str) -> Path:
    """Validation accuracy against optimizer steps as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [item.step for item in history]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(steps, [item.clean_accuracy for item in history], marker="o", label="clean")
    robust = [(item.step, item.robust_accuracy) for item in history
              if item.robust_accuracy is not None]
    if robust:
        axes.plot(*zip(*robust), marker="o", label="robust (PGD)")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("validation accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return write_figure(figure, path)


class Validator:
    """The routine's validation: when to measure, the learning curve, the best network kept."""

    def __init__(self, args: argparse.Namespace, run: TrainingRun, validation: Dataset | None,
                 training_size: int) -> None:
        self.args, self.run = args, run
        self.active = validation is not None
        self.history: list[ValidationResult] = []
        self.best = BestNetwork(run.output_dir)
        if not self.active:
            return
        self.images, self.labels = validation_tensors(validation, args.validation_images)
        per_step = args.batch_size * args.grad_accum * run.accelerator.num_processes
        self.every = args.validate_every or max(1, training_size // per_step)
        robust = args.beta > 0 and args.pgd_steps > 0 and args.eps > 0
        self.attack_steps = args.validation_attack_steps if robust else 0

    def restore(self) -> None:
        """After resume(): the measurements up to the checkpoint, and the best among them."""
        from purifyguard.train.run import read_metrics

        if not self.active:
            return
        self.history = history_from_metrics(read_metrics(self.run.output_dir)) \
            if self.run.metrics_file.exists() else []
        if self.run.is_main:
            self.best.restore(self.history)
        self.run.accelerator.wait_for_everyone()

    def should(self, step: int) -> bool:
        return self.active and self.run.should(self.every, step)

    def validate(self, model: nn.Module, step: int, bar: Any) -> None:
        """Measure on the main process, log it, keep the network if it is the best so far."""
        if self.run.is_main:
            result = measure(model, self.images, self.labels, step=step, eps=self.args.eps,
                             attack_steps=self.attack_steps, seed=self.args.validation_seed)
            self.history.append(result)
            self.best.offer(result, lambda folder: save_network(model, folder))
            self.run.log(bar, step, result.metrics())
        self.run.accelerator.wait_for_everyone()

    def record(self) -> dict[str, str]:
        """The model card's training-table lines about validation."""
        if not self.active:
            return {}
        attack = (f"L-inf PGD-{self.attack_steps} (eps {self.args.eps:g}, step eps / 4, "
                  f"random start)" if self.attack_steps else "none (clean accuracy decides)")
        chosen = self.best.best
        exported = (f"best validated network, step {chosen.step}"
                    if self.args.export == "best" and chosen is not None else "last step")
        return {"validation": f"{len(self.labels)} held-out training images every "
                              f"{self.every} steps; attack: {attack}",
                "exported": exported}

    def card_sections(self, final: Path) -> list[str]:
        """The learning curve (a table and learning_curve.png in the exported folder)."""
        if not self.active or not self.history:
            return []
        plot_curve(self.history, final / CURVE_PICTURE, "validation accuracy")
        return [f"## Learning curve\n\nAccuracy on {len(self.labels)} held-out training "
                f"images (never trained on).\n\n![learning curve]({CURVE_PICTURE})\n\n"
                + curve_table(self.history, self.best.best)]


def save_network(model: nn.Module, folder: Path) -> None:
    from purifyguard.guidance_network_format import save_guidance_network

    save_guidance_network(model, folder)

