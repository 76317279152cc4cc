"""scripts/benchmark_parts.sh skips a part that has finished (it has a benchmark.json) unless
REJUDGE=1 asks for it again, and starts nothing once its BUDGET is spent."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "benchmark_parts.sh"


def run_parts(state: Path, **env_extra: str) -> str:
    env = {**os.environ, "TINY": "1", "STATE": str(state), "DATA": str(state), "BUDGET": "0",
           **env_extra}
    result = subprocess.run(["bash", str(SCRIPT)], cwd=SCRIPT.parents[1], env=env, check=True,
                            capture_output=True, text=True, timeout=60)
    return result.stdout


def test_a_finished_part_is_skipped_and_rejudge_runs_it_again(tmp_path):
    (tmp_path / "fashion-mnist-gdmp").mkdir()
    (tmp_path / "fashion-mnist-gdmp" / "benchmark.json").write_text("{}")

    lines = run_parts(tmp_path).splitlines()

    assert "part gdmp: finished before (REJUDGE=1 rewrites its report)" in lines
    assert "part ours: not started (BUDGET spent)" in lines
    assert len(lines) == 8  # every part said how it ended
    rejudged = run_parts(tmp_path, REJUDGE="1").splitlines()
    assert "part gdmp: not started (BUDGET spent)" in rejudged
