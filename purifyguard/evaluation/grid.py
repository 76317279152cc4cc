"""A PNG grid showing what the defence does: clean, adversarial and purified images, each with
a prediction.

The adversarial and purified columns come from one purification: for a model with a purifier,
the purified column is labelled with the classifier's prediction for the purified image shown,
never a second, unseen purification with its own noise (which could read as the purifier fixing
an image it did not fix). The adversarial column is labelled, as `adversarial_prediction` says,
with that same prediction ("purified", the evaluation grids) or with the bare classifier's
prediction for the adversarial image itself ("bare", the demo's picture: the undefended
classifier fooled beside the defence's answer).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import nn

from purifyguard.evaluation.seeds import seed_everything
from purifyguard.files import write_atomic

AdversarialPrediction = Literal["purified", "bare"]
ADVERSARIAL_PREDICTIONS = ("purified", "bare")


class GridColumn(NamedTuple):
    """One column of the grid: its heading, its images and the predicted classes."""

    name: str
    images: torch.Tensor
    predictions: torch.Tensor


@torch.no_grad()
def grid_columns(
    model: nn.Module, clean: torch.Tensor, adversarial: torch.Tensor, *, seed: int = 0,
    adversarial_prediction: AdversarialPrediction = "purified",
) -> list[GridColumn]:
    """The grid's columns: clean, adversarial and, for a model with a purifier, purified.

    A model with a purifier (`purify` and `classify`, as a PurifiedModel has) purifies the
    adversarial batch once, with noise from `seed`: that purification is the third column,
    labelled with its classification. The adversarial column is labelled with that same
    prediction when `adversarial_prediction` is "purified", or with the bare classifier's
    prediction for the adversarial image, model.classify(adversarial) (no purification), when
    it is "bare". The clean column shows model(clean) (its own purification, not drawn). With
    n_samples > 1 a PurifiedModel averages several purifications; the grid shows and classifies
    one. A model without a purifier (an undefended PurifiedModel, a bare classifier) gets the
    first two columns only, the adversarial one with model(adversarial).
    """
    if adversarial_prediction not in ADVERSARIAL_PREDICTIONS:
        raise ValueError(f"adversarial_prediction must be one of {ADVERSARIAL_PREDICTIONS}, "
                         f"got {adversarial_prediction!r}")
    device = next((p.device for p in model.parameters()), clean.device)
    clean, adversarial = clean.to(device), adversarial.to(device)
    seed_everything(seed)
    clean_predictions = model(clean).argmax(-1)
    if _has_purifier(model):
        purified = model.purify(adversarial)
        defended = model.classify(purified).argmax(-1)
        bare = (model.classify(adversarial).argmax(-1) if adversarial_prediction == "bare"
                else defended)
        return [
            GridColumn("clean", clean, clean_predictions),
            GridColumn("adversarial", adversarial, bare),
            GridColumn("purified", purified, defended),
        ]
    return [
        GridColumn("clean", clean, clean_predictions),
        GridColumn("adversarial", adversarial, model(adversarial).argmax(-1)),
    ]


def _has_purifier(model: nn.Module) -> bool:
    """purify and classify, and a purifier unless the model says it has none (PurifiedModel
    with purifier=None)."""
    return (hasattr(model, "purify") and hasattr(model, "classify")
            and getattr(model, "purifier", True) is not None)


def save_grid(
    model: nn.Module, clean: torch.Tensor, adversarial: torch.Tensor, labels: torch.Tensor,
    path: str | Path, *, seed: int = 0, class_names: Sequence[str] | None = None,
    title: str | None = None, adversarial_prediction: AdversarialPrediction = "purified",
) -> Path:
    """One row per example: clean | adversarial | purified adversarial (no purified column for
    a model without a purifier), titled with predictions (grid_columns: the adversarial image's
    prediction is the classification of the purified image beside it, or with
    adversarial_prediction="bare" the bare classifier's for the adversarial image). A
    prediction in red is wrong.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = grid_columns(model, clean, adversarial, seed=seed,
                           adversarial_prediction=adversarial_prediction)
    rows = len(labels)
    figure, axes = plt.subplots(rows, len(columns), figsize=(2 * len(columns), 2.2 * rows + 0.9),
                                squeeze=False)
    for row in range(rows):
        truth = int(labels[row])
        for col, column in enumerate(columns):
            axis = axes[row][col]
            image = column.images[row].detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
            axis.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray",
                        vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if col == 0:
                axis.set_ylabel(f"label {class_names[truth] if class_names else truth}", fontsize=8)
            text = column.name if row == 0 else ""
            predicted = int(column.predictions[row])
            label = class_names[predicted] if class_names else str(predicted)
            text = f"{text}\n{label}" if text else label
            axis.set_title(text, fontsize=8, color="black" if predicted == truth else "red")
    if len(columns) < 3:
        note = "model without a purifier"
    elif adversarial_prediction == "bare":
        note = ("adversarial: the bare classifier's prediction (no defence);\n"
                "purified: the defended model's prediction (classifier on the purified image)")
    else:
        note = ("adversarial and purified: one purification, both labelled with\nthe "
                "classifier's prediction for the purified image")
    figure.suptitle(f"{title}\n{note}" if title else note, fontsize=8)
    figure.tight_layout()
    path = Path(path)
    picture = io.BytesIO()
    figure.savefig(picture, dpi=100, format="png")
    plt.close(figure)
    return write_atomic(path, picture.getvalue())
