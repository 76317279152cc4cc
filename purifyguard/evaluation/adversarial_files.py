"""Every batch's adversarial images of each model and attack, kept in the output folder
(adversarial/<model>--<attack>--batch<b>.safetensors, with the key of the batch's stored record
in the file's metadata) and read back, checked: the first batch for the image grid
(grid-<model>-<attack>.png), every batch for the headline, which takes an evaluation's examples
instead of attacking again (stored_examples)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from purifyguard.evaluation.attacks import AttackSpec
from purifyguard.evaluation.grid import save_grid
from purifyguard.evaluation.seeds import derive_seed
from purifyguard.files import check_inside, write_atomic

ADVERSARIAL_TENSOR = "adversarial"
KEY_METADATA = "key"  # the stored batch record the images belong to


def adversarial_path(output_dir: str | Path, model_name: str, attack_name: str,
                     batch: int = 0) -> Path:
    """Where a batch's adversarial images go: safetensors, never a pickle (a planted pickle
    would run code when loaded)."""
    return (Path(output_dir) / "adversarial"
            / f"{model_name}--{attack_name}--batch{batch}.safetensors")


def save_adversarial(output_dir, model_name: str, attack_name: str, x_adv: torch.Tensor,
                     batch: int = 0, key: str = "") -> None:
    from safetensors.torch import save

    path = adversarial_path(output_dir, model_name, attack_name, batch)
    write_atomic(path, save({ADVERSARIAL_TENSOR: x_adv.detach().cpu().float().contiguous()},
                            metadata={KEY_METADATA: key}))


def stored_examples(output_dir: Path, model_name: str, attack_name: str,
                    keys: dict[int, str], like: torch.Tensor) -> dict[int, torch.Tensor]:
    """batch -> its adversarial images, for each batch of `keys` (batch -> the key of its
    stored record) whose file exists and was written with that key (a file of another model
    version or attack setting is passed over); a file that cannot be read is a ValueError."""
    from safetensors import SafetensorError, safe_open

    found = {}
    for batch, key in keys.items():
        path = adversarial_path(output_dir, model_name, attack_name, batch)
        if not path.is_file():
            continue
        check_inside(path, Path(output_dir), "adversarial image file")
        try:
            with safe_open(str(path), framework="pt") as file:
                written_for = (file.metadata() or {}).get(KEY_METADATA)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"adversarial image file {path} cannot be read ({error}); delete "
                             "it to attack its batch again") from None
        if written_for == key:
            found[batch] = load_adversarial(path, output_dir, like)
    return found


def load_adversarial(path: Path, output_dir: str | Path, like: torch.Tensor) -> torch.Tensor:
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


def save_adversarial_grid(model: nn.Module, model_name: str, spec: AttackSpec,
                          images: torch.Tensor, labels: torch.Tensor, output_dir: str | Path,
                          seed: int, class_names: Sequence[str] | None) -> None:
    """grid-<model>-<attack>.png from the stored first batch (nothing when there is none)."""
    path = adversarial_path(output_dir, model_name, spec.label)
    if not path.exists():
        return
    adversarial = load_adversarial(path, output_dir, images)
    count = min(8, len(adversarial), len(images))
    save_grid(
        model, images[:count], adversarial[:count], labels[:count],
        Path(output_dir) / f"grid-{model_name}-{spec.label}.png",
        seed=derive_seed(seed, "grid", spec.label), class_names=class_names,
        title=f"{model_name}: {spec.label} ({spec.norm}, eps={spec.eps:g}, {spec.gradient_mode})",
    )
