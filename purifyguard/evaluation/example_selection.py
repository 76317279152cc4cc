"""Which examples an evaluation uses: the first n of an (images, labels) pair or of one of
purifyguard's data sets, n drawn with the seed and stratified across the classes of any other
Dataset; and the fingerprint of the chosen examples that a resumed run is checked against.

The evaluation entry points (harness.py) and the sanity checks (sanity.py) both select through
here, so the sanity checks need nothing from the harness to choose their examples.
"""

from __future__ import annotations

import zlib

import torch
from torch.utils.data import Dataset

from purifyguard.evaluation.seeds import derive_seed
from purifyguard.validation import check_int

Data = Dataset | tuple[torch.Tensor, torch.Tensor]


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
    return f"{zlib.crc32(data):08x}-{zlib.crc32(labels.cpu().numpy().tobytes()):08x}"
