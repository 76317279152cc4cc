"""docs/benchmarks.md is generated from the benchmark's JSON: the targets are judged from the
figures, reduced settings are said so, and the published page is exactly what its JSON gives."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmark_page import benchmark_page, step_size_text
from fashion_mnist import main as benchmark_main

PUBLISHED_JSON = ROOT / "benchmarks" / "results" / "fashion_mnist.json"


def accuracy(mean: float, n: int = 100) -> dict:
    return {"n": n, "per_run": [mean], "mean": mean, "worst_case": mean - 0.05,
            "ci95_mean": [mean - 0.1, mean + 0.1], "ci95_worst_case": [mean - 0.15, mean]}


def record(model: str, attack: str, clean: float, robust: float, reduced: bool = True) -> dict:
    kind = {"pgd-eot": "pgd", "bpda-eot": "bpda"}[attack]
    return {
        "model": model, "n": 100, "seed": 0, "runs": 5, "seconds": 1.0, "sanity": "not run",
        "attack": {"name": attack, "kind": kind, "norm": "linf", "eps": 0.1, "steps": 5,
                   "step_size": 0.025, "eot": 1, "random_start": True,
                   "gradient_mode": "bpda" if kind == "bpda" else "full",
                   "checkpointing": False, "n_queries": None, "reduced": reduced},
        "clean_accuracy": accuracy(clean), "robust_accuracy": accuracy(robust),
        "perturbation": {"norm": "linf", "max": 0.1, "mean": 0.09, "within_eps": True},
    }


def synthetic_benchmark(ours_robust: float, ours_clean: float, reduced: bool = True) -> dict:
    """Made-up figures: only the page's logic is under test here."""
    figures = {"undefended": (0.92, 0.05), "diffpure": (0.85, 0.55), "ours": (ours_clean, ours_robust)}
    records = [record(model, attack, clean, robust + (0.02 if attack == "bpda-eot" else 0), reduced)
               for model, (clean, robust) in figures.items() for attack in ("pgd-eot", "bpda-eot")]
    return {
        "command": "python benchmarks/fashion_mnist.py --n 100", "hardware": "CPU test",
        "date": "2026-11-24", "wall_seconds": 60.0,
        "costs": {name: {"nfe": 0 if name == "undefended" else 10, "images_per_s": 3.0}
                  for name in figures},
        "descriptions": {name: name for name in figures},
        "report": {"purifyguard_version": "0", "sanity": None, "records": records,
                   "settings": {"seed": 0, "n": 100, "batch_size": 50, "runs": 5,
                                "data_fingerprint": "x", "num_processes": 1, "device": "cpu",
                                "seconds": 60.0}},
    }


def test_targets_are_judged_from_the_figures() -> None:
    met = benchmark_page(synthetic_benchmark(ours_robust=0.62, ours_clean=0.90))
    assert "ours >= 5 points over DiffPure-style: met (+7.0 points; noise at n = 100" in met
    assert "clean accuracy within 3 points of the undefended classifier: met (2.0 points below)" in met
    assert "ours beats every other defence under pgd-eot: met" in met

    missed = benchmark_page(synthetic_benchmark(ours_robust=0.57, ours_clean=0.85))
    assert "over DiffPure-style: missed (+2.0 points;" in missed
    assert "undefended classifier: missed (7.0 points below)" in missed
    assert "t* NFE: not measured" in missed


def test_reduced_settings_are_labelled_and_reference_ones_are_not() -> None:
    reduced = benchmark_page(synthetic_benchmark(0.6, 0.9, reduced=True))
    reference = benchmark_page(synthetic_benchmark(0.6, 0.9, reduced=False))
    assert "**Reduced setting.**" in reduced and "**reduced**" in reduced
    assert "Reduced setting" not in reference and "| reference |" in reference
    # Every figure in the results table comes from the records: ours under PGD is 60.0 [50.0, 70.0].
    assert "| ours | 10 | 3.00 | 90.0 | 60.0 [50.0, 70.0] | 62.0 [52.0, 72.0] | 55.0 |" in reduced


def test_from_json_rewrites_the_page(tmp_path: Path) -> None:
    source = tmp_path / "benchmark.json"
    source.write_text(json.dumps(synthetic_benchmark(0.6, 0.9)))
    page = tmp_path / "benchmarks.md"
    benchmark_main(["--from-json", str(source), "--docs", str(page)])
    assert page.read_text() == benchmark_page(synthetic_benchmark(0.6, 0.9))


def test_published_page_is_generated_from_its_json() -> None:
    published = (ROOT / "docs" / "benchmarks.md").read_text()
    assert published == benchmark_page(json.loads(PUBLISHED_JSON.read_text()))


def test_a_named_primary_attack_is_judged_and_paired_tests_are_shown() -> None:
    benchmark = synthetic_benchmark(ours_robust=0.62, ours_clean=0.90)
    for item in benchmark["report"]["records"]:
        if item["attack"]["name"] == "pgd-eot":
            item["attack"]["name"] = "apgd-eot"
    benchmark["primary"] = "apgd-eot"
    benchmark["paired"] = [{
        "first": "ours", "second": "diffpure", "attack": "apgd-eot", "n": 100,
        "mean": {"difference": 0.07, "ci95": [0.02, 0.12], "p_value": 0.004, "samples": 10000},
        "worst_case": {"only_first": 11, "only_second": 3, "p_value": 0.0574},
    }]
    page = benchmark_page(benchmark)
    assert "ours beats every other defence under apgd-eot: met" in page
    assert "| apgd-eot worst % |" in page
    assert "| ours vs diffpure | +7.0 [+2.0, +12.0] | 0.004 | 11 / 3 | 0.0574 |" in page
    assert ("ours >= DiffPure-style + 5 points, significant in the paired test: met (+7.0 points, "
            "paired bootstrap p = 0.004)") in page


def test_apgd_eot_states_its_first_step_on_randomised_models() -> None:
    schedule = {"initial_step": 0.2, "randomised_initial_step": 0.05}
    assert step_size_text({"step_size": 0.2, "step_schedule": schedule}) == (
        "0.2 (0.05 first on randomised models)")
    assert step_size_text({"step_size": 0.025, "step_schedule": None}) == "0.025"
    # records written before the randomised review state one step size
    assert step_size_text({"step_size": 0.2, "step_schedule": {"initial_step": 0.2}}) == "0.2"


def test_a_page_of_our_defence_alone_has_no_comparison_targets() -> None:
    benchmark = synthetic_benchmark(ours_robust=0.6, ours_clean=0.9)
    benchmark["report"]["records"] = [r for r in benchmark["report"]["records"]
                                      if r["model"] == "ours"]
    page = benchmark_page(benchmark)
    assert "| ours |" in page and "beats every other defence" not in page
