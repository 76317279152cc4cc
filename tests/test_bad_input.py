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


# --- issue 24, item 5: bad input a user's battery still found ---------------------------------

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("key,value,network_key", [("resolution", 32, "sample_size=28"),
                                                   ("channels", 3, "in_channels=1")])
def test_a_config_contradicting_its_denoiser_is_refused_naming_the_file(
    saved, key, value, network_key
):
    """Silent before: the file's channels/resolution were overwritten with the denoiser's."""
    edit_json(saved / "purifier_config.json", lambda v: v.update({key: value}))
    with pytest.raises(ValueError, match=rf"purifier_config.json says {key}={value}, but the "
                                         rf"denoiser .*unet.*config.json\) has {network_key}"):
        Purifier.from_pretrained(saved)


def test_a_config_object_contradicting_the_denoiser_is_refused(unet):
    with pytest.raises(ValueError, match="config.resolution=32 contradicts the denoiser, whose "
                                         "sample_size is 28"):
        Purifier(unet, config=PurifierConfig(t_star=4, resolution=32))
    with pytest.raises(ValueError, match="config.channels=3 contradicts the denoiser, whose "
                                         "in_channels is 1"):
        Purifier(unet, config=PurifierConfig(t_star=4, channels=3))
    assert Purifier(unet, config=PurifierConfig(t_star=4, resolution=28, channels=1)).channels == 1


def test_a_guidance_network_of_other_channels_than_the_denoiser_is_refused(unet, tmp_path):
    network = create_guidance_network("resnet10t", num_classes=10, in_chans=3,
                                      channels=[8, 16, 32, 64]).eval()
    Purifier(unet, guidance_network=network, **GUIDED).save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match=r"guidance network of .* takes 3-channel images, but "
                                         r"the denoiser .* has in_channels=1"):
        Purifier.from_pretrained(tmp_path / "p")


def test_a_t_star_beyond_the_schedule_in_a_config_names_the_file(saved):
    edit_json(saved / "purifier_config.json", lambda v: v.update(t_star=2000, sampler="ddpm",
                                                                 n_steps=None))
    with pytest.raises(ValueError, match=r"purifier_config.json: t_star=2000 is out of range: "
                                         r"the schedule has 1000 steps"):
        Purifier.from_pretrained(saved)
    assert Purifier.from_pretrained(saved, t_star=3).config.t_star == 3  # an override mends it
    with pytest.raises(ValueError, match=r"^t_star=3000 is out of range"):  # not the file's fault
        Purifier.from_pretrained(saved, t_star=3000)


def test_an_mlp_given_images_of_another_size_is_refused_before_purifying(make_purifier):
    """Failed inside torch before (mat1 and mat2 shapes cannot be multiplied), after purifying."""
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    purifier = make_purifier(t_star=2, sampler="ddim", n_steps=1)
    calls = []
    hook = purifier.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        model = PurifiedModel(mlp, purifier, mean=[0.5], std=[0.5], input_size=28)
        with pytest.raises(ValueError, match=r"first layer, nn.Linear\(in_features=784\), reads "
                                             r"784 values per image \(1x28x28 images\), but "
                                             r"images of shape \(2, 1, 32, 32\) have 1024 "
                                             r"\(input_size=28\)"):
            model(torch.rand(2, 1, 32, 32))
        assert not calls
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    finally:
        hook.remove()


def test_a_classifier_shape_error_is_reraised_with_the_shapes():
    class Flattening(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(784, 10)

        def forward(self, x):
            return self.linear(x.flatten(1))

    model = PurifiedModel(Flattening(), purifier=False, mean=[0.5], std=[0.5], input_size=28)
    with pytest.raises(ValueError, match=r"cannot take images of shape \(2, 1, 32, 32\): mat1 "
                                         r"and mat2 shapes cannot be multiplied.*input_size=28"):
        model(torch.rand(2, 1, 32, 32))


def test_a_cache_variable_pointing_at_a_file_is_named(tmp_path, monkeypatch):
    from purifyguard.adapters.robustbench_zoo import default_model_dir
    from purifyguard.data import fashion_mnist

    planted = tmp_path / "cache-file"
    planted.write_text("not a folder")
    monkeypatch.setenv("PURIFYGUARD_CACHE", str(planted))
    monkeypatch.delenv("PURIFYGUARD_FASHION_MNIST", raising=False)
    message = rf"PURIFYGUARD_CACHE={planted}: {planted} is a file, not a folder"
    with pytest.raises(ValueError, match=message):
        default_model_dir()
    with pytest.raises(ValueError, match=message):
        fashion_mnist(download=False)
    monkeypatch.setenv("PURIFYGUARD_CACHE", "")
    with pytest.raises(ValueError, match="PURIFYGUARD_CACHE is set but empty"):
        default_model_dir()


def test_a_classifier_folder_of_a_pickle_names_the_pickle(tmp_path):
    from purifyguard.evaluation.classifier_loading import resolve_classifier
    from purifyguard.guidance_network_format import load_guidance_network

    only_pickle = tmp_path / "only-pickle"
    only_pickle.mkdir()
    torch.save(grey_classifier().state_dict(), only_pickle / "model.pth")
    with pytest.raises(ValueError, match=r"--classifier .*only-pickle: .* holds the pickle "
                                         r"weights model.pth and no model.safetensors: pickle "
                                         r"files are refused because unpickling can run "
                                         r"arbitrary code.*safetensors.torch.save_file"):
        resolve_classifier(str(only_pickle), None, False, None, None, option="--classifier")

    timm_pickle = tmp_path / "timm-pickle"  # timm's save_for_hf without safe_serialization
    network = create_guidance_network("resnet10t", num_classes=10, in_chans=1,
                                      channels=[8, 16, 32, 64])
    timm.models.save_for_hf(network, str(timm_pickle))
    assert (timm_pickle / "pytorch_model.bin").is_file()
    for load in (lambda: load_guidance_network(timm_pickle),
                 lambda: resolve_classifier(str(timm_pickle), None, False, None, None,
                                            option="--classifier")):
        with pytest.raises(ValueError, match="holds the pickle weights pytorch_model.bin and no "
                                             "model.safetensors: pickle files are refused"):
            load()


def test_a_folder_that_is_not_a_purifier_says_what_it_is(tmp_path):
    from purifyguard.evaluation.classifier_loading import resolve_classifier
    from purifyguard.registry import load_purifier

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing file empty/purifier_config.json .*: "
                                                r".*empty is not a purifier folder, it is empty; "
                                                r"a purifier folder holds purifier_config.json"):
        load_purifier(empty)
    classifier = tmp_path / "classifier"
    network = create_guidance_network("resnet10t", num_classes=10, in_chans=1,
                                      channels=[8, 16, 32, 64])
    timm.models.save_for_hf(network, str(classifier), safe_serialization=True)
    with pytest.raises(FileNotFoundError, match=r"not a purifier folder, it holds config.json "
                                                r"and model.safetensors: a network folder in "
                                                r"timm's format .*--classifier"):
        Purifier.from_pretrained(classifier)
    with pytest.raises(ValueError, match=r"not a classifier folder, it is empty; a classifier "
                                         r"folder holds a config.json"):
        resolve_classifier(str(empty), None, False, None, None, option="--classifier")


def test_a_purifier_folder_given_as_the_classifier_is_named(saved):
    from purifyguard.evaluation.classifier_loading import resolve_classifier

    with pytest.raises(ValueError, match=r"not a classifier folder, it is a purifier folder .*"
                                         r"--purifier"):
        resolve_classifier(str(saved), None, False, None, None, option="--classifier")


def test_a_guidance_folder_missing_its_weights_describes_a_network_folder(saved):
    (saved / "guidance" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing file guidance/model.safetensors .*; a "
                                                r"network folder .* holds config.json and "
                                                r"model.safetensors"):
        Purifier.from_pretrained(saved)


def test_an_unknown_compile_backend_warns_and_falls_back_at_once(make_purifier, images):
    """Raised before (at compile_denoiser or the first purify) though the docstring promised a
    warning and the eager denoiser."""
    purifier = make_purifier(t_star=2, sampler="ddim", n_steps=1)
    with pytest.warns(RuntimeWarning, match=r"backend='no-such-backend' is not a torch.compile "
                                            r"backend of this torch"):
        assert purifier.compile_denoiser(backend="no-such-backend") is purifier
    assert "denoiser" not in purifier._compiled
    torch.testing.assert_close(purifier.purify(images, seed=0),
                               make_purifier(t_star=2, sampler="ddim", n_steps=1).purify(
                                   images, seed=0))
    with pytest.raises(ValueError, match="torch.compile refuses the options"):
        purifier.compile_denoiser(no_such_option=1)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_take_the_umask_not_mkstemps_0600(tmp_path, umask, mode):
    from purifyguard.files import write_atomic, write_json

    old = os.umask(umask)
    try:
        written = [write_json(tmp_path / "report.json", {"a": 1}),
                   write_atomic(tmp_path / "sub" / "page.md", "text")]
    finally:
        os.umask(old)
    for path in written:
        assert path.stat().st_mode & 0o777 == mode, path
    assert (tmp_path / "sub").stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_saved_purifier_folder_is_readable_by_others_under_umask_022(make_purifier, tmp_path):
    old = os.umask(0o022)
    try:
        make_purifier().save_pretrained(tmp_path / "p")
    finally:
        os.umask(old)
    for name in ("purifier_config.json", "README.md", "unet/config.json",
                 "guidance/config.json"):
        assert (tmp_path / "p" / name).stat().st_mode & 0o777 == 0o644, name


def _benchmark_module(name: str, folder: str = "benchmarks"):
    import importlib
    import sys

    sys.path.insert(0, str(ROOT / folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / folder))


@pytest.mark.parametrize("argv,message", [
    (["--n", "-5"], "--n: expected an integer >= 1, got '-5'"),
    (["--eot", "0"], "--eot: expected an integer >= 1"),
    (["--batch-size", "x"], "--batch-size: expected an integer"),
    (["--pixel-scale", "nan"], "--pixel-scale: expected a finite number"),
])
def test_the_fashion_mnist_benchmark_refuses_bad_arguments_at_once(argv, message, capsys):
    fashion_mnist = _benchmark_module("fashion_mnist")
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        fashion_mnist.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert time.perf_counter() - started < 5


def test_the_benchmark_page_script_has_a_help_and_arguments(capsys, tmp_path):
    page = _benchmark_module("benchmark_page")
    with pytest.raises(SystemExit) as exit_info:
        page.main(["--help"])
    assert exit_info.value.code == 0
    assert "BENCHMARK_JSON" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        page.main([str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2
    assert "missing.json does not exist" in capsys.readouterr().err
    output = tmp_path / "page.md"
    page.main([str(ROOT / "benchmarks" / "results" / "fashion_mnist.json"), "--output",
               str(output)])
    assert output.read_text() == (ROOT / "docs" / "benchmarks.md").read_text()


def test_attack_speed_refuses_bad_arguments_and_reports_its_childs_reason(capsys):
    import subprocess

    attack_speed = _benchmark_module("attack_speed", "benchmarks/experiments")
    with pytest.raises(SystemExit) as exit_info:
        attack_speed.main(["--steps", "-1"])
    assert exit_info.value.code == 2
    assert "--steps: expected an integer >= 1, got '-1'" in capsys.readouterr().err
    failed = subprocess.CompletedProcess(
        ["python"], 1, stdout="", stderr="Traceback ...\nValueError: steps must be >= 1\n")
    with pytest.raises(SystemExit, match=r"measuring 'bpda' on 'ddpm t\*=20' failed \(exit "
                                         r"status 1\); the child process said:\n"
                                         r"Traceback ...\nValueError: steps must be >= 1"):
        attack_speed._child_result(failed, "ddpm t*=20", "bpda")
    assert attack_speed._child_result(
        subprocess.CompletedProcess(["python"], 0, stdout='log\n{"nfe": 2}\n', stderr=""),
        "p", "a") == {"nfe": 2}


@pytest.mark.parametrize("text", ["apgd-eot:eps=5", "pgd:eps=8", "pgd:eps=1.0001"])
def test_an_linf_eps_above_one_is_refused(text):
    from purifyguard.evaluation import parse_attack

    with pytest.raises(ValueError, match=r"L-inf radius on images in \[0, 1\], so it must be <= 1"):
        parse_attack(text)


def test_an_linf_eps_of_one_and_a_large_l2_eps_stay_allowed():
    from purifyguard.evaluation import parse_attack

    assert parse_attack("pgd:eps=1").eps == 1.0  # the sanity checks' unbounded attack
    assert parse_attack("pgd:norm=l2,eps=5").eps == 5.0


def test_the_command_line_refuses_an_eps_meant_as_eight_255ths(capsys):
    from purifyguard.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["demo", "--eps", "8", "--threads", "1"])
    assert stopped.value.code == 1
    assert "eps=8 is an L-inf radius" in capsys.readouterr().err
