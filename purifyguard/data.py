"""Data sets as images in [0, 1]: Fashion-MNIST, CIFAR-10/100 and ImageFolder trees.

Offline, Fashion-MNIST is read from a folder holding its four IDX files (gzipped or not), such as
/usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist; set it with `root=` or the
PURIFYGUARD_FASHION_MNIST variable. Online, torchvision downloads it.

CIFAR-10 is read from torchvision's python version (`root/cifar-10-batches-py`, or that folder
itself) or from a tree of its ten class folders (`root/{train,test}/<class>/*`, or
`root/<class>/*`), such as a JPEG copy; `cifar10_label` names the copy a result was measured on,
and `cifar10_training_split` reads the training split only from a copy that keeps it apart from
the test split.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from purifyguard.files import cache_folder

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR_BATCHES = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
JPEG_SUFFIXES = (".jpg", ".jpeg")
_DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder")


class ImageTensorDataset(Dataset):
    """Images kept as one uint8 tensor (N, C, H, W), served as float in [0, 1] with int labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]):
        if images.dim() == 3:
            images = images.unsqueeze(1)
        self.images, self.labels, self.classes = images, labels.long(), classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float() / 255, int(self.labels[index])

    def tensors(self, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `count` images as float [0, 1] and their labels, in one go."""
        count = len(self) if count is None else count
        return self.images[:count].float() / 255, self.labels[:count]


def validation_split(dataset: Dataset, size: int, seed: int = 0) -> tuple[Subset, Subset]:
    """(training part, validation part) of a training set: `size` examples held out with the same
    share of every class (quotas by largest remainder), chosen with `seed`; the rest train.
    The same data, size and seed always give the same split."""
    labels = _labels_of(dataset)
    if not 1 <= size < len(labels):
        raise ValueError(
            f"validation size must lie in [1, {len(labels) - 1}] for a training set of "
            f"{len(labels)} examples, got {size}"
        )
    classes, counts = labels.unique(return_counts=True)
    shares = counts.double() * size / len(labels)
    quotas = shares.floor().long()
    remainders = (shares - quotas).tolist()
    missing = size - int(quotas.sum())
    for k in sorted(range(len(classes)), key=lambda k: (-remainders[k], k))[:missing]:
        quotas[k] += 1
    generator = torch.Generator().manual_seed(seed)
    held_out = []
    for label, quota in zip(classes.tolist(), quotas.tolist()):
        members = (labels == label).nonzero().flatten()
        held_out.append(members[torch.randperm(len(members), generator=generator)[:quota]])
    validation = torch.cat(held_out).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[validation] = False
    return (Subset(dataset, keep.nonzero().flatten().tolist()),
            Subset(dataset, validation.tolist()))


def _labels_of(dataset: Dataset) -> torch.Tensor:
    """Every label of a data set, from its labels/targets attribute when it has one."""
    for name in ("labels", "targets"):
        values = getattr(dataset, name, None)
        if values is not None:
            return torch.as_tensor(values).long()
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])


def load_dataset(
    name: str, root: str | Path | None = None, train: bool = True, download: bool = True,
    image_size: int | None = None,
) -> Dataset:
    """A data set of (image in [0, 1] as (C, H, W), label) pairs.

    name: "fashion-mnist", "cifar10", "cifar100" or "imagefolder" (root is then the folder of
    class sub-folders; for an ImageNet-style tree or the cifar10-jpeg copy, point root at its
    train/ or test/ split, or at the parent to have train= choose). "cifar10" reads
    torchvision's files (root holding cifar-10-batches-py, or that folder; downloaded when
    missing and download=True) or a tree of CIFAR-10's class folders (cifar10_image_tree).
    """
    if name == "fashion-mnist":
        return fashion_mnist(root, train=train, download=download)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, root, train, download)
    if name == "imagefolder":
        return _image_folder(root, train, image_size)
    raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")


def fashion_mnist(
    root: str | Path | None = None, train: bool = True, download: bool = True
) -> ImageTensorDataset:
    """Fashion-MNIST through torchvision's reader, from local IDX files when there are some."""
    from torchvision.datasets import FashionMNIST

    source = _find_fashion_mnist(root)
    cache = cache_folder()
    if source is not None:
        _stage_idx_files(source, cache / "FashionMNIST" / "raw")
        download = False
    elif not download:
        raise FileNotFoundError(
            "Fashion-MNIST not found: pass root=<folder with the four IDX files>, set "
            "PURIFYGUARD_FASHION_MNIST, install Debian's dataset-fashion-mnist, or allow download"
        )
    dataset = FashionMNIST(str(cache), train=train, download=download)
    return ImageTensorDataset(dataset.data, dataset.targets, FASHION_MNIST_CLASSES)


def _find_fashion_mnist(root: str | Path | None) -> Path | None:
    candidates = [root, os.environ.get("PURIFYGUARD_FASHION_MNIST"), _DEBIAN_FASHION_MNIST]
    for candidate in candidates:
        if candidate is None:
            continue
        folder = Path(candidate)
        if all(_idx_file(folder, name) for name in FASHION_MNIST_FILES):
            return folder
        if candidate is root:
            raise FileNotFoundError(
                f"{folder} does not hold the four Fashion-MNIST IDX files {FASHION_MNIST_FILES} "
                "(gzipped or not)"
            )
    return None


def _idx_file(folder: Path, name: str) -> Path | None:
    for path in (folder / name, folder / f"{name}.gz", folder / "FashionMNIST" / "raw" / name):
        if path.exists():
            return path
    return None


def _stage_idx_files(source: Path, raw: Path) -> None:
    """Decompressed copies where torchvision's reader looks for them (it ignores .gz files)."""
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        target = raw / name
        if target.exists():
            continue
        path = _idx_file(source, name)
        partial = target.with_suffix(".partial")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.replace(target)


def _cifar(name: str, root: str | Path | None, train: bool, download: bool) -> Dataset:
    from torchvision.datasets import CIFAR10, CIFAR100

    if name == "cifar10" and root is not None and _class_tree(Path(root), train) is not None:
        return cifar10_image_tree(root, train)
    root = Path(root) if root is not None else Path.home() / ".cache" / "purifyguard" / name
    if root.name == CIFAR_BATCHES[name]:  # the extracted folder itself
        root = root.parent
    cls = CIFAR10 if name == "cifar10" else CIFAR100
    dataset = cls(str(root), train=train, download=download)
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return ImageTensorDataset(images, torch.tensor(dataset.targets), tuple(dataset.classes))


def cifar10_image_tree(root: str | Path, train: bool = True) -> Dataset:
    """CIFAR-10 from a tree of its ten class folders (root/{train,test}/<class>/ or
    root/<class>/), as images in [0, 1] at their stored size, with CIFAR-10's labels. The files are
    interleaved class by class (the i-th file of every class in turn), so that the first n
    images cover every class, as the first n of CIFAR-10's own test set do."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    folder = _class_tree(Path(root), train)
    if folder is None:
        raise FileNotFoundError(
            f"{root} holds neither CIFAR-10's ten class folders {CIFAR10_CLASSES} (directly or "
            "under train/ and test/) nor torchvision's cifar-10-batches-py"
        )
    found = sorted(path.name for path in folder.iterdir() if path.is_dir())
    if tuple(found) != CIFAR10_CLASSES:
        raise ValueError(
            f"{folder} must hold exactly CIFAR-10's ten class folders {CIFAR10_CLASSES}, "
            f"found {found}"
        )
    dataset = ImageFolder(str(folder), transform=transforms.ToTensor())
    by_class: dict[int, list[tuple[str, int]]] = {}
    for sample in dataset.samples:
        by_class.setdefault(sample[1], []).append(sample)
    longest = max(len(samples) for samples in by_class.values())
    dataset.samples = [samples[i] for i in range(longest) for samples in by_class.values()
                       if i < len(samples)]
    dataset.imgs = dataset.samples
    dataset.targets = [label for _, label in dataset.samples]
    return dataset


def cifar10_training_split(root: str | Path | None, download: bool = True) -> Dataset:
    """CIFAR-10's training split, from a copy that keeps it apart from the test split:
    torchvision's files (data_batch_1..5, never test_batch) or a tree with root/train/<class>/.
    A single tree of class folders (root/<class>/, which load_dataset reads for either split)
    is refused with a ValueError: whatever is chosen on it could be chosen on test images."""
    if root is not None:
        folder = _class_tree(Path(root), train=True)
        if folder is not None and folder != Path(root) / "train":
            raise ValueError(
                f"{root} holds one tree of CIFAR-10's class folders with no train/ and test/ "
                "split, so its training images cannot be told from its test images; point "
                "root at a folder holding train/<class>/ (and test/<class>/), or at "
                "torchvision's cifar-10-batches-py"
            )
    return load_dataset("cifar10", root, train=True, download=download)


def cifar10_label(root: str | Path | None, train: bool = False) -> str:
    """The name under which results on this CIFAR-10 copy are reported: "cifar10" for
    torchvision's files, "cifar10-jpeg" for a tree of JPEG files (re-encoded images differ from
    CIFAR-10's own pixels), "cifar10-imagefolder" for a tree of other image files."""
    folder = None if root is None else _class_tree(Path(root), train)
    if folder is None:
        return "cifar10"
    first = next((path for path in sorted((folder / CIFAR10_CLASSES[0]).iterdir())
                  if path.is_file()), None)
    return ("cifar10-jpeg" if first is not None and first.suffix.lower() in JPEG_SUFFIXES
            else "cifar10-imagefolder")


def _class_tree(root: Path, train: bool) -> Path | None:
    """The folder holding CIFAR-10's ten class folders for the split, or None."""
    for folder in (root / ("train" if train else "test"), root):
        if all((folder / name).is_dir() for name in CIFAR10_CLASSES):
            return folder
    return None


def _image_folder(root: str | Path | None, train: bool, image_size: int | None) -> Dataset:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    if root is None:
        raise ValueError("imagefolder needs root=<folder of class sub-folders>")
    root = Path(root)
    split = root / ("train" if train else "test")
    if split.is_dir():
        root = split
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    steps = [transforms.Resize(image_size), transforms.CenterCrop(image_size)] if image_size else []
    return ImageFolder(str(root), transform=transforms.Compose([*steps, transforms.ToTensor()]))
