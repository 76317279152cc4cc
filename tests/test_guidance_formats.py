"""Network folders in timm's own Hub format, the older purifyguard layout, and guidance networks
that are any nn.Module classifier (features read by a hook on the last nn.Linear or a named
layer), with the security rules of a purifier folder kept for both layouts."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import timm
import timm.models._builder
import timm.models._hub
import torch
import torchvision
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import save_model

from purifyguard import Purifier, PurifierConfig
from purifyguard.guidance import AdversarialGuidance
from purifyguard.guidance_network_format import (
    create_guidance_network,
    load_guidance_network,
    save_guidance_network,
)
from purifyguard.presets import ASSETS
from purifyguard.registry import load_purifier

RAW_INPUT = {"mean": [0.3], "std": [0.6], "input_size": [1, 28, 28]}
SLIM = {"channels": [8, 16, 32, 64]}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def slim_network(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_guidance_network("resnet10t", num_classes=10, in_chans=1,
                                   pretrained_cfg_overlay=RAW_INPUT, **SLIM).eval()


def images(channels: int = 1, size: int = 28, n: int = 2) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0))


def edit_json(path: Path, change) -> None:
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


def write_old_layout(network: torch.nn.Module, folder: Path) -> None:
    """A network folder as purifyguard wrote it before it adopted timm's format."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "library": "timm", "architecture": "resnet10t",
        "kwargs": {"num_classes": 10, "in_chans": 1, "pretrained_cfg_overlay": RAW_INPUT, **SLIM},
    }))
    save_model(network, str(folder / "model.safetensors"))


@pytest.fixture
def no_network(monkeypatch):
    """Any download (Hub, URL) or unpickling fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to fetch or unpickle: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for module, name in [(huggingface_hub, "hf_hub_download"), (huggingface_hub, "snapshot_download"),
                         (timm.models._hub, "hf_hub_download"),
                         (timm.models._hub, "download_cached_file"),
                         (timm.models._builder, "load_state_dict_from_url"),
                         (timm.models._builder, "load_state_dict_from_hf"),
                         (torch, "load"), (torch.hub, "load_state_dict_from_url")]:
        monkeypatch.setattr(module, name, refuse, raising=False)


# --- timm's format ---------------------------------------------------------------------------

def test_a_saved_network_loads_with_timm_local_dir_giving_identical_outputs(tmp_path):
    network = slim_network()
    save_guidance_network(network, tmp_path / "classifier")
    assert {p.name for p in (tmp_path / "classifier").iterdir()} == {"config.json",
                                                                   "model.safetensors"}
    assert [p.name for p in tmp_path.iterdir()] == ["classifier"]  # no staging folder left

    by_timm = timm.create_model(f"local-dir:{tmp_path / 'classifier'}", pretrained=True).eval()
    ours = load_guidance_network(tmp_path / "classifier")

    x = images()
    with torch.no_grad():
        expected = network(x)
        assert torch.equal(by_timm(x), expected)
        assert torch.equal(ours(x), expected)
    for key, value in RAW_INPUT.items():  # the input settings survive both loaders
        assert list(by_timm.pretrained_cfg[key]) == value
        assert list(ours.pretrained_cfg[key]) == value


def test_a_purifiers_guidance_folder_is_a_timm_folder(tmp_path, unet):
    network = slim_network()
    Purifier(unet, guidance_network=network, guidance="adversarial",
             guidance_scale=1.0).save_pretrained(tmp_path / "purifier")
    by_timm = timm.create_model(f"local-dir:{tmp_path / 'purifier' / 'guidance'}",
                                pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(by_timm(images()), network(images()))


def test_our_loader_reads_both_layouts(tmp_path):
    network = slim_network()
    write_old_layout(network, tmp_path / "old")
    save_guidance_network(network, tmp_path / "new")
    assert "kwargs" in json.loads((tmp_path / "old" / "config.json").read_text())
    assert "model_args" in json.loads((tmp_path / "new" / "config.json").read_text())

    old, new = load_guidance_network(tmp_path / "old"), load_guidance_network(tmp_path / "new")

    x = images()
    with torch.no_grad():
        assert torch.equal(old(x), network(x)) and torch.equal(new(x), network(x))
    for key in ("mean", "std", "input_size"):
        assert list(old.pretrained_cfg[key]) == list(new.pretrained_cfg[key]) == RAW_INPUT[key]
    # A network loaded from the old layout saves itself in the new one, unchanged.
    save_guidance_network(old, tmp_path / "resaved")
    assert (tmp_path / "resaved" / "model.safetensors").read_bytes() == \
        (tmp_path / "new" / "model.safetensors").read_bytes()


def test_bundled_networks_are_in_timm_format_and_load_with_timm():
    folders = [*sorted((ASSETS / "classifiers").iterdir()),
               *sorted((ASSETS / "purifiers").glob("*/guidance"))]
    assert len(folders) == 3  # two classifiers, the guidance network of fashion-mnist-agdm
    x = images(n=4)
    for folder in folders:
        config = json.loads((folder / "config.json").read_text())
        assert {"architecture", "num_classes", "model_args", "pretrained_cfg"} <= set(config)
        ours = load_guidance_network(folder)
        by_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        with torch.no_grad():
            assert torch.equal(ours(x), by_timm(x)), folder
        assert list(ours.pretrained_cfg["mean"]) == [0.0] and list(ours.pretrained_cfg["std"]) == [1.0]


def test_a_pretrained_cfg_naming_a_file_url_or_hub_id_is_not_followed(tmp_path, no_network):
    """timm's pretrained_cfg may point at weights elsewhere; purifyguard reads model.safetensors
    only (pretrained=False, the input settings as the overlay), offline, unpickling nothing."""
    network = slim_network()
    save_guidance_network(network, tmp_path / "classifier")
    planted = tmp_path / "elsewhere.pth"
    planted.write_bytes(b"not read")
    edit_json(tmp_path / "classifier" / "config.json", lambda v: v["pretrained_cfg"].update(
        file=str(planted), url="https://example.com/weights.pth", hf_hub_id="someone/weights",
        hf_hub_filename="open_clip_pytorch_model.bin", source="hf-hub", state_dict={"a": 1},
    ))

    loaded = load_guidance_network(tmp_path / "classifier")

    with torch.no_grad():
        assert torch.equal(loaded(images()), network(images()))
    assert loaded.pretrained_cfg.get("file") != str(planted)
    assert loaded.pretrained_cfg.get("hf_hub_id") != "someone/weights"


def test_a_purifier_with_such_a_guidance_config_loads_offline(tmp_path, unet, no_network):
    network = slim_network()
    Purifier(unet, guidance_network=network, guidance="adversarial",
             guidance_scale=1.0).save_pretrained(tmp_path / "purifier")
    edit_json(tmp_path / "purifier" / "guidance" / "config.json",
              lambda v: v["pretrained_cfg"].update(hf_hub_id="someone/weights",
                                                   url="https://example.com/w.pth"))
    loaded = Purifier.from_pretrained(tmp_path / "purifier")
    for name, weight in network.state_dict().items():
        assert torch.equal(loaded.guidance_network.state_dict()[name], weight), name


@pytest.mark.parametrize("change,message", [
    (lambda v: v["model_args"].update(pretrained=True), r"kwargs \['pretrained'\] are refused"),
    (lambda v: v["model_args"].update(checkpoint_path="/x.pth"),
     r"kwargs \['checkpoint_path'\] are refused"),
    (lambda v: v["model_args"].update(pretrained_cfg={"hf_hub_id": "a/b"}),
     r"kwargs \['pretrained_cfg'\] are refused"),
    (lambda v: v["model_args"].update(pretrained_cfg_overlay={"file": "/x.pth"}),
     "model_args may not hold pretrained_cfg_overlay"),
    (lambda v: v.update(architecture="hf-hub:timm/resnet10t.c3_in1k"),
     "is not a timm architecture name"),
    (lambda v: v.update(architecture="local-dir:/tmp"), "is not a timm architecture name"),
    (lambda v: v.pop("architecture"), "must name the timm 'architecture'"),
    (lambda v: v.update(library="transformers"), "library must be 'timm'"),
    (lambda v: v.update(model_args=[1]), "model_args must be a mapping"),
    (lambda v: v.update(num_classes=5), "num_classes is 5 but model_args says 10"),
    (lambda v: v.update(kwargs={}), "mixes the two layouts"),
    (lambda v: v["pretrained_cfg"].update(mean="0.5"), "mean must be a list of finite numbers"),
    (lambda v: v["pretrained_cfg"].update(input_size=[1, 28]), "input_size must be"),
    (lambda v: v["model_args"].update(channels=[8, 16, 32, 32]),
     "does not match the architecture of its config.json"),
])
def test_a_timm_format_config_is_checked_like_the_old_layout(tmp_path, no_network, change,
                                                             message):
    save_guidance_network(slim_network(), tmp_path / "classifier")
    edit_json(tmp_path / "classifier" / "config.json", change)
    with pytest.raises(ValueError, match=message):
        load_guidance_network(tmp_path / "classifier")


@pytest.mark.parametrize("layout", ["old", "new"])
def test_a_pickle_beside_the_config_is_never_read(tmp_path, no_network, layout):
    """timm's local-dir: loader would fall back to a .pth when model.safetensors is missing."""
    folder = tmp_path / "classifier"
    if layout == "old":
        write_old_layout(slim_network(), folder)
    else:
        save_guidance_network(slim_network(), folder)
    (folder / "model.safetensors").rename(tmp_path / "moved.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_guidance_network(folder)


def test_saving_checks_guidance_kwargs_before_writing(tmp_path):
    network = slim_network()
    with pytest.raises(ValueError, match="does not rebuild the guidance network"):
        save_guidance_network(network, tmp_path / "n", {"channels": [8, 16, 32, 32]})
    assert not any(tmp_path.iterdir())
    # An input overlay given as guidance_kwargs lands in the saved pretrained_cfg.
    save_guidance_network(network, tmp_path / "n",
                          {"pretrained_cfg_overlay": {"mean": [0.5], "std": [0.25]}})
    loaded = load_guidance_network(tmp_path / "n")
    assert list(loaded.pretrained_cfg["mean"]) == [0.5]
    assert list(loaded.pretrained_cfg["std"]) == [0.25]


# --- any nn.Module as the guidance network -----------------------------------------------------

def rgb_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def torchvision_resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def test_the_timm_path_gives_the_features_it_always_gave():
    """The bundled purifier's guidance reads forward_head(forward_features(x), pre_logits=True)
    and its classifier as before, bit for bit: its numbers do not change."""
    purifier = load_purifier("fashion-mnist-agdm")
    guidance, network = purifier.guidance, purifier.guidance_network
    assert guidance.feature_source is None  # timm's path, no hook
    x = images(n=4)
    with torch.no_grad():
        features, logits = guidance.features_and_logits(x)
        before = network.forward_head(network.forward_features(x), pre_logits=True)
        assert torch.equal(features, before)
        assert torch.equal(logits, network.get_classifier()(before))


def test_features_of_any_module_are_the_input_of_its_last_linear():
    network = torchvision_resnet18()
    guidance = AdversarialGuidance(network)
    assert guidance.feature_source == "fc"
    x = images(channels=3, size=32)
    with torch.no_grad():
        features, logits = guidance.features_and_logits(x)
        body = torch.nn.Sequential(*list(network.children())[:-1])
        assert torch.equal(features, torch.flatten(body(x), 1))
        assert torch.equal(logits, network(x))
    # The hook lived for that call only.
    assert not network.fc._forward_pre_hooks and not network.fc._forward_hooks


def test_features_of_a_named_layer_are_its_output_flattened():
    network = torchvision_resnet18()
    guidance = AdversarialGuidance(network, layer="layer3")
    x = images(channels=3, size=32)
    with torch.no_grad():
        features, logits = guidance.features_and_logits(x)
        stem = torch.nn.Sequential(network.conv1, network.bn1, network.relu, network.maxpool,
                                   network.layer1, network.layer2, network.layer3)
        assert torch.equal(features, stem(x).flatten(1))
        assert torch.equal(logits, network(x))
    assert not network.layer3._forward_hooks
    with pytest.raises(ValueError, match="guidance_layer 'layer9' is not a layer"):
        AdversarialGuidance(network, layer="layer9")


@pytest.mark.parametrize("settings", [{}, {"class_weight": 1.0}, {"guidance_layer": "layer4"}])
def test_full_gradients_flow_through_the_hook_path(settings):
    """A torchvision resnet18 guides; an attacker's full gradient is a double backward through
    the guidance gradient (create_graph), here through the pre-hook's features."""
    unet, network = rgb_unet(), torchvision_resnet18()
    common = {"t_star": 6, "sampler": "ddim", "n_steps": 2, "gradient_mode": "full"}
    purifier = Purifier(unet, DDPMScheduler(), network, guidance="adversarial",
                        guidance_scale=50.0, scale_schedule="constant", **common, **settings)
    unguided = Purifier(unet, DDPMScheduler(), **common)

    def input_gradient(model: Purifier) -> torch.Tensor:
        x = images(channels=3, size=32).requires_grad_()
        (gradient,) = torch.autograd.grad(model.purify(x, seed=0).square().sum(), x)
        return gradient

    gradient = input_gradient(purifier)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0
    assert not torch.allclose(gradient, input_gradient(unguided))  # the guidance term counts
    assert not network.fc._forward_pre_hooks and not network.layer4._forward_hooks


def test_the_guidance_layer_setting_is_saved_and_old_configs_load_without_it(tmp_path, unet):
    network = slim_network()
    purifier = Purifier(unet, guidance_network=network, guidance="adversarial",
                        guidance_scale=5.0, scale_schedule="constant", t_star=4, sampler="ddim",
                        n_steps=2, guidance_layer="layer3")
    assert purifier.guidance.feature_source == "layer3"
    purifier.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "purifier_config.json").read_text())[
        "guidance_layer"] == "layer3"
    loaded = Purifier.from_pretrained(tmp_path / "p")
    assert loaded.config.guidance_layer == "layer3"
    x = images()
    assert torch.equal(loaded.purify(x, seed=1), purifier.purify(x, seed=1))
    assert "| guidance features | layer layer3 |" in (tmp_path / "p" / "README.md").read_text()

    # Configs without the field (the bundled ones, older folders) read as None, and a config
    # without a layer is saved without the key, as before.
    assert PurifierConfig.load(ASSETS / "purifiers" / "fashion-mnist-agdm" /
                               "purifier_config.json").guidance_layer is None
    assert "guidance_layer" not in PurifierConfig().to_dict()
    with pytest.raises(ValueError, match="guidance_layer must be a string"):
        PurifierConfig(guidance_layer=4)
    with pytest.raises(ValueError, match="guidance_layer must name a layer"):
        PurifierConfig(guidance_layer=" ")


def test_a_purifier_with_a_non_timm_guidance_network_is_not_saved(tmp_path):
    purifier = Purifier(rgb_unet(), DDPMScheduler(), torchvision_resnet18(),
                        guidance="adversarial", guidance_scale=1.0)
    with pytest.raises(ValueError, match="ResNet: purifyguard saves guidance networks that are "
                                         "timm models"):
        purifier.save_pretrained(tmp_path / "p")
    assert not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match="timm models"):
        purifier.push_to_hub("user/p", dry_run=True)
