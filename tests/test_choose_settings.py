"""benchmarks/choose_settings.py: one factor at a time around the saved settings, on held-out
training images, with a table, a JSON and a picture per factor."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import choose_settings
from test_train import fashion_mnist_available  # noqa: F401 (a fixture)


def test_the_sweep_varies_one_factor_at_a_time_after_the_saved_settings():
    args = choose_settings.build_parser().parse_args(
        ["--t-star", "100, 200", "--scale", "0", "--guidance-on", "x_t"])
    assert choose_settings.sweep(args) == [
        ("base", "as-saved", {}),
        ("t_star", "100", {"t_star": 100}),
        ("t_star", "200", {"t_star": 200}),
        ("scale", "0", {"guidance_scale": 0.0}),
        ("guidance_on", "x_t", {"guidance_on": "x_t"}),
    ]


def test_a_value_of_the_wrong_type_names_its_option():
    args = choose_settings.build_parser().parse_args(["--steps", "five"])
    with pytest.raises(SystemExit, match="--steps: expected integers, got 'five'"):
        choose_settings.sweep(args)


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist_available")
def test_a_quick_run_writes_the_table_and_a_picture_per_factor(tmp_path):
    choose_settings.main(["--quick", "--t-star", "100", "--output-dir", str(tmp_path),
                          "--threads", "1"])
    result = json.loads((tmp_path / "settings.json").read_text())
    assert [(row["factor"], row["value"]) for row in result["settings"]] == [
        ("base", "as-saved"), ("t_star", "100")]
    assert result["held_out"] == {"size": 5000, "seed": 0}
    assert all(0 <= row[key] <= 1 for row in result["settings"]
               for key in ("clean_accuracy", "robust_accuracy", "robust_worst_case"))
    assert (tmp_path / "settings-t_star.png").stat().st_size > 0
