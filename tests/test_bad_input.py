"""A battery of bad inputs and faults against the purifier, the classifier wrapper and purifier
folders. Each case is one class of mistake a user makes (or an attacker plants): it must end
in a clear error that names the argument or file and what was expected (CLEAR), or be handled
correctly (CORRECT); never a bare traceback from deep inside torch, a silently wrong result, or
code run from a file. The training and evaluation sides have their own batteries in
test_train_reliability.py and test_evaluation_reliability.py.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import huggingface_hub
import pytest
import timm
import timm.models._hub
import torch
from safetensors.torch import load_file, save_file

from purifyguard import PurifiedModel, Purifier, PurifierConfig
from purifyguard.guidance_network_format import create_guidance_network

GUIDED = {"t_star": 4, "sampler": "ddim", "n_steps": 2, "guidance": "adversarial",
          "guidance_scale": 1.0}


def grey_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(4, 10),
    )


@pytest.fixture
def saved(tmp_path, unet) -> Path:
    """A guided purifier folder written by save_pretrained (timm guidance network)."""
    torch.manual_seed(0)
    network = create_guidance_network("resnet10t", num_classes=10, in_chans=1,
                                      channels=[8, 16, 32, 64]).eval()
    Purifier(unet, guidance_network=network, **GUIDED).save_pretrained(tmp_path / "purifier")
    return tmp_path / "purifier"


def edit_json(path: Path, change) -> None:
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


# --- settings of the wrong type or out of range ------------------------------------------------

BAD_SETTINGS = [
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
    ({"guidance_scale": float("inf")}, "guidance_scale must be a finite number"),
    ({"guidance_scale": "5"}, "guidance_scale must be a number"),
    ({"class_weight": float("nan")}, "class_weight must be a finite number"),
    ({"eta": "0.5"}, "eta must be a number"),
    ({"eta": float("nan")}, "eta must lie in"),
    ({"fixed_noise": "false"}, "fixed_noise must be True or False"),
    ({"fixed_noise": 0}, "fixed_noise must be True or False"),
    ({"checkpointing": "no"}, "checkpointing must be True or False"),
    ({"t_star": True}, "t_star must be an integer"),
    ({"t_star": 2.0}, "t_star must be an integer"),
    ({"t_star": 5, "sampler": "ddpm", "n_steps": 5000}, "n_steps=5000 exceeds t_star=5"),
    ({"n_steps": 2.5, "sampler": "ddim"}, "n_steps must be an integer"),
    ({"noise_seed": "abc"}, "noise_seed must be an integer"),
    ({"noise_seed": -1}, r"noise_seed must be an integer in \[0"),
    ({"extra": "x"}, "extra must be a mapping"),
    ({"extra": {"f": object()}}, "extra must hold JSON values"),
    ({"training_data": 5}, "training_data must be a string"),
    ({"sampler": "ddmp"}, "sampler must be one of"),
]


@pytest.mark.parametrize("settings,message", BAD_SETTINGS,
                         ids=[next(iter(s)) + "=" + repr(v) for s, v in
                              ((s, s[next(iter(s))]) for s, _ in BAD_SETTINGS)])
def test_a_bad_setting_is_refused_by_name(make_purifier, settings, message):
    with pytest.raises(ValueError, match=message):
        make_purifier(**settings)
    with pytest.raises(ValueError, match=message):
        make_purifier().with_settings(**settings)


def test_a_saved_config_with_a_string_for_a_bool_names_the_file(saved):
    edit_json(saved / "purifier_config.json", lambda v: v.update(fixed_noise="false"))
    with pytest.raises(ValueError, match="purifier_config.json.*fixed_noise must be True or False"):
        Purifier.from_pretrained(saved)


@pytest.mark.parametrize("text,message", [("", "is empty"), ("{t_star: 3", "is not valid JSON"),
                                          ("[1, 2]", "must hold a JSON object")])
def test_an_unreadable_purifier_config_names_the_file(saved, text, message):
    (saved / "purifier_config.json").write_text(text)
    with pytest.raises(ValueError, match=f"purifier_config.json {message}"):
        Purifier.from_pretrained(saved)


def test_an_unknown_key_in_a_saved_config_is_refused(saved):
    edit_json(saved / "purifier_config.json", lambda v: v.update(t_stat=3))
    with pytest.raises(ValueError, match=r"unknown keys: \['t_stat'\]"):
        Purifier.from_pretrained(saved)


# --- arguments of purify and PurifiedModel -------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"seed": "abc"}, "seed must be an integer"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"seed": True}, "seed must be an integer"),
    ({"generator": 3}, "generator must be a torch.Generator"),
    ({"seed": 1, "generator": torch.Generator()}, "a seed or a generator, not both"),
])
def test_purify_checks_its_seed(make_purifier, images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_purifier().purify(images, **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"mean": [0.5], "std": [0.0]}, "std must be > 0"),
    ({"mean": [0.5], "std": [float("nan")]}, "std must hold finite numbers"),
    ({"mean": [float("inf")], "std": [1.0]}, "mean must hold finite numbers"),
    ({"mean": [0.5, 0.5], "std": [0.2, 0.2]}, "mean has 2 values .* for a 1-channel classifier"),
    ({"mean": "0.5", "std": [0.2]}, "mean must be a number or a sequence of numbers"),
    ({"mean": [0.5]}, "give both mean and std"),
    ({"n_samples": 2.5}, "n_samples must be an integer >= 1"),
    ({"n_samples": 0}, "n_samples must be an integer >= 1"),
    ({"interpolation": "foo"}, "interpolation must be one of"),
    ({"input_size": 0}, "input_size must be an integer"),
    ({"weights": "IMAGENET1K_V1"}, "weights must be a torchvision weights enum member"),
])
def test_purified_model_checks_its_arguments_at_construction(make_purifier, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PurifiedModel(grey_classifier(), make_purifier(), **kwargs)


def test_three_rgb_statistics_on_a_grey_timm_model_are_averaged():
    """CORRECT: timm's ImageNet config on an in_chans=1 model is the usual case, not a mistake."""
    model = PurifiedModel(timm.create_model("resnet10t", num_classes=10, in_chans=1),
                          purifier=False)
    assert model.normalize.mean.numel() == 1


def test_an_image_too_small_to_classify_is_refused(make_purifier):
    model = PurifiedModel(grey_classifier(), make_purifier())
    with pytest.raises(ValueError, match="1x1 pixels are too small"):
        model(torch.rand(2, 1, 1, 1))


# --- purifier folders: code from a file, files outside the folder, corrupt files -----------------

def test_a_guidance_config_naming_a_checkpoint_path_is_refused(saved, tmp_path):
    planted = tmp_path / "elsewhere.pth"
    torch.save({}, planted)
    edit_json(saved / "guidance" / "config.json",
              lambda v: v["model_args"].update(checkpoint_path=str(planted)))
    with pytest.raises(ValueError, match=r"kwargs \['checkpoint_path'\] are refused"):
        Purifier.from_pretrained(saved)


@pytest.mark.parametrize("architecture", ["hf-hub:timm/resnet10t.c3_in1k", "local-dir:/tmp",
                                          "no-such-architecture"])
def test_a_guidance_architecture_that_is_not_a_timm_name_is_refused(
    saved, architecture, monkeypatch
):
    edit_json(saved / "guidance" / "config.json", lambda v: v.update(architecture=architecture))
    for name in ("hf_hub_download", "snapshot_download"):  # reaching the Hub fails the test
        monkeypatch.setattr(huggingface_hub, name, _no_network)
        monkeypatch.setattr(timm.models._hub, name, _no_network, raising=False)
    with pytest.raises(ValueError, match="is not a timm architecture name"):
        Purifier.from_pretrained(saved)


def test_a_guidance_config_without_architecture_names_the_file(saved):
    edit_json(saved / "guidance" / "config.json", lambda v: v.pop("architecture"))
    with pytest.raises(ValueError, match="guidance/config.json must name the timm 'architecture'"):
        Purifier.from_pretrained(saved)


def test_guidance_weights_that_do_not_match_the_config_name_the_tensor(saved):
    edit_json(saved / "guidance" / "config.json",
              lambda v: v["model_args"].update(channels=[8, 16, 32, 32]))
    with pytest.raises(ValueError, match="does not match the architecture of its config.json"):
        Purifier.from_pretrained(saved)


def test_a_denoiser_config_that_does_not_match_its_weights_names_the_folder(saved):
    edit_json(saved / "unet" / "config.json", lambda v: v.update(block_out_channels=[16, 32, 64]))
    with pytest.raises(ValueError, match="cannot load the denoiser from .*unet"):
        Purifier.from_pretrained(saved)


def test_a_corrupt_guidance_safetensors_file_names_its_path(saved):
    weights = saved / "guidance" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="guidance/model.safetensors is not a readable safetensors"):
        Purifier.from_pretrained(saved)


def test_random_bytes_inside_a_weight_tensor_are_caught_at_load(saved):
    """Silent today: the file parses, and every purified pixel is NaN."""
    weights = saved / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = "conv_in.weight"
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (tensors[name].numel() * 4,), dtype=torch.uint8,
                          generator=generator)
    tensors[name] = noise.view(torch.float32).view_as(tensors[name])
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="corrupt"):
        Purifier.from_pretrained(saved)


def test_finite_but_absurd_weights_are_caught_by_the_output_check(saved):
    weights = saved / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_in.weight"] = torch.full_like(tensors["conv_in.weight"], 3e38)
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="denoiser returns NaN or Inf on a normal input"):
        Purifier.from_pretrained(saved)


def test_a_schedule_that_erases_the_signal_is_refused(saved):
    edit_json(saved / "scheduler" / "scheduler_config.json", lambda v: v.update(beta_end=5.0))
    with pytest.raises(ValueError, match=r"every beta_t must lie in \(0, 1\)"):
        Purifier.from_pretrained(saved)


def test_a_weights_link_out_of_the_folder_is_not_followed(saved, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.move(saved / "guidance" / "model.safetensors", outside)
    os.symlink(outside, saved / "guidance" / "model.safetensors")
    with pytest.raises(ValueError, match="outside the folder"):
        Purifier.from_pretrained(saved)


def test_an_empty_name_is_refused_instead_of_reading_the_current_folder():
    with pytest.raises(ValueError, match="expected a purifier folder or a Hub repo id"):
        Purifier.from_pretrained("")


def test_the_filesystem_root_is_refused_at_once():
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="purifier_config.json"):
        Purifier.from_pretrained("/")
    assert time.perf_counter() - started < 5


def test_a_pickle_in_the_layout_is_refused(saved):
    torch.save({}, saved / "guidance" / "extra.bin")
    with pytest.raises(ValueError, match="refusing pickle checkpoint guidance/extra.bin"):
        Purifier.from_pretrained(saved)


@pytest.mark.parametrize("dtype", [torch.int64, "float32"])
def test_from_pretrained_checks_its_dtype(saved, dtype):
    with pytest.raises(ValueError, match="torch_dtype must be a floating torch.dtype"):
        Purifier.from_pretrained(saved, torch_dtype=dtype)


def test_an_intact_folder_still_loads_and_purifies(saved, images):
    """The control for the cases above."""
    purified = Purifier.from_pretrained(saved).purify(images, seed=0)
    assert torch.isfinite(purified).all()
    assert PurifierConfig.load(saved / "purifier_config.json").guidance == "adversarial"


def _no_network(*args, **kwargs):
    raise AssertionError(f"tried to reach the Hub: {args} {kwargs}")


@pytest.mark.parametrize("call,message", [
    (lambda p, tmp: p.save_pretrained(""), "save_directory must be a folder path"),
    (lambda p, tmp: p.save_pretrained(tmp, metrics=[0.9]), "metrics must be a dict"),
    (lambda p, tmp: p.push_to_hub("no-owner", dry_run=True), "repo_id must be a Hub repo id"),
    (lambda p, tmp: PurifiedModel(grey_classifier(), p).with_purifier("fashion"),
     "purifier must be a Purifier or None"),
])
def test_saving_and_swapping_check_their_arguments(make_purifier, tmp_path, call, message):
    with pytest.raises(ValueError, match=message):
        call(make_purifier(), tmp_path)
    assert not any(tmp_path.iterdir())
