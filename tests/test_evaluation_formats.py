"""What the evaluation shows and on which images: stratified example selection for generic data
sets, an image grid whose columns come from one purification, and the eps-sweep plot."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.datasets import ImageFolder

from purifyguard.data import ImageTensorDataset
from purifyguard.evaluation import evaluate
from purifyguard.evaluation.grid import grid_columns, save_grid
from purifyguard.evaluation.harness import fingerprint, select_examples
from purifyguard.evaluation.sanity import EPS_SWEEP_CHECK, eps_sweep_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def image_folder(tmp_path) -> ImageFolder:
    """4 classes x 5 grey 8x8 images, class sub-folders sorted as ImageFolder sorts them (the
    first 8 items are all class 0 and 1: the old "first n" gave labels [0, 0, 0, 0, 0, 1, ...])."""
    for c in range(4):
        folder = tmp_path / "tree" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(5):
            Image.new("L", (8, 8), color=40 * c + 5 * i).save(folder / f"{i}.png")
    return ImageFolder(
        str(tmp_path / "tree"),
        transform=transforms.Compose([transforms.Grayscale(), transforms.ToTensor()]),
    )


def test_an_image_folder_is_sampled_stratified_by_the_seed(image_folder):
    images, labels = select_examples(image_folder, 8, seed=3)

    assert Counter(labels.tolist()) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]  # classes in turn: a mixed first batch
    assert images.shape == (8, 1, 8, 8)
    again_images, again_labels = select_examples(image_folder, 8, seed=3)
    assert torch.equal(again_images, images) and torch.equal(again_labels, labels)
    choices = {fingerprint(*select_examples(image_folder, 8, seed=s)) for s in range(6)}
    assert len(choices) > 1  # another seed, another draw
    # An uneven split: 6 over 4 classes gives 2 to two classes and 1 to the others.
    assert sorted(Counter(select_examples(image_folder, 6, seed=0)[1].tolist()).values()) == [
        1, 1, 2, 2
    ]
    # n >= len(data): everything, in the data set's order.
    _, everything = select_examples(image_folder, 50, seed=3)
    assert everything.tolist() == [c for c in range(4) for _ in range(5)]


def test_a_class_smaller_than_its_share_gives_its_rest_to_the_others(tmp_path):
    images = torch.rand(12, 1, 4, 4)
    labels = torch.tensor([0] * 9 + [1] * 2 + [2])

    class Plain(torch.utils.data.Dataset):  # no targets attribute: labels are read item by item
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return images[i], int(labels[i])

    _, chosen = select_examples(Plain(), 9, seed=1)
    assert Counter(chosen.tolist()) == {0: 6, 1: 2, 2: 1}


def test_tensor_pairs_and_bundled_style_test_sets_keep_their_first_n(image_folder):
    images = torch.rand(10, 1, 4, 4)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
    _, first = select_examples((images, labels), 4, seed=9)
    assert first.tolist() == [0, 0, 0, 1]
    tensors = ImageTensorDataset((images * 255).to(torch.uint8), labels, ("a", "b", "c", "d"))
    _, first = select_examples(tensors, 4, seed=9)
    assert first.tolist() == [0, 0, 0, 1]


def test_a_torch_tensor_dataset_is_read_as_pairs():
    """TensorDataset's `tensors` is a tuple, not our data sets' tensors(n) method."""
    images = torch.rand(6, 1, 4, 4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    chosen, chosen_labels = select_examples(torch.utils.data.TensorDataset(images, labels), 3,
                                            seed=0)
    assert chosen.shape == (3, 1, 4, 4)
    assert sorted(chosen_labels.tolist()) == [0, 1, 2]  # stratified


def test_evaluate_runs_on_the_stratified_examples_of_an_image_folder(image_folder):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).eval()
    report = evaluate(model, image_folder, ["pgd:eps=0.1,steps=1,eot=1"], n=8, batch_size=8,
                      runs=1, seed=3, progress=False, device="cpu")

    assert report["settings"]["data_fingerprint"] == fingerprint(
        *select_examples(image_folder, 8, seed=3)
    )
    assert report["settings"]["device"] == "cpu"


class NoisyPurifier(nn.Module):
    """A stand-in defended model: purification adds fresh noise on every call, so two
    purifications of the same images give different predictions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(16, 10)
        self.purified_batches: list[torch.Tensor] = []
        self.purifier = "noise"

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        self.purified_batches.append(x)
        return (x + torch.randn_like(x)).clamp(0, 1)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1) * 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.purify(x))


def test_the_grid_labels_the_adversarial_image_with_the_purification_it_shows(tmp_path):
    model = NoisyPurifier()
    clean, adversarial = torch.rand(6, 1, 4, 4), torch.rand(6, 1, 4, 4)

    columns = grid_columns(model, clean, adversarial, seed=5)

    names = [c.name for c in columns]
    assert names == ["clean", "adversarial", "purified"]
    shown = columns[2].images
    assert torch.equal(columns[1].images, adversarial)
    # The prediction under the adversarial image is the classification of the purified image
    # beside it: one purification of the adversarial batch, not a second unseen one.
    expected = model.classify(shown).argmax(-1)
    assert torch.equal(columns[1].predictions, expected)
    assert torch.equal(columns[2].predictions, expected)
    assert sum(b is adversarial or torch.equal(b, adversarial) for b in model.purified_batches) == 1
    # A second, independent purification would have disagreed somewhere (the old grid's flaw).
    assert not torch.equal(model(adversarial).argmax(-1), expected)

    path = save_grid(model, clean, adversarial, torch.arange(6) % 10, tmp_path / "grid.png",
                     seed=5, title="noise: pgd")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_a_model_without_a_purifier_gets_no_purified_column(tmp_path):
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    clean, adversarial = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)

    columns = grid_columns(classifier, clean, adversarial)

    assert [c.name for c in columns] == ["clean", "adversarial"]
    assert torch.equal(columns[1].predictions, classifier(adversarial).argmax(-1))
    path = save_grid(classifier, clean, adversarial, torch.arange(3), tmp_path / "grid.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_sanity_writes_the_eps_sweep_plot_beside_the_grid(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).eval()
    images = torch.rand(8, 1, 8, 8)
    labels = model(images).argmax(-1)  # all correct when clean: the sweep has room to fall

    report = evaluate(model, (images, labels), ["pgd:eps=0.05,steps=2,eot=1"], n=8,
                      batch_size=8, runs=1, output_dir=tmp_path, sanity=True, sanity_n=8,
                      progress=False)

    plot = tmp_path / "eps-sweep-model.png"
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    assert (tmp_path / "grid-model-pgd.png").exists()  # the grid it sits beside
    checks = report["sanity"]["model"]
    sweep = next(c for c in checks if c["check"] == EPS_SWEEP_CHECK)
    assert sweep["values"]["attack"].startswith("PGD, full gradient, L-inf, 2 steps")
    assert len(sweep["values"]["ci95"]) == len(sweep["values"]["eps"])

    figure = eps_sweep_figure(checks, title="model")
    axis = figure.axes[0]
    assert axis.get_xlabel() == "eps (L-inf budget of the attack)"
    assert axis.get_ylabel() == "robust accuracy (mean over runs)"
    assert "PGD, full gradient, L-inf, 2 steps" in axis.get_title()
    assert eps_sweep_figure([c for c in checks if c["check"] != EPS_SWEEP_CHECK]) is None
