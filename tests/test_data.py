"""purifyguard.data: Fashion-MNIST from IDX files, ImageFolder trees, clear errors."""

from __future__ import annotations

import gzip
import shutil

import pytest
import torch
from PIL import Image

from purifyguard.data import FASHION_MNIST_FILES, load_dataset


def _fashion_mnist_source():
    from purifyguard.data import _find_fashion_mnist

    source = _find_fashion_mnist(None)
    if source is None:
        pytest.skip("Fashion-MNIST IDX files not found (install Debian's dataset-fashion-mnist "
                    "or set PURIFYGUARD_FASHION_MNIST)")
    return source


def test_fashion_mnist_reads_gzipped_idx_files_offline(tmp_path, monkeypatch):
    source = _fashion_mnist_source()
    gzipped = tmp_path / "idx"
    gzipped.mkdir()
    for name in FASHION_MNIST_FILES:
        path = source / f"{name}.gz"
        if path.exists():
            shutil.copy(path, gzipped / path.name)
        else:
            with open(source / name, "rb") as src, gzip.open(gzipped / f"{name}.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
    monkeypatch.setenv("PURIFYGUARD_CACHE", str(tmp_path / "cache"))
    test = load_dataset("fashion-mnist", gzipped, train=False, download=False)
    image, label = test[0]
    assert len(test) == 10_000
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and image.max() > 0.5
    assert label == 9  # the first test image is an ankle boot


def test_a_folder_without_the_idx_files_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="IDX files"):
        load_dataset("fashion-mnist", tmp_path, train=False, download=False)


def test_image_folder_tree_with_train_and_test_splits(tmp_path):
    for split in ("train", "test"):
        for class_name, value in (("cat", 0), ("dog", 255)):
            folder = tmp_path / split / class_name
            folder.mkdir(parents=True)
            Image.new("RGB", (40, 40), (value, value, value)).save(folder / "0001.jpg")
    test = load_dataset("imagefolder", tmp_path, train=False, image_size=32)
    image, label = test[1]
    assert test.classes == ["cat", "dog"]
    assert image.shape == (3, 32, 32) and label == 1 and image.min() > 0.9


def test_an_unknown_data_set_names_the_choices():
    with pytest.raises(ValueError, match="fashion-mnist"):
        load_dataset("mnist-but-not-quite")
