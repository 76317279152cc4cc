"""Hub integration: purifiers save, load, push and convert like Hub models, in safetensors only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

import huggingface_hub
import pytest
import timm
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from huggingface_hub import HfApi, ModelCard

from purifyguard import PurifiedModel, Purifier, load_purifier
from purifyguard.guidance_network_format import create_guidance_network
from purifyguard.registry import default_purifier_name

GUIDANCE_KWARGS = {"channels": (8, 16, 32, 64)}
FULL_LAYOUT = {
    "README.md",
    "purifier_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "guidance/config.json",
    "guidance/model.safetensors",
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, above all on a CPU shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(channels: int = 1, size: int = 28, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )


def tiny_guidance_network(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet10t", num_classes=10, in_chans=1, **GUIDANCE_KWARGS)


def guided_purifier(**settings) -> Purifier:
    """Adversarial guidance on a stochastic 3-step DDIM: noise, denoiser and guidance all count."""
    settings = {"t_star": 20, "sampler": "ddim", "n_steps": 2, "eta": 0.5,
                "guidance": "adversarial", "guidance_scale": 1.0, "scale_schedule": "constant",
                **settings}
    return Purifier(tiny_unet(), DDPMScheduler(), tiny_guidance_network(), **settings)


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def images(channels: int = 1, size: int = 28) -> torch.Tensor:
    return torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def saved(tmp_path) -> tuple[Purifier, Path]:
    purifier = guided_purifier()
    purifier.save_pretrained(tmp_path / "purifier", guidance_kwargs=GUIDANCE_KWARGS)
    return purifier, tmp_path / "purifier"


def fill_hub_cache(cache: Path, repo_id: str, folder: Path, refs: dict[str, str]) -> None:
    """Lay a folder out as huggingface_hub's cache does: snapshots/<commit>/ and refs/<name>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for ref, commit in refs.items():
        if not (repo / "snapshots" / commit).exists():
            shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An offline Hub cache in tmp_path. huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE
    into huggingface_hub.constants at import time, so both the environment and the constants
    are set."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_save_then_load_purifies_bit_identically_with_adversarial_guidance(saved):
    purifier, folder = saved
    purifier.guidance_scale.data.fill_(2.0)  # as if the scale had been fine-tuned
    purifier.save_pretrained(folder, guidance_kwargs=GUIDANCE_KWARGS)
    assert files_under(folder) == FULL_LAYOUT

    loaded = Purifier.from_pretrained(folder)

    assert loaded.config == purifier.current_config()
    assert loaded.current_config().guidance_scale == 2.0
    for name, weight in purifier.guidance_network.state_dict().items():
        assert torch.equal(loaded.guidance_network.state_dict()[name], weight), name
    x = images()
    expected = purifier.purify(x, seed=7)
    assert torch.equal(loaded.purify(x, seed=7), expected)
    # The guidance network shapes the result, so the equality above covers its round trip.
    assert not torch.equal(purifier.with_settings(guidance_scale=0.0).purify(x, seed=7), expected)


def test_saving_an_unguided_purifier_over_a_guided_one_drops_the_guidance_network(saved):
    purifier, folder = saved
    Purifier(purifier.unet, DDPMScheduler(), t_star=5).save_pretrained(folder)
    assert files_under(folder) == FULL_LAYOUT - {"guidance/config.json",
                                                 "guidance/model.safetensors"}
    assert Purifier.from_pretrained(folder).guidance_network is None


def test_guidance_network_needs_the_kwargs_that_rebuild_it(tmp_path):
    purifier = guided_purifier()
    if not hasattr(purifier.guidance_network, "_model_args"):  # a timm that records no args
        with pytest.raises(ValueError, match="guidance_kwargs"):
            purifier.save_pretrained(tmp_path / "p")  # channels=(8, 16, 32, 64) is not recorded
    del purifier.guidance_network._model_args  # what timm recorded when it built the network
    with pytest.raises(ValueError, match="fc.weight .*guidance_kwargs"):
        purifier.save_pretrained(tmp_path / "p")
    assert not (tmp_path / "p" / "guidance").exists()  # checked before anything is written
    assert not (tmp_path / "p" / "unet").exists()

    network = create_guidance_network("resnet10t", num_classes=10, in_chans=1, **GUIDANCE_KWARGS)
    Purifier(tiny_unet(), guidance_network=network, guidance="adversarial").save_pretrained(
        tmp_path / "q"
    )
    saved = json.loads((tmp_path / "q" / "guidance" / "config.json").read_text())
    # timm's own Hub format (timm.models.save_for_hf), plus the "library" key timm ignores.
    assert saved["architecture"] == "resnet10t" and saved["num_classes"] == 10
    assert saved["library"] == "timm" and "kwargs" not in saved
    assert {"num_classes": 10, "in_chans": 1, "channels": [8, 16, 32, 64]}.items() \
        <= saved["model_args"].items()
    assert saved["pretrained_cfg"]["input_size"][0] == 1
    assert {p.name for p in (tmp_path / "q").iterdir()} == {
        "README.md", "purifier_config.json", "unet", "scheduler", "guidance"}  # no staging left


def test_loading_a_repo_id_goes_through_the_offline_hub_cache(saved, offline_hub):
    purifier, folder = saved
    commit, tagged_commit = "a" * 40, "b" * 40
    fill_hub_cache(offline_hub, "user/tiny-purifier", folder, {"main": commit})
    retagged = folder.parent / "retagged"
    purifier.with_settings(t_star=10, n_steps=2).save_pretrained(
        retagged, guidance_kwargs=GUIDANCE_KWARGS
    )
    fill_hub_cache(offline_hub, "user/tiny-purifier", retagged, {"v1": tagged_commit})

    loaded = Purifier.from_pretrained("user/tiny-purifier")
    x = images()
    assert torch.equal(loaded.purify(x, seed=3), purifier.purify(x, seed=3))
    assert Purifier.from_pretrained("user/tiny-purifier", revision="v1").config.t_star == 10

    classifier = timm.create_model("resnet10t", num_classes=10, in_chans=1, **GUIDANCE_KWARGS)
    model = PurifiedModel(classifier, "user/tiny-purifier", mean=(0.5,), std=(0.5,))
    assert model.purifier.config == purifier.config
    assert model(x).shape == (2, 10)

    with pytest.raises(huggingface_hub.errors.LocalEntryNotFoundError):
        Purifier.from_pretrained("user/not-in-the-cache")


def test_purified_model_loads_a_local_folder(saved, monkeypatch):
    purifier, folder = saved
    monkeypatch.chdir(folder.parent)
    classifier = timm.create_model("resnet10t", num_classes=10, in_chans=1, **GUIDANCE_KWARGS)
    model = PurifiedModel(classifier, f"./{folder.name}", mean=(0.5,), std=(0.5,))
    assert model.purifier.config == purifier.config
    with pytest.raises(FileNotFoundError, match="not a folder"):
        Purifier.from_pretrained("./no-such-folder")


def shrunk_ddpm_cifar10_pipeline() -> DDPMPipeline:
    """google/ddpm-cifar10-32's configuration (3x32x32, attention at 16x16, linear betas) with
    far fewer channels."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        variance_type="fixed_large", clip_sample=True,
    )
    return DDPMPipeline(unet=unet, scheduler=scheduler)


def test_from_diffusers_turns_a_ddpm_pipeline_into_an_unguided_purifier(tmp_path):
    pipeline = shrunk_ddpm_cifar10_pipeline()
    pipeline.save_pretrained(tmp_path / "ddpm")

    purifier = Purifier.from_diffusers(tmp_path / "ddpm", t_star=30, sampler="ddim", n_steps=2)

    assert (purifier.channels, purifier.resolution) == (3, 32)
    assert (purifier.config.t_star, purifier.config.guidance) == (30, "none")
    assert purifier.guidance_network is None
    assert torch.equal(purifier.schedule.alphas_cumprod, pipeline.scheduler.alphas_cumprod.double())
    for name, weight in pipeline.unet.state_dict().items():
        assert torch.equal(purifier.unet.state_dict()[name], weight), name
    x = images(channels=3, size=32)
    purified = purifier.purify(x, seed=0)
    assert purified.shape == x.shape and not torch.equal(purified, x)

    purifier.save_pretrained(tmp_path / "purifier")  # unguided: no guidance/ folder
    assert files_under(tmp_path / "purifier") == FULL_LAYOUT - {
        "guidance/config.json", "guidance/model.safetensors"
    }
    reloaded = Purifier.from_pretrained(tmp_path / "purifier")
    assert torch.equal(reloaded.purify(x, seed=0), purified)


def test_cifar10_ddpm_is_the_registered_default_and_loads_from_the_hub_cache(
    tmp_path, offline_hub
):
    assert default_purifier_name(3, 32) == "cifar10-ddpm"
    shrunk_ddpm_cifar10_pipeline().save_pretrained(tmp_path / "ddpm")
    fill_hub_cache(offline_hub, "google/ddpm-cifar10-32", tmp_path / "ddpm", {"main": "c" * 40})

    purifier = load_purifier("cifar10-ddpm")

    assert (purifier.config.t_star, purifier.channels, purifier.resolution) == (100, 3, 32)
    assert purifier.config.extra["diffusion_model"] == "google/ddpm-cifar10-32"


def flat_ddpm_repository(folder: Path, timesteps: int = 1000) -> DDPMPipeline:
    """google/ddpm-cifar10-32's own layout on the Hub: the UNet's config.json and weights and a
    legacy scheduler_config.json (GaussianDDPMScheduler, "timesteps") at the top."""
    pipeline = shrunk_ddpm_cifar10_pipeline()
    pipeline.unet.save_pretrained(folder, safe_serialization=True)
    (folder / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "GaussianDDPMScheduler", "_diffusers_version": "0.0.4",
        "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "timesteps": timesteps, "trained_betas": None, "variance_type": "fixed_large",
        "clip_sample": True,
    }))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "_diffusers_version": "0.0.4",
        "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"],
    }))
    return pipeline


def test_cifar10_ddpm_loads_the_flat_hub_layout_with_its_legacy_scheduler(tmp_path, offline_hub):
    pipeline = flat_ddpm_repository(tmp_path / "flat")
    fill_hub_cache(offline_hub, "google/ddpm-cifar10-32", tmp_path / "flat", {"main": "d" * 40})

    purifier = load_purifier("cifar10-ddpm")

    assert (purifier.config.t_star, purifier.channels, purifier.resolution) == (100, 3, 32)
    assert torch.allclose(purifier.schedule.alphas_cumprod,
                          pipeline.scheduler.alphas_cumprod.double())
    for name, weight in pipeline.unet.state_dict().items():
        assert torch.equal(purifier.unet.state_dict()[name], weight), name
    assert torch.isfinite(purifier.purify(images(channels=3, size=32), seed=0)).all()


def test_a_legacy_timesteps_key_sets_the_schedule_length(tmp_path):
    """Ignored by diffusers itself (with a warning), which would silently give 1000 steps."""
    flat_ddpm_repository(tmp_path / "flat", timesteps=400)
    purifier = Purifier.from_diffusers(tmp_path / "flat", t_star=30)
    assert purifier.schedule.num_train_timesteps == 400


def test_a_flat_repository_with_pickle_weights_only_is_refused(tmp_path):
    flat_ddpm_repository(tmp_path / "flat")
    (tmp_path / "flat" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        Purifier.from_diffusers(tmp_path / "flat")
    torch.save({}, tmp_path / "flat" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="refusing pickle checkpoint diffusion_pytorch_model.bin"):
        Purifier.from_diffusers(tmp_path / "flat")


def test_pickle_checkpoints_are_refused(saved, tmp_path):
    _, folder = saved
    torch.save({"weights": torch.zeros(1)}, folder / "guidance" / "extra.pt")
    with pytest.raises(ValueError, match=r"refusing pickle checkpoint guidance/extra\.pt"):
        Purifier.from_pretrained(folder)

    pipeline = shrunk_ddpm_cifar10_pipeline()
    pipeline.save_pretrained(tmp_path / "ddpm", safe_serialization=False)
    with pytest.raises(ValueError, match=r"refusing pickle checkpoint unet/diffusion_pytorch_model"
                                         r"\.bin.*safetensors only"):
        Purifier.from_diffusers(tmp_path / "ddpm")


def test_a_missing_file_is_named(saved):
    _, folder = saved
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing file scheduler/scheduler_config.json"):
        Purifier.from_pretrained(folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing file unet/diffusion_pytorch_model"):
        Purifier.from_pretrained(folder)
    (folder / "purifier_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing file .*purifier_config.json"):
        Purifier.from_pretrained(folder)


def test_a_config_of_an_unknown_version_is_refused(saved):
    _, folder = saved
    config = json.loads((folder / "purifier_config.json").read_text())
    config["config_version"] = 99
    (folder / "purifier_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config version 99 is not supported"):
        Purifier.from_pretrained(folder)


def test_model_card_states_settings_training_data_and_metrics(tmp_path):
    purifier = guided_purifier(training_data="Fashion-MNIST (training split)")
    metrics = {"clean_accuracy": 0.91234, "robust_accuracy": 0.5, "attack": "PGD-20 EOT-4"}
    purifier.save_pretrained(tmp_path / "p", guidance_kwargs=GUIDANCE_KWARGS, metrics=metrics,
                             card_data={"license": "mit"})

    card = ModelCard.load(tmp_path / "p" / "README.md")

    assert card.data.library_name == "purifyguard"
    assert card.data.pipeline_tag == "image-classification"
    for tag in ("adversarial-purification", "adversarial-robustness", "diffusion-purification"):
        assert tag in card.data.tags, tag
    assert card.data.license == "mit"
    for text in ("Fashion-MNIST (training split)", "| clean_accuracy | 0.9123 |",
                 "| attack | PGD-20 EOT-4 |", "timm resnet10t", "| guidance | adversarial |",
                 "Evaluation protocol", "## Settings", "## Components", "## Results"):
        assert text in card.text, text


def test_model_card_metrics_become_model_index_results(tmp_path):
    """ModelCard.load(README.md).data.eval_results holds the metrics passed to save_pretrained:
    the Hub indexes them (model-index), the attack named in the robust metric."""
    metrics = {"clean_accuracy": 0.84, "robust_accuracy": 0.52, "attack": "PGD-200 EOT-20",
               "threat_model": "Linf 0.1", "n_examples": 512, "dataset": "fashion-mnist",
               "classifier": "bundled fashion-mnist-resnet18"}
    guided_purifier().save_pretrained(tmp_path / "my-purifier", metrics=metrics,
                                      guidance_kwargs=GUIDANCE_KWARGS)

    card = ModelCard.load(tmp_path / "my-purifier" / "README.md")

    results = {result.metric_type: result for result in card.data.eval_results}
    assert set(results) == {"accuracy", "robust_accuracy"}
    for result in results.values():
        assert result.task_type == "image-classification"
        assert result.dataset_type == "zalando-datasets/fashion_mnist"
        assert result.dataset_name == "Fashion-MNIST" and result.dataset_split == "test"
    assert results["accuracy"].metric_value == 0.84
    assert results["accuracy"].metric_args == {"n_examples": 512}
    assert results["robust_accuracy"].metric_value == 0.52
    assert results["robust_accuracy"].metric_name == "robust accuracy (PGD-200 EOT-20)"
    assert results["robust_accuracy"].metric_args == {
        "attack": "PGD-200 EOT-20", "threat_model": "Linf 0.1", "n_examples": 512}
    assert card.data.model_name == "my-purifier"
    assert "model-index:" in (tmp_path / "my-purifier" / "README.md").read_text()
    assert "| classifier | bundled fashion-mnist-resnet18 |" in card.text  # the table keeps all

    # Without a data set (no metrics["dataset"], datasets or training_data) no model-index.
    guided_purifier().save_pretrained(tmp_path / "q", metrics={"clean_accuracy": 0.8},
                                      guidance_kwargs=GUIDANCE_KWARGS)
    assert not ModelCard.load(tmp_path / "q" / "README.md").data.eval_results
    # card_data's datasets name it otherwise.
    guided_purifier().save_pretrained(
        tmp_path / "r", metrics={"clean_accuracy": 0.8}, guidance_kwargs=GUIDANCE_KWARGS,
        card_data={"datasets": ["uoft-cs/cifar10"]})
    (result,) = ModelCard.load(tmp_path / "r" / "README.md").data.eval_results
    assert (result.dataset_type, result.dataset_name, result.metric_value) == (
        "uoft-cs/cifar10", "CIFAR-10", 0.8)


@pytest.mark.parametrize("metrics,message", [
    ({"clean_accuracy": "0.9"}, r"metrics\['clean_accuracy'\] must be a finite number"),
    ({"robust_accuracy": float("nan")}, r"metrics\['robust_accuracy'\] must be a finite"),
    ({"n_examples": 2.5}, r"metrics\['n_examples'\] must be an integer"),
    ({"attack": 20}, r"metrics\['attack'\] must be a string"),
])
def test_metrics_that_cannot_become_model_index_results_are_refused(tmp_path, metrics, message):
    with pytest.raises(ValueError, match=message):
        guided_purifier().save_pretrained(tmp_path / "p", metrics=metrics,
                                          guidance_kwargs=GUIDANCE_KWARGS)
    assert not (tmp_path / "p").exists()


def test_push_to_hub_uploads_the_full_folder(tmp_path):
    # A mock of HfApi: no Hub is reachable from the tests.
    uploaded = {}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded.update(repo_id=repo_id, files=files_under(Path(folder_path)), **kwargs)
        return mock.Mock(commit_url="https://huggingface.co/user/tiny/commit/abc")

    purifier = guided_purifier()
    with mock.patch.object(HfApi, "create_repo") as create_repo, \
            mock.patch.object(HfApi, "upload_folder", upload_folder):
        url = purifier.push_to_hub("user/tiny", private=True, guidance_kwargs=GUIDANCE_KWARGS)

    create_repo.assert_called_once_with("user/tiny", private=True, exist_ok=True)
    assert uploaded["repo_id"] == "user/tiny"
    assert uploaded["files"] == FULL_LAYOUT
    assert url == "https://huggingface.co/user/tiny/commit/abc"
    # upload_folder itself filters: only the layout, never a pickle or a checkpoint.
    assert set(uploaded["allow_patterns"]) == FULL_LAYOUT
    assert {"*.bin", "*.pt", "*.pkl", "checkpoints/*"} <= set(uploaded["ignore_patterns"])
    assert uploaded["delete_patterns"] is None

    # An unguided purifier deletes a guidance network pushed to the repository before.
    with mock.patch.object(HfApi, "create_repo"), \
            mock.patch.object(HfApi, "upload_folder", upload_folder):
        Purifier(tiny_unet(), DDPMScheduler(), t_star=5).push_to_hub("user/tiny")
    assert uploaded["delete_patterns"] == ["guidance/config.json", "guidance/model.safetensors"]


def test_push_to_hub_dry_run_lists_the_files_and_contacts_nothing():
    purifier = guided_purifier()
    with mock.patch.object(HfApi, "create_repo") as create_repo, \
            mock.patch.object(HfApi, "upload_folder") as upload_folder:
        files = purifier.push_to_hub("user/tiny", dry_run=True, guidance_kwargs=GUIDANCE_KWARGS)
    assert set(files) == FULL_LAYOUT
    assert all(size > 0 for size in files.values())
    create_repo.assert_not_called()
    upload_folder.assert_not_called()


def test_push_to_hub_never_lists_a_pickle_even_if_one_sits_in_the_source(monkeypatch):
    """A denoiser whose save_pretrained also leaves pickles behind (as diffusers does with
    safe_serialization=False) and a stray checkpoints/ folder: the dry run, filtered with the
    patterns upload_folder gets, lists the layout only."""
    purifier = guided_purifier()
    save = purifier.unet.save_pretrained

    def save_with_pickles(folder, **kwargs):
        save(folder, **kwargs)
        torch.save({"w": torch.zeros(1)}, Path(folder) / "diffusion_pytorch_model.bin")
        torch.save({}, Path(folder).parent / "optimizer.pt")
        (Path(folder).parent / "checkpoints" / "step_1").mkdir(parents=True)
        torch.save({}, Path(folder).parent / "checkpoints" / "step_1" / "state.pkl")
        (Path(folder).parent / "checkpoints" / "step_1" / "model.safetensors").write_bytes(b"x")

    monkeypatch.setattr(purifier.unet, "save_pretrained", save_with_pickles)
    files = purifier.push_to_hub("user/tiny", dry_run=True, guidance_kwargs=GUIDANCE_KWARGS)
    assert set(files) == FULL_LAYOUT
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
