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


def test_base_moves_the_centre_of_the_sweep():
    args = choose_settings.build_parser().parse_args(
        ["--base", "t_star=200, steps=5", "--scale", "0,800"])
    assert choose_settings.sweep(args) == [
        ("base", "t_star=200,steps=5", {"t_star": 200, "n_steps": 5}),
        ("scale", "0", {"t_star": 200, "n_steps": 5, "guidance_scale": 0.0}),
        ("scale", "800", {"t_star": 200, "n_steps": 5, "guidance_scale": 800.0}),
    ]


def test_a_baseline_is_tuned_from_its_own_centre():
    args = choose_settings.build_parser().parse_args(
        ["--base", "guidance=pixel,scale=1", "--scale", "0.5,2"])
    assert choose_settings.sweep(args) == [
        ("base", "guidance=pixel,scale=1", {"guidance": "pixel", "guidance_scale": 1.0}),
        ("scale", "0.5", {"guidance": "pixel", "guidance_scale": 0.5}),
        ("scale", "2", {"guidance": "pixel", "guidance_scale": 2.0}),
    ]


def test_the_defended_models_own_arguments_are_swept_too():
    args = choose_settings.build_parser().parse_args(
        ["--base", "aggregate=vote", "--samples", "4", "--quick"])
    settings = choose_settings.sweep(args)
    assert settings == [("base", "aggregate=vote", {"aggregate": "vote"}),
                        ("samples", "4", {"aggregate": "vote", "n_samples": 4})]
    defences = choose_settings.build_defences(args, settings)
    vote = defences["samples=4"]
    assert (vote.n_samples, vote.aggregate) == (4, "vote")
    values = choose_settings.setting_values(vote)
    assert (values["n_samples"], values["aggregate"], values["t_star"]) == (4, "vote", 300)
    # a tie in robust accuracy goes to the fewer denoiser calls: 1 purification, not 4
    rows = [{"settings": choose_settings.setting_values(model), "robust_accuracy": 0.7,
             "clean_accuracy": 0.8, "factor": name} for name, model in defences.items()]
    assert choose_settings.best_setting(rows)["factor"] == "base=aggregate=vote"


def test_an_unknown_guidance_names_its_option():
    args = choose_settings.build_parser().parse_args(["--guidance", "magic", "--quick"])
    with pytest.raises(SystemExit, match="--guidance magic"):
        choose_settings.build_defences(args, choose_settings.sweep(args))


@pytest.mark.parametrize("base, message", [
    ("tstar=200", "--base: expected option=value with option one of t_star, steps"),
    ("steps", "--base: expected option=value"),
    ("steps=many", "--steps: expected integers, got 'many'"),
])
def test_a_bad_base_names_the_option_and_what_was_expected(base, message):
    args = choose_settings.build_parser().parse_args(["--base", base])
    with pytest.raises(SystemExit, match=message):
        choose_settings.sweep(args)


def test_the_best_setting_is_the_most_robust_and_ties_go_to_fewer_steps():
    rows = [
        {"factor": "base", "settings": {"n_steps": 10}, "robust_accuracy": 0.70, "clean_accuracy": 0.88},
        {"factor": "steps", "settings": {"n_steps": 5}, "robust_accuracy": 0.70, "clean_accuracy": 0.85},
        {"factor": "scale", "settings": {"n_steps": 10}, "robust_accuracy": 0.69, "clean_accuracy": 0.90},
    ]
    assert choose_settings.best_setting(rows)["factor"] == "steps"
    rows[2]["robust_accuracy"] = 0.71
    assert choose_settings.best_setting(rows)["factor"] == "scale"


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
    assert result["best"] in result["settings"]
