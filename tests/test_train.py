"""The training routines as a user runs them: `python -m purifyguard.train <routine>` in a fresh
process (two processes through `accelerate launch` for the multi-process runs), on tiny models.

Fashion-MNIST comes through purifyguard.data (PURIFYGUARD_FASHION_MNIST, or Debian's
dataset-fashion-mnist); without it these tests skip.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from purifyguard import Purifier
from purifyguard.data import fashion_mnist
from purifyguard.guidance_network_format import create_guidance_network, save_guidance_network
from purifyguard.train import adapt, diffusion, guidance
from purifyguard.train.options import parse_with_config
from purifyguard.train.run import last_checkpoint, read_metrics

TINY = {
    "diffusion": ["--block-out-channels", "8,16,16", "--layers-per-block", "1"],
    "guidance": ["--model", "resnet18", "--model-kwargs", '{"channels": [8, 16, 32, 64]}',
                 "--eval-images", "50"],
}
RAW_INPUT = {"mean": [0.0], "std": [1.0], "input_size": [1, 28, 28]}


@pytest.fixture(scope="module", autouse=True)
def fashion_mnist_available() -> None:
    try:
        fashion_mnist(download=False)
    except FileNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed here: {error}")


def tiny_unet(seed: int) -> UNet2DModel:
    """The routines' tiny denoiser (TINY["diffusion"]'s channels, attention at the middle level)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=(8, 16, 16),
        layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )


@pytest.fixture(scope="module")
def adapt_inputs(tmp_path_factory) -> list[str]:
    """A tiny saved purifier with adversarial guidance and a tiny saved classifier."""
    folder = tmp_path_factory.mktemp("adapt_inputs")
    unet = tiny_unet(seed=0)
    network = create_guidance_network(
        "resnet10t", num_classes=10, in_chans=1, channels=[8, 16, 32, 64],
        pretrained_cfg_overlay=RAW_INPUT,
    )
    purifier = Purifier(
        unet, DDPMScheduler(num_train_timesteps=1000), network, t_star=20, sampler="ddim",
        n_steps=4, guidance="adversarial", guidance_scale=5.0, scale_schedule="constant",
    )
    purifier.save_pretrained(folder / "purifier")
    classifier = create_guidance_network(
        "resnet10t", num_classes=10, in_chans=1, channels=[8, 16, 32, 64],
        pretrained_cfg_overlay=RAW_INPUT,
    )
    save_guidance_network(classifier.eval(), folder / "classifier")
    return ["--purifier", str(folder / "purifier"), "--classifier", str(folder / "classifier"),
            "--attack-steps", "2", "--sampler-steps", "2"]


def train(
    routine: str, output_dir: Path, *options: str, processes: int = 1
) -> subprocess.CompletedProcess:
    """Run a routine as a user would; fails the test with its output when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if processes == 1:
        launcher = [sys.executable]
    else:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                    "--num_processes", str(processes), "--main_process_port", str(_free_port())]
    command = [*launcher, "-m", "purifyguard.train", routine, "--output-dir", str(output_dir),
               "--no-progress", *options]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("routine", ["diffusion", "guidance", "adapt"])
def test_two_process_cpu_run_writes_a_checkpoint(routine, tmp_path, adapt_inputs):
    options = TINY.get(routine, adapt_inputs if routine == "adapt" else [])
    train(routine, tmp_path, "--steps", "2", "--batch-size", "4", "--checkpoint-every", "2",
          "--log-every", "1", *options, processes=2)

    checkpoint = last_checkpoint(tmp_path / "checkpoints")
    assert checkpoint is not None and checkpoint.name == "step_00000002"
    manifest = json.loads((checkpoint / "progress.json").read_text())
    assert (manifest["step"], manifest["processes"]) == (2, 2)
    # Each process saves its own random state: two files only if the two really joined one run.
    assert {"rng_0.safetensors", "rng_1.safetensors"} <= set(manifest["files"])
    assert (checkpoint / "rng_1.safetensors").exists()
    assert [line["step"] for line in read_metrics(tmp_path)] == [1, 2]
    assert (tmp_path / "final").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("routine, options", [
    ("diffusion", ["--lr", "2e-3"]),
    ("guidance", ["--lr", "0.05", "--beta", "1", "--pgd-steps", "1"]),
])
def test_loss_falls_on_fashion_mnist(routine, options, tmp_path):
    train(routine, tmp_path, "--steps", "40", "--batch-size", "16", "--log-every", "1",
          "--checkpoint-every", "1000", *TINY[routine], *options)

    losses = [line["loss"] for line in read_metrics(tmp_path)]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"{routine} loss went from {first:.4f} to {last:.4f}"


def test_resume_continues_from_the_checkpoint_with_the_optimizer_state(tmp_path):
    common = ["--steps", "6", "--batch-size", "8", "--checkpoint-every", "2", "--log-every", "1",
              "--keep-checkpoints", "5", *TINY["diffusion"]]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train("diffusion", straight, *common)
    # The same run killed after step 5 was logged, during its save: the checkpoints up to step 4,
    # a .partial folder, which resume must ignore, and a metrics line past the checkpoint, which
    # resume must drop.
    shutil.copytree(straight, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "step_00000006")
    (interrupted / "checkpoints" / "step_00000005.partial").mkdir()
    kept = [line for line in read_metrics(straight) if line["step"] <= 5]
    (interrupted / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in kept))
    result = train("diffusion", interrupted, "--resume", *common)

    assert "at step 4" in result.stdout
    assert [line["step"] for line in read_metrics(interrupted)] == [1, 2, 3, 4, 5, 6]
    assert _same_state(straight / "checkpoints" / "step_00000006",
                       interrupted / "checkpoints" / "step_00000006")
    # The restored Adam state was used: a resume with a fresh optimizer would differ here.
    state = load_file(interrupted / "checkpoints" / "step_00000006" / "state.safetensors")
    steps = [value for key, value in state.items()
             if key.startswith("optimizers/0/state/") and key.endswith("/step")]
    assert steps and all(step.item() == 6 for step in steps)


def _same_state(first: Path, second: Path) -> bool:
    """Same weights, same Adam moments, same EMA, same random states: the two runs are at the
    same point."""
    for name in ("state.safetensors", "rng_0.safetensors"):
        tensors = load_file(first / name), load_file(second / name)
        if tensors[0].keys() != tensors[1].keys():
            return False
        if not all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0]):
            return False
    return True


def test_adapt_trains_the_guidance_network_and_exports_an_adapted_purifier(
    tmp_path, adapt_inputs
):
    train("adapt", tmp_path, "--optimizer-steps", "2", "--batch-size", "4", "--log-every", "1",
          "--lr", "1e-2", "--scale-lr", "0.5", *adapt_inputs)

    before = Purifier.from_pretrained(adapt_inputs[1])
    after = Purifier.from_pretrained(tmp_path / "final")
    assert after.config.guidance_scale != before.config.guidance_scale
    assert after.config.guidance_scale > 0
    # The defended settings are kept, not the few-step training process.
    assert (after.config.sampler, after.config.n_steps) == ("ddim", 4)
    assert after.config.extra["adaptation"]["eps"] == 0.1
    card = (tmp_path / "final" / "README.md").read_text()
    assert "## How it was adapted to a classifier" in card and "train adapt" in card
    assert after.config.training_data == "fashion-mnist"
    changed = [
        name for name, value in after.guidance_network.state_dict().items()
        if not torch.equal(value, before.guidance_network.state_dict()[name])
    ]
    assert any(name.startswith("conv1") for name in changed)
    # The head is not read by the guidance loss (class_weight = 0), so it stays as it was.
    assert not any(name.startswith("fc.") for name in changed)
    assert [line["step"] for line in read_metrics(tmp_path)] == [1, 2]


@pytest.mark.parametrize("module", [diffusion, guidance, adapt])
def test_config_file_stands_in_for_flags_and_flags_win(module, tmp_path):
    config = tmp_path / "options.yaml"
    config.write_text("steps: 7\nbatch-size: 3\nlr: 0.123\nseed: 5\n")
    required = ["--purifier", "p", "--classifier", "c"] if module is adapt else []

    args = parse_with_config(module.build_parser(), ["--config", str(config), "--lr", "0.5",
                                                     *required])
    assert (args.steps, args.batch_size, args.seed) == (7, 3, 5)
    assert args.lr == 0.5


def test_config_file_with_an_unknown_option_is_refused(tmp_path):
    config = tmp_path / "options.json"
    config.write_text(json.dumps({"steps": 2, "learning_rate": 0.1}))
    with pytest.raises(SystemExit):
        parse_with_config(diffusion.build_parser(), ["--config", str(config)])


def test_a_run_reads_its_options_from_a_config_file(tmp_path):
    config = tmp_path / "diffusion.yaml"
    config.write_text(
        "steps: 2\nbatch_size: 4\nblock_out_channels: '8,16,16'\nlog_every: 1\n"
        "checkpoint_every: 5\n"
    )
    train("diffusion", tmp_path / "run", "--config", str(config), "--steps", "3")

    saved = json.loads((tmp_path / "run" / "args.json").read_text())
    assert (saved["steps"], saved["batch_size"]) == (3, 4)
    assert saved["block_out_channels"] == [8, 16, 16]
    assert [line["step"] for line in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_a_config_file_can_supply_a_required_option(tmp_path):
    """adapt's --purifier and --classifier are required; a --config file may give them."""
    from purifyguard.train.adapt import build_parser
    from purifyguard.train.options import parse_with_config

    config = tmp_path / "adapt.yaml"
    config.write_text("purifier: fashion-mnist-agdm\nclassifier: some/folder\nsteps: 3\n")
    args = parse_with_config(build_parser(), ["--config", str(config), "--steps", "5"])
    assert (args.purifier, args.classifier, args.steps) == ("fashion-mnist-agdm", "some/folder", 5)
    with pytest.raises(SystemExit):
        parse_with_config(build_parser(), ["--steps", "5"])


@pytest.fixture(scope="module")
def unguided_purifier(tmp_path_factory) -> Path:
    """A tiny unguided purifier saved in the Hub layout (what --init-from continues)."""
    folder = tmp_path_factory.mktemp("init_from") / "purifier"
    unet = tiny_unet(seed=1)
    Purifier(unet, DDPMScheduler(num_train_timesteps=1000), t_star=20).save_pretrained(folder)
    return folder


def test_diffusion_init_from_continues_the_purifiers_denoiser(tmp_path, unguided_purifier):
    # A learning rate too small to move a weight: the export is the purifier's own denoiser,
    # where a fresh UNet (another seed) would differ everywhere.
    train("diffusion", tmp_path, "--init-from", str(unguided_purifier), "--steps", "1",
          "--batch-size", "4", "--lr", "1e-12", "--log-every", "1", "--checkpoint-every", "1")

    start = Purifier.from_pretrained(str(unguided_purifier)).unet.state_dict()
    exported = Purifier.from_pretrained(str(tmp_path / "final")).unet.state_dict()
    assert start.keys() == exported.keys()
    assert all(torch.allclose(start[key], exported[key], atol=1e-6) for key in start)
    args = json.loads((tmp_path / "args.json").read_text())
    assert args["init_from"] == str(unguided_purifier)


def test_diffusion_init_from_refuses_architecture_options(capsys, unguided_purifier):
    with pytest.raises(SystemExit) as exit_info:
        diffusion.parse_args(["--init-from", str(unguided_purifier),
                              "--block-out-channels", "8,8,8"])
    assert exit_info.value.code == 2
    assert "--init-from" in capsys.readouterr().err


@pytest.mark.parametrize("options, named", [
    (["--init-from", "no-such-purifier"], "--init-from"),
    (["--image-size", "32"], "--image-size"),
    (["--num-train-timesteps", "500"], "--num-train-timesteps"),
])
def test_diffusion_init_from_that_does_not_fit_is_refused_before_training(
        options, named, tmp_path, unguided_purifier):
    argv = ["--init-from", str(unguided_purifier), *options, "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        diffusion.main(argv)
    assert named in str(exit_info.value) and "--init-from" in str(exit_info.value)
    assert not (tmp_path / "checkpoints").exists()
