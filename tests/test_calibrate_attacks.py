"""benchmarks/calibrate_attacks.py: every attack spends the same budget of gradient evaluations,
bad arguments stop before any model loads, and a quick run on the bundled classifier writes the
table with one row per attack and the paired tests of apgd-eot against the others."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import calibrate_attacks


@pytest.mark.parametrize("budget, eot", [(40, 1), (40, 2), (12, 3)])
def test_every_attack_spends_at_most_the_budget(budget, eot):
    specs = calibrate_attacks.attack_specs(budget, eot, with_em=True, with_bpda=True)
    assert [spec.name for spec in specs] == ["apgd-eot", "pgd-eot", "autoattack-rand",
                                              "apgd-eot-em", "bpda"]
    for spec in specs:
        assert spec.eot == eot
        assert spec.gradient_evaluations <= budget, spec.name
    stepped = [spec for spec in specs if spec.kind != "autoattack-rand"]
    assert all(spec.gradient_evaluations == budget for spec in stepped)


def test_bpda_and_em_only_when_asked():
    names = [spec.name for spec in calibrate_attacks.attack_specs(40, 2, with_em=False)]
    assert names == ["apgd-eot", "pgd-eot", "autoattack-rand"]


@pytest.mark.parametrize("option", ["--n", "--budget", "--eot", "--runs"])
def test_a_non_positive_count_is_refused_by_name(option, tmp_path):
    with pytest.raises(SystemExit, match=f"{option} must be >= 1, got 0"):
        calibrate_attacks.main([option, "0", "--output-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_more_images_than_bundled_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--n 513: only 512 test images are bundled"):
        calibrate_attacks.main(["--n", "513", "--output-dir", str(tmp_path)])


def test_a_quick_run_writes_one_row_per_attack(tmp_path, capsys):
    calibrate_attacks.main(["--quick", "--defences", "undefended", "--with-bpda",
                            "--output-dir", str(tmp_path)])
    table = (tmp_path / "calibration.md").read_text()
    rows = [line for line in table.splitlines()
            if line.startswith("| undefended |") and " vs " not in line]
    assert [row.split(" | ")[1] for row in rows] == ["apgd-eot", "pgd-eot", "autoattack-rand",
                                                     "bpda"]
    assert "--quick --defences undefended --with-bpda" in table
    # the bare classifier is deterministic and 4 steps of an L-inf 0.1 attack fool some of it
    pgd_row = next(line for line in table.splitlines() if "| pgd-eot |" in line)
    assert not pgd_row.split(" | ")[3].startswith("100.0")
    assert (tmp_path / "convergence-undefended.png").exists()
    paired = [line for line in table.splitlines() if "| apgd-eot vs " in line]
    assert [row.split(" | ")[1] for row in paired] == [
        "apgd-eot vs pgd-eot", "apgd-eot vs autoattack-rand", "apgd-eot vs bpda"]
