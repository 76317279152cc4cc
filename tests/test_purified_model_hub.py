"""A defended model (PurifiedModel) saves, loads and pushes like a purifier: timm classifiers in
timm's format, any other classifier as a safetensors state dict passed back in as an instance,
the input handling in purified_model.json, the purifier in its own layout."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from unittest import mock

import huggingface_hub
import pytest
import timm
import torch
import torchvision
from huggingface_hub import HfApi, ModelCard

from purifyguard import PurifiedModel, Purifier
from purifyguard.guidance_network_format import create_guidance_network

KWARGS = {"channels": (8, 16, 32, 64)}  # the conftest guidance network's, and the classifier's
PURIFIER_FILES = {
    "purifier/README.md", "purifier/purifier_config.json", "purifier/unet/config.json",
    "purifier/unet/diffusion_pytorch_model.safetensors",
    "purifier/scheduler/scheduler_config.json", "purifier/guidance/config.json",
    "purifier/guidance/model.safetensors",
}
TIMM_LAYOUT = {"README.md", "purified_model.json", "classifier/config.json",
               "classifier/model.safetensors", *PURIFIER_FILES}
STATE_DICT_LAYOUT = TIMM_LAYOUT - {"classifier/config.json"}
CIFAR10 = {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616), "input_size": 32}


class MyNet(torch.nn.Module):
    """A classifier of the user's own, with no normalisation config."""

    def __init__(self, channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 8, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))).mean((2, 3)))


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def timm_classifier(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet10t", num_classes=10, in_chans=1, **KWARGS).eval()


def same_outputs(model: PurifiedModel, loaded: PurifiedModel, x: torch.Tensor) -> bool:
    with torch.no_grad():
        torch.manual_seed(7)
        expected = model(x)
        torch.manual_seed(7)
        return torch.equal(expected, loaded(x))


def assert_same_input_handling(model: PurifiedModel, loaded: PurifiedModel) -> None:
    assert loaded.normalization_source == model.normalization_source
    assert loaded.normalize.enabled == model.normalize.enabled
    if model.normalize.enabled:
        assert torch.equal(loaded.normalize.mean, model.normalize.mean)
        assert torch.equal(loaded.normalize.std, model.normalize.std)
    assert (loaded.input_size, loaded.interpolation, loaded.n_samples,
            loaded.classifier_channels) == (model.input_size, model.interpolation,
                                            model.n_samples, model.classifier_channels)


def fill_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "c" * 40) -> None:
    """Lay a folder out as huggingface_hub's cache does, files linking into blobs/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            target = repo / "snapshots" / commit / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, target.parent), target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An offline Hub cache (as in test_hub.py: environment and constants both set)."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def purifier(make_purifier) -> Purifier:
    return make_purifier(t_star=3, guidance="adversarial", guidance_scale=1.0,
                         scale_schedule="constant")


# ---- round trips ---------------------------------------------------------------------------


def test_a_timm_classifier_round_trips_with_equal_outputs(purifier, images, tmp_path):
    model = PurifiedModel(timm_classifier(), purifier, n_samples=2, interpolation="bicubic")
    folder = model.save_pretrained(tmp_path / "defended", classifier_kwargs=KWARGS,
                                   guidance_kwargs=KWARGS)
    assert files_under(folder) == TIMM_LAYOUT

    loaded = PurifiedModel.from_pretrained(folder)
    assert type(loaded.classifier).__name__ == "ResNet"
    assert loaded.purifier.current_config() == purifier.current_config()
    assert_same_input_handling(model, loaded)
    assert "timm" in loaded.normalization_source
    assert same_outputs(model, loaded, images)
    # The classifier folder is timm's own format: timm loads it itself.
    network = timm.create_model(f"local-dir:{folder / 'classifier'}", pretrained=True).eval()
    assert torch.equal(network(images), model.classifier(images))
    # An instance may be given for a timm folder too: the weights go into it.
    given = PurifiedModel.from_pretrained(folder, classifier=timm_classifier(seed=1))
    assert same_outputs(model, given, images)
    # Settings override the purifier's, as in Purifier.from_pretrained; n_samples the model's.
    changed = PurifiedModel.from_pretrained(folder, t_star=2, n_samples=1)
    assert (changed.purifier.config.t_star, changed.n_samples) == (2, 1)


def test_a_torchvision_classifier_round_trips_given_a_fresh_instance(purifier, tmp_path):
    torch.manual_seed(0)
    classifier = torchvision.models.resnet18(num_classes=10).eval()
    model = PurifiedModel(classifier, purifier, weights=None, **CIFAR10)
    folder = model.save_pretrained(tmp_path / "defended", guidance_kwargs=KWARGS)
    assert files_under(folder) == STATE_DICT_LAYOUT
    saved = json.loads((folder / "purified_model.json").read_text())
    assert saved["classifier"] == {"format": "state_dict",
                                   "class": "torchvision.models.resnet.ResNet"}
    assert saved["input"]["input_size"] == 32

    with pytest.raises(ValueError, match=r"classifier=.*ResNet") as refusal:
        PurifiedModel.from_pretrained(folder)
    assert "state dict" in str(refusal.value)

    torch.manual_seed(1)
    loaded = PurifiedModel.from_pretrained(folder, classifier=torchvision.models.resnet18(
        num_classes=10))
    assert_same_input_handling(model, loaded)
    assert loaded.normalization_source == "explicit mean/std"
    torch.testing.assert_close(loaded.normalize.mean.flatten(), torch.tensor(CIFAR10["mean"]))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert same_outputs(model, loaded, x)

    with pytest.raises(ValueError, match="does not fit the classifier given"):
        PurifiedModel.from_pretrained(folder, classifier=torchvision.models.resnet18())


def test_a_custom_classifier_round_trips_given_an_instance(purifier, tmp_path):
    torch.manual_seed(0)
    model = PurifiedModel(MyNet(), purifier, mean=(0.5,), std=(0.25,), input_size=32)
    with torch.no_grad():  # running statistics that differ from a fresh instance's
        model.classifier.norm.running_mean.uniform_()
    folder = model.save_pretrained(tmp_path / "defended", guidance_kwargs=KWARGS)
    with pytest.raises(ValueError, match=r"classifier=<a MyNet"):
        PurifiedModel.from_pretrained(folder)
    loaded = PurifiedModel.from_pretrained(folder, classifier=MyNet())
    assert_same_input_handling(model, loaded)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert same_outputs(model, loaded, x)


def test_an_undefended_custom_classifier_keeps_its_identity_normalisation(tmp_path):
    model = PurifiedModel(MyNet(channels=1), purifier=False)
    assert not model.normalize.enabled
    folder = model.save_pretrained(tmp_path / "bare")
    assert files_under(folder) == {"README.md", "purified_model.json",
                                   "classifier/model.safetensors"}
    loaded = PurifiedModel.from_pretrained(folder, classifier=MyNet(channels=1))
    assert loaded.purifier is None and not loaded.normalize.enabled
    assert_same_input_handling(model, loaded)
    x = torch.rand(2, 1, 28, 28)
    assert same_outputs(model, loaded, x)
    with pytest.raises(ValueError, match="undefended"):
        PurifiedModel.from_pretrained(folder, classifier=MyNet(channels=1), t_star=2)
    with pytest.raises(ValueError, match="does not fit the classifier given.*conv.weight"):
        PurifiedModel.from_pretrained(folder, classifier=MyNet(channels=3))


def test_saving_undefended_over_defended_removes_the_purifier(purifier, tmp_path):
    folder = tmp_path / "model"
    PurifiedModel(MyNet(channels=1), purifier).save_pretrained(folder, guidance_kwargs=KWARGS)
    PurifiedModel(MyNet(channels=1), purifier=False).save_pretrained(folder)
    assert not (folder / "purifier").exists()


def test_the_model_card_names_classifier_purifier_input_handling_and_loading(purifier, tmp_path):
    model = PurifiedModel(MyNet(), purifier, **CIFAR10)
    folder = model.save_pretrained(tmp_path / "defended", guidance_kwargs=KWARGS, metrics={
        "clean_accuracy": 0.9, "robust_accuracy": 0.5, "attack": "apgd-eot",
        "dataset": "cifar10", "n_examples": 512})
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "purifyguard"
    assert {result.metric_type for result in card.data.eval_results} == {
        "accuracy", "robust_accuracy"}
    text = card.text
    for expected in ("MyNet", "t* 3", "0.4914", "| 32 |", "explicit mean/std",
                     "PurifiedModel.from_pretrained(", "classifier=classifier"):
        assert expected in text, expected


# ---- refusals ------------------------------------------------------------------------------


def test_a_torchvision_model_without_weights_mean_or_std_is_refused():
    classifier = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(ValueError, match="weights=") as refusal:
        PurifiedModel(classifier, purifier=False)
    for word in ("mean=", "std=", "input_size=", "do not record"):
        assert word in str(refusal.value)
    # weights= (its transforms: nothing is downloaded) or mean/std are accepted.
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert PurifiedModel(classifier, False, weights=weights).input_size == 224
    assert PurifiedModel(classifier, False, **CIFAR10).input_size == 32


def test_a_pickle_or_a_link_out_of_the_folder_is_refused(tmp_path):
    folder = PurifiedModel(MyNet(), False, **CIFAR10).save_pretrained(tmp_path / "model")
    (folder / "classifier" / "model.pt").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="refusing pickle checkpoint"):
        PurifiedModel.from_pretrained(folder, classifier=MyNet())
    (folder / "classifier" / "model.pt").unlink()

    outside = tmp_path / "elsewhere.safetensors"
    (folder / "classifier" / "model.safetensors").rename(outside)
    (folder / "classifier" / "model.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the folder"):
        PurifiedModel.from_pretrained(folder, classifier=MyNet())


def test_a_purifier_folder_is_not_a_defended_model(purifier, tmp_path):
    folder = purifier.save_pretrained(tmp_path / "purifier", guidance_kwargs=KWARGS)
    with pytest.raises(FileNotFoundError, match="purified_model.json.*Purifier.from_pretrained"):
        PurifiedModel.from_pretrained(folder)


def test_a_timm_classifier_that_cannot_be_rebuilt_is_refused_before_writing(tmp_path):
    model = PurifiedModel(timm_classifier(), purifier=False)
    with pytest.raises(ValueError, match="classifier_kwargs"):
        model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists()
    # create_guidance_network remembers its kwargs, so nothing else is needed.
    remembered = create_guidance_network("resnet10t", num_classes=10, in_chans=1, **KWARGS)
    PurifiedModel(remembered, purifier=False).save_pretrained(tmp_path / "model")


# ---- the Hub, offline ----------------------------------------------------------------------


def test_push_to_hub_uploads_the_layout_and_loads_back_by_repo_id(purifier, offline_hub):
    uploaded = {}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        uploaded.update(repo_id=repo_id, files=files_under(folder), **kwargs)
        fill_hub_cache(offline_hub, repo_id, folder)  # what a download would then find
        return mock.Mock(commit_url="https://huggingface.co/user/defended/commit/abc")

    torch.manual_seed(0)
    model = PurifiedModel(torchvision.models.resnet18(num_classes=10).eval(), purifier,
                          **CIFAR10)
    with mock.patch.object(HfApi, "create_repo") as create_repo, \
            mock.patch.object(HfApi, "upload_folder", upload_folder):
        url = model.push_to_hub("user/defended", private=True, guidance_kwargs=KWARGS)
    assert url == "https://huggingface.co/user/defended/commit/abc"
    create_repo.assert_called_once_with("user/defended", private=True, exist_ok=True)
    assert uploaded["files"] == STATE_DICT_LAYOUT
    assert set(uploaded["allow_patterns"]) == TIMM_LAYOUT
    assert {"*.bin", "*.pt", "*.pkl"} <= set(uploaded["ignore_patterns"])
    assert uploaded["delete_patterns"] == ["classifier/config.json"]  # a stale timm config

    loaded = PurifiedModel.from_pretrained(
        "user/defended", classifier=torchvision.models.resnet18(num_classes=10))
    assert_same_input_handling(model, loaded)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert same_outputs(model, loaded, x)


def test_push_to_hub_dry_run_contacts_nothing_and_an_undefended_push_drops_the_purifier():
    model = PurifiedModel(timm_classifier(), purifier=False)
    with mock.patch.object(HfApi, "create_repo") as create_repo, \
            mock.patch.object(HfApi, "upload_folder") as upload_folder:
        files = model.push_to_hub("user/bare", dry_run=True, classifier_kwargs=KWARGS)
        create_repo.assert_not_called()
        upload_folder.assert_not_called()
        assert set(files) == TIMM_LAYOUT - PURIFIER_FILES
        assert all(size > 0 for size in files.values())

        model.push_to_hub("user/bare", classifier_kwargs=KWARGS)
        deleted = upload_folder.call_args.kwargs["delete_patterns"]
    assert set(deleted) == {f"purifier/{name}" for name in (
        "README.md", "purifier_config.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
        "guidance/config.json", "guidance/model.safetensors")}
    with pytest.raises(ValueError, match="user/name"):
        model.push_to_hub("not-a-repo-id")
