"""benchmarks/ lists what is maintained; benchmarks/experiments/ says what each experiment
measured and where it is written up: every script has its README line."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("folder", [BENCHMARKS, BENCHMARKS / "experiments"],
                         ids=["benchmarks", "experiments"])
def test_every_script_has_its_readme_line(folder: Path) -> None:
    readme = (folder / "README.md").read_text(encoding="utf-8")
    missing = [script.name for script in sorted(folder.glob("*.py"))
               if f"`{script.name}`" not in readme]
    assert not missing, f"{folder / 'README.md'} does not list {missing}"
