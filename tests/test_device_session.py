"""scripts/device_session.sh brings its runs back in archives the device tool returns: at most 8
files, none deeper than two folders, each under 16 MiB."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "device_session.sh"


def test_the_device_session_packs_every_part_into_archives_two_folders_down(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    for part in ("ours", "baselines", "vit"):
        adversarial = work / f"fashion-mnist-{part}" / "adversarial"
        adversarial.mkdir(parents=True)
        (adversarial / f"{part}--apgd-eot--batch0.safetensors").write_bytes(b"x")
        (work / f"fashion-mnist-{part}.log").write_text("part log\n")
    merged = work / "fashion-mnist-whole" / "adversarial"
    merged.mkdir(parents=True)
    (merged / "copy.safetensors").write_bytes(b"x")
    (work / "fashion-mnist-whole" / "benchmark.json").write_text("{}")
    (work / "benchmarks.md").write_text("# page\n")
    (work / "benchmark.log").write_text("part ours: exit 0\n")
    (work / "trades-beta3" / "checkpoints").mkdir(parents=True)
    (work / "fashion-mnist-clean-cost" / "clean-cost").mkdir(parents=True)
    (work / "fashion-mnist-clean-cost" / "clean-cost" / "run.json").write_text("{}")
    env = {**os.environ, "TINY": "1", "WORK": str(work), "OUT": str(out), "DATA": str(tmp_path),
           "BUDGET_PARTS": "0", "BUDGET_WHOLE": "0", "BUDGET_TRADES": "0"}

    subprocess.run(["bash", str(SCRIPT)], cwd=SCRIPT.parents[1], env=env, check=True,
                   capture_output=True, timeout=120)

    returned = sorted(path.name for path in out.iterdir())
    assert returned == ["benchmark.log", "parts-1.tar.gz", "parts-2.tar.gz", "parts-3.tar.gz",
                        "trades.tar.gz", "whole.tar.gz"]
    with tarfile.open(out / "parts-1.tar.gz") as archive:
        names = archive.getnames()
    assert "./fashion-mnist-ours/adversarial/ours--apgd-eot--batch0.safetensors" in names \
        or "fashion-mnist-ours/adversarial/ours--apgd-eot--batch0.safetensors" in names
    assert not any("baselines/" in name for name in names)
    with tarfile.open(out / "parts-3.tar.gz") as archive:
        names = archive.getnames()
    assert any(name.endswith("fashion-mnist-clean-cost/clean-cost/run.json") for name in names)
    with tarfile.open(out / "whole.tar.gz") as archive:
        names = archive.getnames()
    assert any(name.endswith("fashion-mnist-whole/benchmark.json") for name in names)
    assert any(name.endswith("benchmarks.md") for name in names)
    assert not any("whole/adversarial" in name for name in names)  # merged copies stay behind
