"""The validation split: held-out training images, the same share of every class, never trained
on, the same for the same seed."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import TINY, fashion_mnist_available, train  # noqa: F401 (a fixture)

from purifyguard.data import ImageTensorDataset, validation_split


def dataset(sizes=(50, 30, 20)) -> ImageTensorDataset:
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    images = torch.zeros(len(labels), 1, 8, 8, dtype=torch.uint8)
    return ImageTensorDataset(images, labels, ("a", "b", "c"))


def test_every_class_gives_its_share_and_the_parts_are_disjoint():
    data = dataset()
    training, validation = validation_split(data, 10, seed=0)
    held = data.labels[validation.indices]
    assert held.bincount().tolist() == [5, 3, 2]
    assert set(training.indices).isdisjoint(validation.indices)
    assert len(training) + len(validation) == len(data)


def test_quotas_that_do_not_divide_go_by_largest_remainder():
    _, validation = validation_split(dataset((40, 35, 25)), 7, seed=0)
    assert dataset((40, 35, 25)).labels[validation.indices].bincount().tolist() == [3, 2, 2]


def test_the_same_seed_gives_the_same_split_and_another_seed_another():
    data = dataset()
    first = validation_split(data, 10, seed=3)[1].indices
    assert validation_split(data, 10, seed=3)[1].indices == first
    assert validation_split(data, 10, seed=4)[1].indices != first


@pytest.mark.parametrize("size", [0, 100, 1000])
def test_a_size_outside_the_data_is_refused(size):
    with pytest.raises(ValueError, match=r"validation size must lie in \[1, 99\]"):
        validation_split(dataset(), size)


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist_available")
def test_a_training_run_holds_the_validation_images_out_and_says_so(tmp_path):
    out = tmp_path / "run"
    train("guidance", out, "--steps", "1", "--batch-size", "8", "--validation-size", "5000",
          "--validation-seed", "0", "--eval-images", "16", *TINY["guidance"])
    card = (out / "final" / "README.md").read_text()
    assert "less 5000 validation images (class-stratified, seed 0)" in card
    manifest = json.loads(next((out / "checkpoints").glob("step_*/progress.json")).read_text())
    assert manifest["options"]["validation_size"] == 5000
