"""What ships names no folder of the machine that built it: no absolute paths of the training
machine in the bundled models' configs and model cards, no citation of files users do not have
(the project's working notes), and a saved purifier does not record where its UNet was loaded
from."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from purifyguard import Purifier
from purifyguard.provenance import (
    is_absolute_path,
    portable_arguments,
    portable_command,
    portable_record,
)

ROOT = Path(__file__).parent.parent
SHIPPED = [ROOT / "purifyguard", ROOT / "docs", ROOT / "examples", ROOT / "README.md"]
TEXT_SUFFIXES = {".py", ".md", ".json", ".yaml", ".yml", ".txt", ".cfg"}
# Folders of the machines this project was built on, and its notes that users do not have.
FORBIDDEN = ["/work/", "/tmp/", "/root/", "/home/", "/usr/share/datasets", "../shared",
             "shared/METHOD", "shared/data", "METHOD.md"]
# Public locations that are fine to name, with the reason.
ALLOWED = {
    "/usr/share/datasets/fashion-mnist": "where Debian's dataset-fashion-mnist package installs "
                                         "the data set; purifyguard.data looks there",
}
# An option given an absolute path (or ~), as a recorded training command would hold it.
OPTION_WITH_ABSOLUTE_PATH = re.compile(r"--[\w-]+[ =]['\"]?(/|~|[A-Za-z]:\\)")


def shipped_text_files() -> list[Path]:
    files = []
    for entry in SHIPPED:
        candidates = [entry] if entry.is_file() else sorted(entry.rglob("*"))
        files += [path for path in candidates if path.is_file() and path.suffix in TEXT_SUFFIXES
                  and "__pycache__" not in path.parts]
    return files


def test_no_shipped_file_names_a_folder_of_the_build_machine():
    files = shipped_text_files()
    assert len(files) > 50  # the walk found the package, the docs and the examples
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for allowed in ALLOWED:
                line = line.replace(allowed, "")
            found += [f"{path.relative_to(ROOT)}:{number}: {pattern}" for pattern in FORBIDDEN
                      if pattern in line]
    assert not found, "\n".join(found)


def test_the_bundled_training_records_hold_placeholders_not_paths():
    assets = ROOT / "purifyguard" / "assets"
    records = sorted(assets.rglob("purifier_config.json")) + sorted(assets.rglob("README.md"))
    assert len(records) >= 5
    for path in records:
        text = path.read_text()
        assert not OPTION_WITH_ABSOLUTE_PATH.search(text), path
    for path in sorted(assets.rglob("purifier_config.json")):
        extra = json.loads(path.read_text())["extra"]
        assert portable_record(extra) == extra, path
    for path in sorted(assets.rglob("unet/config.json")):
        assert "_name_or_path" not in json.loads(path.read_text()), path
    card = (assets / "purifiers" / "fashion-mnist-agdm" / "README.md").read_text()
    assert "--data-root '<fashion-mnist folder>'" in card  # run folders: relative or placeholders


def test_portable_commands_keep_the_options_and_replace_only_absolute_paths():
    command = ("purifyguard train adapt --purifier /srv/runs/agdm --classifier runs/clf/final "
               "--data fashion-mnist --data-root=/data/fmnist --teacher ~/t "
               "--model-kwargs '{\"channels\": [16, 32]}' --output-dir 'C:\\runs\\x' --seed 0")
    assert portable_command(command) == (
        "purifyguard train adapt --purifier '<purifier folder>' --classifier runs/clf/final "
        "--data fashion-mnist '--data-root=<fashion-mnist folder>' --teacher '<teacher folder>' "
        "--model-kwargs '{\"channels\": [16, 32]}' --output-dir '<run folder>' --seed 0")
    record = {"command": command, "classifier": "/srv/clf", "steps": 3,
              "inner": {"data": "fashion-mnist (training split)"}}
    assert portable_record(record) == {
        "command": portable_command(command), "classifier": "<classifier folder>", "steps": 3,
        "inner": {"data": "fashion-mnist (training split)"}}
    assert is_absolute_path("/a") and is_absolute_path("~/a") and not is_absolute_path("a/b")


def test_a_runs_saved_options_keep_their_values_but_not_the_machines_folders():
    options = {"data": "fashion-mnist", "data_root": "/usr/share/datasets/fashion-mnist",
               "output_dir": "/work/runs/x", "teacher": "runs/t/final", "steps": 6000,
               "model_kwargs": {"channels": [16, 32]}, "config": None}
    assert portable_arguments(options) == {
        "data": "fashion-mnist", "data_root": "<fashion-mnist folder>",
        "output_dir": "<run folder>", "teacher": "runs/t/final", "steps": 6000,
        "model_kwargs": {"channels": [16, 32]}, "config": None}


# purifyguard/hub.py saves the UNet with diffusers' save_pretrained, which writes `_name_or_path`;
# until hub.py drops it, this fails (strict: the marker must go once it passes).
@pytest.mark.parametrize("loaded_by", ["UNet2DModel.from_pretrained", "Purifier.from_pretrained"])
def test_a_saved_purifier_does_not_record_where_its_unet_was_loaded_from(tmp_path, unet,
                                                                          loaded_by):
    """diffusers' save_pretrained writes `_name_or_path`, the folder a model was loaded from,
    into its config.json: saved as it is, a purifier would carry a path of this machine."""
    from diffusers import UNet2DModel

    source = (tmp_path / "trained-somewhere").resolve()
    Purifier(unet, t_star=5).save_pretrained(source)
    if loaded_by == "UNet2DModel.from_pretrained":
        purifier = Purifier(UNet2DModel.from_pretrained(source / "unet"), t_star=5)
    else:
        purifier = Purifier.from_pretrained(source)
    saved = purifier.save_pretrained(tmp_path / "shared")

    unet_config = json.loads((saved / "unet" / "config.json").read_text())
    assert str(source) not in json.dumps(unet_config)
    for path in saved.rglob("*"):
        if path.is_file() and path.suffix in TEXT_SUFFIXES:
            assert str(source) not in path.read_text(), path
