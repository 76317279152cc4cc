"""scripts/stage_purifier.py: the bundled purifier guided by another network, saved for evaluation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import stage_purifier

from purifyguard.registry import load_purifier

STANDARD = ROOT / "purifyguard" / "assets" / "classifiers" / "fashion-mnist-resnet18"


def test_the_staged_purifier_keeps_the_denoiser_and_takes_the_new_network(tmp_path):
    output = tmp_path / "staged"
    stage_purifier.main(["--guidance-network", str(STANDARD), "--setting", "guidance_scale=800",
                         "--output", str(output)])
    staged, bundled = load_purifier(str(output)), load_purifier("fashion-mnist-agdm")
    assert staged.current_config().guidance_scale == 800.0
    assert staged.current_config().t_star == bundled.current_config().t_star
    for name, weight in bundled.unet.state_dict().items():
        assert torch.equal(staged.unet.state_dict()[name], weight)
    conv = "conv1.weight"
    assert not torch.equal(staged.guidance_network.state_dict()[conv],
                           bundled.guidance_network.state_dict()[conv])


@pytest.mark.parametrize("argv, message", [
    (["--guidance-network", "nowhere"], "--guidance-network nowhere: expected a folder"),
    (["--guidance-network", str(STANDARD), "--setting", "guidance_scale"], "is not KEY=VALUE"),
    (["--guidance-network", str(STANDARD), "--setting", "t_star=-3"], "t_star"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        stage_purifier.main([*argv, "--output", str(tmp_path / "staged")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "staged").exists()
