"""Training that survives what goes wrong: checkpoints that cannot run code, --resume past a
damaged checkpoint, a resumed run held to its options, options checked before any work.

The runs are the tiny Fashion-MNIST diffusion runs of test_train.py (one 4-step run, shared,
and a few resumes of copies of it); the rest runs in this process and takes milliseconds.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import TINY, fashion_mnist_available, train  # noqa: F401 (a fixture)

from purifyguard.train import adapt, checkpoint, diffusion, guidance
from purifyguard.train.__main__ import main as train_main
from purifyguard.train.options import option_differences, parse_with_config
from purifyguard.train.run import last_checkpoint, read_metrics

OPTIONS = ["--steps", "4", "--batch-size", "8", "--checkpoint-every", "2", "--log-every", "1",
           "--keep-checkpoints", "5", *TINY["diffusion"]]
STEP_2, STEP_4 = "checkpoints/step_00000002", "checkpoints/step_00000004"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4 (new format)."""
    folder = tmp_path_factory.mktemp("straight") / "run"
    train("diffusion", folder, *OPTIONS)
    return folder


@pytest.fixture
def copy_of(tmp_path):
    def copy(run: Path) -> Path:
        return Path(shutil.copytree(run, tmp_path / "run"))
    return copy


def launch(output_dir: Path, *options: str) -> subprocess.CompletedProcess:
    """`python -m purifyguard.train diffusion ...` that may fail (its result is returned)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "purifyguard.train", "diffusion", "--output-dir",
               str(output_dir), "--no-progress", *options]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


def same_tensors(first: Path, second: Path) -> bool:
    a, b = load_file(first), load_file(second)
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


# --- the checkpoint format -------------------------------------------------------------------

def test_checkpoint_holds_no_pickle_and_lists_every_file(straight):
    folder = straight / STEP_4
    names = {path.name for path in folder.iterdir()}
    assert names == {"progress.json", "state.json", "state.safetensors", "rng_0.json",
                     "rng_0.safetensors"}
    manifest = json.loads((folder / "progress.json").read_text())
    assert (manifest["step"], manifest["routine"], manifest["processes"]) == (4, "diffusion", 1)
    assert set(manifest["files"]) == names - {"progress.json"}
    assert manifest["options"]["seed"] == 0 and "resume" not in manifest["options"]
    state = load_file(folder / "state.safetensors")
    assert any(key.startswith("objects/ema/shadow_params/") for key in state)  # the EMA
    assert any(key.startswith("optimizers/0/state/") for key in state)        # Adam's moments


def test_a_nested_state_round_trips_and_what_does_not_fit_is_refused(tmp_path):
    shared = torch.arange(6.0)
    state = {
        "weights": {"a": shared, "b": shared[:3], "c": torch.zeros(0)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}},
                      "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "foreach": None}]},
        "numbers": [float("nan"), float("inf"), -1, True, "text"],
        "numpy": np.random.get_state(),
    }
    checkpoint.save_tree(state, tmp_path, "state")
    loaded = checkpoint.load_tree(tmp_path, "state")
    assert torch.equal(loaded["weights"]["b"], shared[:3]) and loaded["weights"]["c"].numel() == 0
    assert loaded["optimizer"]["state"][0]["step"].item() == 3.0  # an int key stays an int
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert math.isnan(loaded["numbers"][0]) and loaded["numbers"][1:] == [math.inf, -1, True,
                                                                          "text"]
    assert loaded["numpy"][0] == "MT19937" and loaded["numpy"][1].dtype == np.uint32
    assert np.array_equal(loaded["numpy"][1], state["numpy"][1])

    with pytest.raises(ValueError, match=r"refused\.json: /schedulers/0/lr_lambdas/0 is a "
                                         r"builtins\.function"):
        checkpoint.save_tree({"schedulers": [{"lr_lambdas": [lambda step: 1.0]}]}, tmp_path,
                             "refused")


def test_random_states_are_restored(tmp_path):
    import random

    checkpoint.save_tree(checkpoint.rng_state(), tmp_path, "rng_0")
    expected = random.random(), np.random.rand(), torch.rand(1).item()
    checkpoint.restore_rng(checkpoint.load_tree(tmp_path, "rng_0"), tmp_path / "rng_0.json")
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.parametrize("damage, reason", [
    ("cut", "state.safetensors has .* bytes, the manifest says"),
    ("flip", "state.safetensors does not match its sha256"),
    ("delete", "rng_0.json is missing"),
    ("manifest", "progress.json is not valid JSON"),
])
def test_a_damaged_checkpoint_is_not_intact(straight, copy_of, damage, reason):
    run = copy_of(straight)
    folder = run / STEP_4
    if damage == "cut":
        data = (folder / "state.safetensors").read_bytes()
        (folder / "state.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray((folder / "state.safetensors").read_bytes())
        data[-10] ^= 0xFF
        (folder / "state.safetensors").write_bytes(bytes(data))
    elif damage == "delete":
        (folder / "rng_0.json").unlink()
    else:
        (folder / "progress.json").write_text('{"step": 4, "fi')

    assert checkpoint.problem(folder) is not None
    assert re.search(reason, checkpoint.problem(folder))
    assert last_checkpoint(run / "checkpoints") == run / STEP_2


# --- resume -------------------------------------------------------------------------------------

def test_resume_falls_back_past_a_truncated_newest_checkpoint(straight, copy_of):
    run = copy_of(straight)
    newest = run / STEP_4 / "state.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # a save cut short by a full disk, say

    result = train("diffusion", run, "--resume", *OPTIONS)

    assert "skipping checkpoint" in result.stdout and "step_00000004" in result.stdout
    assert "state.safetensors has 1000 bytes" in result.stdout
    assert "resuming from" in result.stdout and "at step 2" in result.stdout
    # From step 2 the run went on exactly as the uninterrupted one did.
    assert same_tensors(straight / STEP_4 / "state.safetensors", run / STEP_4 / "state.safetensors")
    assert [line["step"] for line in read_metrics(run)] == [1, 2, 3, 4]


def test_resume_refuses_when_every_checkpoint_is_damaged(straight, copy_of):
    run = copy_of(straight)
    for step in (STEP_2, STEP_4):
        (run / step / "rng_0.safetensors").write_bytes(b"garbage")

    result = launch(run, "--resume", *OPTIONS)

    assert result.returncode == 1, result.stderr
    assert "no intact checkpoint" in result.stderr and "step_00000002" in result.stderr
    assert "starting at step 0" not in result.stdout


def test_resume_with_other_defining_options_is_refused(straight, copy_of):
    run = copy_of(straight)
    options = [*OPTIONS, "--seed", "1", "--lr", "0.001"]

    result = launch(run, "--resume", *options)

    assert result.returncode == 1, result.stderr
    assert "--seed: 0 in the checkpoint, 1 now" in result.stderr
    assert "--lr: 0.0002 in the checkpoint, 0.001 now" in result.stderr
    assert json.loads((run / "args.json").read_text())["seed"] == 0  # nothing was overwritten


def test_resume_may_extend_a_run_that_has_no_step_schedule(straight, copy_of):
    """diffusion (constant learning rate) may grow --steps on resume; guidance, whose one-cycle
    schedule is built for --steps, may not (checked on the comparison itself, without training)."""
    run = copy_of(straight)
    options = [option if option != "4" else "6" for option in OPTIONS]

    result = launch(run, "--resume", *options)

    assert result.returncode == 0, result.stderr
    assert last_checkpoint(run / "checkpoints").name == "step_00000006"
    assert option_differences({"steps": 4}, {"steps": 6}, frozenset({"steps"})) == []
    assert option_differences({"steps": 4}, {"steps": 6}) == ["--steps: 4 in the checkpoint, 6 now"]


def test_resume_skips_a_cut_metrics_line_and_accepts_other_logging_options(straight, copy_of):
    run = copy_of(straight)
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 5, "lo')  # a kill in the middle of a write

    # --log-every, --checkpoint-every, --keep-checkpoints do not define the run: they may change.
    train("diffusion", run, "--resume", *OPTIONS, "--log-every", "3", "--checkpoint-every", "3",
          "--keep-checkpoints", "1")

    assert [line["step"] for line in read_metrics(run)] == [1, 2, 3, 4]
    assert (run / "metrics.jsonl").read_text().endswith("}\n")


# --- checkpoints of earlier versions (accelerate's save_state) ----------------------------------

@pytest.fixture(scope="module")
def legacy(straight, tmp_path_factory) -> Path:
    """The straight run with step 2 rewritten by accelerate's save_state, as purifyguard wrote
    checkpoints before (model.safetensors, optimizer.bin, random_states_0.pkl,
    custom_checkpoint_0.pkl, progress.json with the step alone), and step 4 gone."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    run = Path(shutil.copytree(straight, tmp_path_factory.mktemp("legacy") / "run"))
    shutil.rmtree(run / STEP_4)
    ours = run / STEP_2
    args = diffusion.parse_args(OPTIONS)
    unet = diffusion.build_unet(args)
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=UNet2DModel,
                   model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    state = checkpoint.load_tree(ours, "state")
    unet.load_state_dict(state["models"][0])
    optimizer.load_state_dict(state["optimizers"][0])
    ema.load_state_dict(state["objects"]["ema"])
    try:
        accelerator = Accelerator(cpu=True)
        unet, optimizer = accelerator.prepare(unet, optimizer)
        accelerator.register_for_checkpointing(ema)
        accelerator.step = state["accelerator_step"]
        shutil.rmtree(ours)
        checkpoint.restore_rng(checkpoint.load_tree(straight / STEP_2, "rng_0"), "rng_0")
        accelerator.save_state(str(ours))  # saves the random states just restored
    finally:
        AcceleratorState._reset_state(True)
    (ours / "progress.json").write_text(json.dumps({"step": 2}) + "\n")
    assert {"optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"} <= {
        path.name for path in ours.iterdir()}
    return run


def test_an_old_format_checkpoint_resumes(legacy, straight, copy_of):
    run = copy_of(legacy)

    result = train("diffusion", run, "--resume", *OPTIONS)

    assert "at step 2" in result.stdout
    # Weights, Adam moments, EMA and random states all came back: the run ends where the
    # uninterrupted one ended.
    assert same_tensors(straight / STEP_4 / "state.safetensors", run / STEP_4 / "state.safetensors")


class Payload:
    """A pickle that writes a marker file when it is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('the pickle ran')",))


@pytest.mark.parametrize("planted, as_torch_file", [
    ("custom_checkpoint_0.pkl", True), ("random_states_0.pkl", False),
    ("optimizer.bin", True),
])
def test_a_planted_pickle_in_an_old_checkpoint_is_refused(legacy, copy_of, tmp_path, planted,
                                                          as_torch_file):
    # The payload works: plain unpickling runs it.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control)))
    assert control.exists()

    run = copy_of(legacy)
    marker = tmp_path / "marker"
    path = run / STEP_2 / planted
    if as_torch_file:
        torch.save({"decay": 0.999, "shadow_params": [Payload(marker)]}, path)
    else:
        path.write_bytes(pickle.dumps({"step": 2, "random_state": Payload(marker)}, protocol=2))

    with pytest.raises(ValueError, match=planted) as refused:
        checkpoint.read_legacy(run / STEP_2, 0, models=1, optimizers=1, schedulers=0,
                               objects=1, scaler=False)
    assert "refused" in str(refused.value)
    assert not marker.exists()


def test_resume_refuses_a_planted_pickle_and_never_runs_it(legacy, copy_of, tmp_path):
    run = copy_of(legacy)
    marker = tmp_path / "marker"
    torch.save({"decay": Payload(marker)}, run / STEP_2 / "custom_checkpoint_0.pkl")

    result = launch(run, "--resume", *OPTIONS)

    assert result.returncode == 1, result.stderr
    assert "custom_checkpoint_0.pkl is refused" in result.stderr
    assert not marker.exists()


# --- options ------------------------------------------------------------------------------------

ADAPT = ["--purifier", "p", "--classifier", "c"]


@pytest.mark.parametrize("module, argv, named", [
    (diffusion, ["--steps", "0"], "--steps"),
    (diffusion, ["--steps", "-3"], "--steps"),
    (diffusion, ["--steps", "2.5"], "--steps"),
    (diffusion, ["--batch-size", "0"], "--batch-size"),
    (diffusion, ["--checkpoint-every", "0"], "--checkpoint-every"),
    (diffusion, ["--log-every", "0"], "--log-every"),
    (diffusion, ["--keep-checkpoints", "0"], "--keep-checkpoints"),
    (diffusion, ["--grad-accum", "0"], "--grad-accum"),
    (diffusion, ["--num-workers", "-1"], "--num-workers"),
    (diffusion, ["--lr", "nan"], "--lr"),
    (diffusion, ["--lr", "0"], "--lr"),
    (diffusion, ["--lr", "inf"], "--lr"),
    (diffusion, ["--t-max", "0"], "--t-max"),
    (diffusion, ["--t-max", "1001"], "--t-max"),
    (diffusion, ["--ema-decay", "1"], "--ema-decay"),
    (guidance, ["--eps", "-0.1"], "--eps"),
    (guidance, ["--beta", "nan"], "--beta"),
    (guidance, ["--pgd-steps", "-1"], "--pgd-steps"),
    (guidance, ["--model-kwargs", "[1]"], "--model-kwargs"),
    (adapt, [*ADAPT, "--clean-weight", "1.5"], "--clean-weight"),
    (adapt, [*ADAPT, "--attack-steps", "-1"], "--attack-steps"),
])
def test_a_bad_option_is_refused_naming_it(module, argv, named, capsys):
    parse = diffusion.parse_args if module is diffusion else (
        lambda a: parse_with_config(module.build_parser(), a))
    with pytest.raises(SystemExit) as refused:
        parse(argv)
    assert refused.value.code == 2
    error = capsys.readouterr().err
    assert named in error and argv[-1] in error, error


@pytest.mark.parametrize("name, content, expected", [
    ("options.yaml", "steps: 2.5\n", r"--steps.*options\.yaml.*2\.5"),
    ("options.yaml", "lr: .nan\n", r"--lr.*options\.yaml.*finite"),
    ("options.yaml", "t_max: 0\n", r"--t-max.*options\.yaml"),
    ("options.yaml", "resume: 'yes'\n", r"--resume.*options\.yaml.*true or false"),
    ("options.yaml", "mixed_precision: fp8\n", r"--mixed-precision.*options\.yaml.*choice"),
    ("options.yaml", "", r"options\.yaml is empty"),
    ("options.yaml", "steps: [1,\n", r"options\.yaml is not valid YAML"),
    ("options.yaml", "- steps\n", r"options\.yaml must hold a mapping"),
    ("options.json", "", r"options\.json is empty"),
    ("options.json", '{"steps": 2,', r"options\.json is not valid JSON"),
    ("options.json", '{"steps": true}', r"--steps.*options\.json.*integer"),
])
def test_a_bad_config_file_is_refused_naming_the_file(tmp_path, capsys, name, content, expected):
    config = tmp_path / name
    config.write_text(content)
    with pytest.raises(SystemExit) as refused:
        diffusion.parse_args(["--config", str(config)])
    assert refused.value.code == 2
    assert re.search(expected, capsys.readouterr().err.replace("\n", " "))


def test_config_file_values_are_converted_like_flags(tmp_path):
    config = tmp_path / "options.yaml"
    config.write_text("steps: '12'\nlr: 1e-3\nblock_out_channels: [8, 16, 16]\nno_progress: true\n")
    args = diffusion.parse_args(["--config", str(config)])
    assert (args.steps, args.lr, args.block_out_channels, args.no_progress) == (
        12, 0.001, (8, 16, 16), True)


def test_steps_zero_stops_the_command_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:  # it used to export an untrained model, exit 0
        train_main(["diffusion", "--output-dir", str(tmp_path / "run"), "--steps", "0"])
    assert refused.value.code == 2
    assert ("argument --optimizer-steps/--steps: expected an integer >= 1, got '0'"
            in capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, code", [(["--help"], 0), ([], 2), (["difusion"], 2)])
def test_train_without_a_routine_lists_the_routines(argv, code, capsys):
    with pytest.raises(SystemExit) as stopped:
        train_main(argv)
    assert stopped.value.code == code
    printed = capsys.readouterr()
    listing = printed.out if code == 0 else printed.err
    for line in ("diffusion  train the denoiser", "guidance   train the guidance network",
                 "adapt      fine-tune a purifier's guidance to a classifier"):
        assert line in listing
    if argv == ["difusion"]:
        assert "unknown routine 'difusion'" in printed.err


def test_a_full_disk_while_checkpointing_names_the_file(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from purifyguard.train import checkpoint

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull,"
                              " message: \"No space left on device\" })")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError, match=r"could not write the checkpoint file .*state\.safetensors: "
                                      r"Error while serializing.*StorageFull.*--resume"):
        checkpoint.save_tree({"weights": torch.zeros(3)}, tmp_path, "state")
