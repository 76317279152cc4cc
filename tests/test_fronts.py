"""benchmarks/fronts.py: the clean/robust front of TRADES classifiers beside the front of our
purifier's settings, and where ours lies above the TRADES front."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from purifyguard.evaluation.attacks import parse_attack

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import fronts
from benchmark_page import named_classifiers

TINY_ATTACK = "pgd:steps=1,eot=1,eps=0.1"


def at(label: str, clean: float, robust: float, n: int = 1000, family: str = "ours",
       worst: float | None = None) -> dict:
    worst = robust if worst is None else worst
    return fronts.point(family, label, clean, robust, worst, n, 1, "hand-made")


def trades_front(n: int = 1000) -> list[dict]:
    """beta6 (0.80 clean, 0.60 robust) to beta0 (0.90, 0.00), beta1 dominated by beta3."""
    points = [at("beta6", 0.80, 0.60, n, "trades"), at("beta3", 0.85, 0.40, n, "trades"),
              at("beta1", 0.84, 0.30, n, "trades"), at("beta0", 0.90, 0.00, n, "trades")]
    return fronts.pareto_front(points)


def sweep_file(folder: Path, name: str, rows: list[dict] | None = None, **changes) -> str:
    """A settings.json as choose_settings.py writes it (n=4, R=1, the 1-step pgd)."""
    content = {"purifier": "fashion-mnist-agdm", "attack": parse_attack(TINY_ATTACK).to_dict(),
               "n": 4, "runs": 1, "seed": 0, "held_out": {"size": 5000, "seed": 0},
               "settings": rows if rows is not None else [row("base", "as-saved", 0.75, 0.5)]}
    content.update(changes)
    path = folder / name
    path.write_text(json.dumps(content))
    return str(path)


def row(factor: str, value: str, clean: float, robust: float) -> dict:
    return {"factor": factor, "value": value, "change": {}, "settings": {},
            "clean_accuracy": clean, "robust_accuracy": robust, "robust_worst_case": robust / 2}


def test_the_pareto_front_keeps_the_points_nothing_dominates_by_clean_accuracy():
    points = [at("a", 0.80, 0.60), at("b", 0.85, 0.40), at("c", 0.84, 0.30), at("d", 0.90, 0.00),
              at("e", 0.80, 0.55)]
    assert [item["label"] for item in fronts.pareto_front(points)] == ["a", "b", "d"]


def test_above_within_and_beyond_the_intervals_against_the_interpolated_front():
    front = trades_front()
    # at clean 0.825 the front interpolates halfway between beta6 and beta3: robust 0.50
    assert fronts.front_at(front, 0.825, "robust_accuracy") == pytest.approx(0.50)
    within = fronts.verdict(at("within", 0.825, 0.51), front)
    assert within["verdict"] == "above, within the intervals"
    assert within["trades_front_robust"] == pytest.approx(0.50)
    assert within["trades_front_robust_upper"] > 0.51
    assert fronts.verdict(at("beyond", 0.825, 0.60), front)["verdict"] == (
        "above, beyond the intervals")
    assert fronts.verdict(at("below", 0.825, 0.45), front)["verdict"] == "below"
    assert fronts.verdict(at("on", 0.85, 0.40), front)["verdict"] == "on the TRADES front"


def test_the_intervals_decide_beyond_on_few_images():
    # the same margin (0.60 against 0.50) lies within the intervals on 20 images
    assert fronts.verdict(at("few", 0.825, 0.60, n=20), trades_front(n=20))["verdict"] == (
        "above, within the intervals")


@pytest.mark.parametrize("clean", [0.70, 0.95])
def test_no_verdict_is_extrapolated_beyond_the_trades_clean_range(clean):
    result = fronts.verdict(at("outside", clean, 0.99), trades_front())
    assert result == {"verdict": "outside the TRADES front's clean range",
                      "trades_front_robust": None, "trades_front_robust_upper": None,
                      "worst_case_verdict": "outside the TRADES front's clean range",
                      "trades_front_worst_case": None}


def test_the_statement_says_where_ours_is_above_and_what_lies_outside():
    trades = [at("beta6", 0.80, 0.60, family="trades"), at("beta0", 0.90, 0.00, family="trades")]
    ours = [at("scale=800", 0.85, 0.50), at("t_star=100", 0.85, 0.31),
            at("steps=5", 0.85, 0.20), at("t_star=400", 0.70, 0.65)]
    result = fronts.fronts(ours, trades)
    assert result["verdict"] == (
        "ours lies above the TRADES front at 2 of 4 settings (scale=800, t_star=100; 1 beyond "
        "the intervals: scale=800); 1 lies outside the TRADES front's clean range; judged by "
        "the worst of R (an attacker who may resubmit), at 2 of 4 (scale=800, t_star=100)")
    assert result["fronts"] == {"ours": ["t_star=400", "scale=800"],
                                "trades": ["beta6", "beta0"]}
    assert [item["on_front"] for item in result["points"]] == [True, False, False, True,
                                                                True, True]
    assert fronts.statement([at("a", 0.85, 0.1) | {"verdict": "below",
                                                    "worst_case_verdict": "below"}]) == (
        "ours lies above the TRADES front at 0 of 1 settings; judged by the worst of R (an "
        "attacker who may resubmit), at 0 of 1")


def test_the_worst_case_verdict_judges_the_worst_of_r_against_the_fronts_worst_case():
    """Above on the mean, below on the worst of R: a randomised defence that resubmission beats."""
    resubmitted = fronts.verdict(at("vote", 0.82, 0.60, worst=0.45), trades_front())
    assert resubmitted["verdict"] == "above, beyond the intervals"
    assert resubmitted["trades_front_worst_case"] == pytest.approx(0.52)
    assert resubmitted["worst_case_verdict"] == "below"
    assert fronts.verdict(at("fixed", 0.82, 0.60, worst=0.55),
                          trades_front())["worst_case_verdict"] == "above"


def test_a_point_carries_its_wilson_intervals():
    item = at("a", 0.5, 0.5, n=100)
    assert item["clean_ci95"] == pytest.approx([0.404, 0.596], abs=1e-3)
    assert item["robust_ci95"] == item["clean_ci95"]


def test_points_are_labelled_by_their_change():
    assert fronts.setting_label(row("scale", "800", 0, 0), "as-saved") == "scale=800"
    assert fronts.setting_label(row("base", "as-saved", 0, 0), "as-saved") == "as-saved"
    assert fronts.setting_label(row("class_weight", "0.5", 0, 0),
                                "class_weight=1,steps=5") == "class_weight=0.5,steps=5"


def test_every_row_of_every_sweep_and_round_is_a_point(tmp_path):
    rounds = {"rounds": [
        json.loads(Path(sweep_file(tmp_path, "a.json", [
            row("base", "as-saved", 0.8, 0.6), row("scale", "800", 0.85, 0.65)])).read_text()),
        json.loads(Path(sweep_file(tmp_path, "b.json", [
            row("base", "steps=5", 0.7, 0.5), row("scale", "800", 0.72, 0.55)])).read_text()),
    ]}
    (tmp_path / "rounds.json").write_text(json.dumps(rounds))
    sweeps = fronts.read_sweeps([str(tmp_path / "rounds.json"), str(tmp_path / "a.json")])
    fronts.check_same_measurement(sweeps)
    points = fronts.ours_points(sweeps)
    assert [item["label"] for item in points] == [
        "as-saved", "scale=800", "steps=5", "steps=5,scale=800", "as-saved #2", "scale=800 #2"]
    assert points[2]["source"].endswith("rounds.json (round 2)")


@pytest.mark.parametrize("changes, message", [
    ({"n": 8}, "n 8 against 4"),
    ({"seed": 1}, "seed 1 against 0"),
    ({"held_out": {"size": 1000, "seed": 0}}, "held_out"),
    ({"attack": parse_attack("pgd:steps=1,eot=1,eps=0.05").to_dict()},
     "attack eps 0.05 against 0.1"),
])
def test_sweeps_measured_otherwise_are_refused_naming_the_file(tmp_path, changes, message):
    first = sweep_file(tmp_path, "first.json")
    other = sweep_file(tmp_path, "other.json", **changes)
    with pytest.raises(SystemExit, match=f"--sweeps {other}: measured otherwise than "
                                         f"{first} .*{message}"):
        fronts.check_same_measurement(fronts.read_sweeps([first, other]))


def test_a_file_that_is_no_sweep_is_refused_naming_it(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"records": []}))
    with pytest.raises(SystemExit, match=f"--sweeps {path}: not a settings.json .*missing attack"):
        fronts.read_sweeps([str(path)])
    with pytest.raises(SystemExit, match="--sweeps nowhere.json: no such file"):
        fronts.read_sweeps(["nowhere.json"])


def test_the_sweeps_attack_is_rebuilt_exactly():
    for text in (TINY_ATTACK, "apgd-eot:steps=20,eot=2", "pgd:gradient=surrogate,steps=2",
                 "apgd-eot:substitute=smooth,steps=10", "transfer:source=guidance"):
        spec = parse_attack(text)
        assert fronts.attack_from_record(spec.to_dict()).identity() == spec.identity()
    record = parse_attack(TINY_ATTACK).to_dict() | {"gradient_evaluations": 99}
    with pytest.raises(ValueError, match="gradient_evaluations"):
        fronts.attack_from_record(record)


@pytest.mark.parametrize("value, message", [
    ("beta6", "--trades 'beta6': expected NAME=CLASSIFIER"),
    ("=fashion-mnist-resnet18", "--trades '=fashion-mnist-resnet18': expected NAME=CLASSIFIER"),
    ("beta1=no/such/folder",
     "--trades 'beta1=no/such/folder': no/such/folder is neither a folder nor a bundled"),
    ("a/b=fashion-mnist-resnet18", "--trades 'a/b=fashion-mnist-resnet18': the name"),
])
def test_a_bad_trades_argument_is_named_before_any_work(tmp_path, monkeypatch, value, message):
    monkeypatch.setattr(fronts, "read_sweeps", lambda paths: pytest.fail("work began"))
    with pytest.raises(SystemExit, match=message):
        fronts.main(["--sweeps", "settings.json", "--trades", value,
                     "--output-dir", str(tmp_path)])


def test_a_folder_without_a_classifier_is_refused(tmp_path):
    with pytest.raises(SystemExit, match=f"--trades 'x={tmp_path}': the folder .* has no "
                                         "config.json or model.safetensors"):
        named_classifiers("--trades", [f"x={tmp_path}"])
    assert named_classifiers("--trades", ["beta6=fashion-mnist-resnet18-trades"]) == {
        "beta6": "fashion-mnist-resnet18-trades"}


def test_the_markdown_section_has_the_picture_the_table_and_the_statement():
    trades = [at("beta6", 0.80, 0.60, family="trades"), at("beta0", 0.90, 0.00, family="trades")]
    result = fronts.fronts([at("scale=800", 0.85, 0.50)], trades) | {
        "attack": parse_attack(TINY_ATTACK).to_dict(), "n": 1000, "seed": 0,
        "held_out": {"size": 5000, "seed": 0}}
    lines = fronts.fronts_section(result, picture="images/fronts.png")
    assert lines[0].endswith("(images/fronts.png)")
    assert "| ours | scale=800 | 85.0 [82.7, 87.1] |" in "\n".join(lines)
    assert lines[-1] == ("**Ours lies above the TRADES front at 1 of 1 settings (scale=800; 1 "
                         "beyond the intervals: scale=800); judged by the worst of R (an "
                         "attacker who may resubmit), at 1 of 1 (scale=800).**")


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist_here")
def test_a_tiny_run_writes_the_fronts_and_the_picture(tmp_path):
    sweep = sweep_file(tmp_path, "settings.json", [
        row("base", "as-saved", 0.75, 0.5), row("scale", "800", 1.0, 0.25)])
    result = fronts.main([
        "--sweeps", sweep, "--trades", "beta6=fashion-mnist-resnet18-trades",
        "beta0=fashion-mnist-resnet18", "--output-dir", str(tmp_path / "fronts"),
        "--threads", "1", "--batch-size", "4", "--picture", str(tmp_path / "page.png")])
    written = json.loads((tmp_path / "fronts" / "fronts.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert [(item["family"], item["label"]) for item in written["points"]] == [
        ("ours", "as-saved"), ("ours", "scale=800"), ("trades", "beta6"), ("trades", "beta0")]
    for item in written["points"]:
        assert item["n"] == 4
        low, high = item["robust_ci95"]
        assert 0 <= low <= item["robust_accuracy"] <= high <= 1
    assert written["verdict"].startswith("ours lies above the TRADES front at ")
    assert all("verdict" in item for item in written["points"] if item["family"] == "ours")
    assert (tmp_path / "fronts" / "fronts.png").stat().st_size > 0
    assert (tmp_path / "page.png").stat().st_size > 0


def test_the_benchmark_page_shows_fronts_attached_to_its_json(tmp_path):
    """fashion_mnist.py --from-json BENCHMARK --fronts FRONTS puts the fronts on the page (and
    refuses a file that is not a fronts.json, naming the option)."""
    from fashion_mnist import main as benchmark_main

    trades = [at("beta6", 0.80, 0.60, family="trades"), at("beta0", 0.90, 0.00, family="trades")]
    result = fronts.fronts([at("scale=800", 0.85, 0.50)], trades) | {
        "attack": parse_attack(TINY_ATTACK).to_dict(), "n": 1000, "seed": 0,
        "held_out": {"size": 5000, "seed": 0}}
    (tmp_path / "fronts.json").write_text(json.dumps(result))
    published = ROOT / "benchmarks" / "results" / "fashion_mnist.json"
    page = tmp_path / "page.md"
    benchmark_main(["--from-json", str(published), "--fronts", str(tmp_path / "fronts.json"),
                    "--docs", str(page)])
    text = page.read_text()
    assert "## The front, not a point" in text
    assert text.index("## The front, not a point") < text.index("## Sanity checks")
    assert "(images/fronts-fashion-mnist.png)" in text and "| ours | scale=800 |" in text
    (tmp_path / "other.json").write_text(json.dumps({"points": []}))
    with pytest.raises(SystemExit):
        benchmark_main(["--from-json", str(published), "--fronts", str(tmp_path / "other.json"),
                        "--docs", str(page)])
