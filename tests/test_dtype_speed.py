"""benchmarks/experiments/dtype_speed.py: its arguments are checked before any model loads, and a tiny run on
the bundled purifier prints float32 against bfloat16 with the reference's own row exact."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "experiments"))

import dtype_speed


@pytest.mark.parametrize("argv, message", [
    (["--dtypes", "bfloat16,float32"], "--dtypes: expected float32 first"),
    (["--dtypes", "float32,int8"], "--dtypes: expected float32 first"),
    (["--batch", "0"], "--batch: expected a positive integer, got 0"),
    (["--repeats", "-1"], "--repeats: expected a positive integer, got -1"),
])
def test_bad_arguments_name_the_option(argv, message):
    args = dtype_speed.build_parser().parse_args(argv)
    with pytest.raises(SystemExit, match=message):
        dtype_speed.check_arguments(args)


@pytest.mark.skipif(dtype_speed.torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_without_a_gpu_is_refused():
    args = dtype_speed.build_parser().parse_args(["--device", "cuda"])
    with pytest.raises(SystemExit, match="no CUDA device is available"):
        dtype_speed.check_arguments(args)


@pytest.mark.slow
def test_a_tiny_run_compares_bfloat16_with_float32(tmp_path, capsys):
    output = tmp_path / "dtype.json"
    dtype_speed.main(["--dtypes", "float32,bfloat16", "--batch", "2", "--attack-batch", "1",
                      "--repeats", "1", "--clean-n", "4", "--device", "cpu",
                      "--json", str(output)])
    rows = {row["dtype"]: row for row in json.loads(output.read_text())["rows"]}
    assert rows["float32"]["max_difference"] == 0
    assert rows["float32"]["same_prediction"] == 1
    assert rows["bfloat16"]["max_difference"] > 0  # reduced precision does change the images
    assert -1 <= rows["bfloat16"]["gradient_cosine_mean"] <= 1
    assert "bfloat16" in capsys.readouterr().out
