"""A PNG grid showing what the defence does: clean, adversarial and purified images, each with
the model's prediction."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from purifyguard.evaluation.seeds import seed_everything
from purifyguard.files import write_atomic


@torch.no_grad()
def save_grid(
    model: nn.Module, clean: torch.Tensor, adversarial: torch.Tensor, labels: torch.Tensor,
    path: str | Path, *, seed: int = 0, class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """One row per example: clean | adversarial | purified adversarial, titled with predictions.

    The purified column is one purification (noise from `seed`); an undefended model shows the
    adversarial image again. A prediction in red is wrong.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = next((p.device for p in model.parameters()), clean.device)
    clean, adversarial = clean.to(device), adversarial.to(device)
    seed_everything(seed)
    purified = model.purify(adversarial) if hasattr(model, "purify") else adversarial
    columns = [
        ("clean", clean, model(clean)),
        ("adversarial", adversarial, model(adversarial)),
        ("purified", purified, model.classify(purified) if hasattr(model, "classify") else None),
    ]
    rows = len(labels)
    figure, axes = plt.subplots(rows, 3, figsize=(6, 2.2 * rows + 0.5), squeeze=False)
    for row in range(rows):
        truth = int(labels[row])
        for col, (name, batch, logits) in enumerate(columns):
            axis = axes[row][col]
            image = batch[row].detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
            axis.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray",
                        vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if col == 0:
                axis.set_ylabel(f"label {class_names[truth] if class_names else truth}", fontsize=8)
            text = name if row == 0 else ""
            if logits is not None:
                predicted = int(logits[row].argmax())
                label = class_names[predicted] if class_names else str(predicted)
                text = f"{text}\n{label}" if text else label
                axis.set_title(text, fontsize=8, color="black" if predicted == truth else "red")
            else:
                axis.set_title(text, fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path = Path(path)
    picture = io.BytesIO()
    figure.savefig(picture, dpi=100, format="png")
    plt.close(figure)
    return write_atomic(path, picture.getvalue())
