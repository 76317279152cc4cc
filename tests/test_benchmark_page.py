"""docs/benchmarks.md is generated from the benchmark's JSON: the targets are judged from the
figures, reduced settings are said so, and the published page is exactly what its JSON gives."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmark_page import benchmark_page, lead_tests, step_size_text
from fashion_mnist import attack_specs, build_parser, headline_specs, needs_guidance
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
    # no paired test in this JSON: +7.0 points is not shown to exceed 5 beyond the noise
    assert ("ours >= 5 points over DiffPure-style: not measured (+7.0 points; no paired test in "
            "this run, so not shown significant)") in met
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
    assert "| ours vs diffpure | +7.0 [+2.0, +12.0] | 0.004 | 11 / 3 | 0.057 |" in page
    # p = 0.004 tests a difference of 0; against the 5-point target the interval reaches +2.0
    assert ("ours >= 5 points over DiffPure-style: not shown significant (+7.0 points; the "
            "one-sided margin test was not run for this JSON and the two-sided 95% interval "
            "[+2.0, +12.0] reaches below 5; worst case 11 / 3 images, McNemar p = 0.057)") in page
    assert ("paired against diffpure: mean p = 0.004 (bootstrap), worst case 11 / 3 images, "
            "McNemar p = 0.057; a lead of ours is significant in the mean only") in page


def test_a_lead_of_the_second_defence_is_named_when_the_first_has_none() -> None:
    item = {"first": "ours", "second": "trades",
            "mean": {"difference": -0.066, "ci95": [-0.105, -0.028], "p_value": 0.0002,
                     "samples": 10000},
            "worst_case": {"only_first": 0, "only_second": 76, "p_value": 2.6e-23}}
    assert lead_tests(item).endswith("a lead of trades over ours is significant in both tests")
    item["worst_case"] = {"only_first": 5, "only_second": 4, "p_value": 1.0}
    assert lead_tests(item).endswith("a lead of trades over ours is significant in the mean only")
    item["mean"] = {"difference": -0.01, "ci95": [-0.04, 0.02], "p_value": 0.5, "samples": 10000}
    assert lead_tests(item).endswith("a lead of ours is significant in neither test")


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


P_EQUALS_ZERO = re.compile(r"p = 0(?![.\d])")


def with_diffpure_comparison(margin_test: dict | None) -> dict:
    """Ours 6.1 points over DiffPure-style, paired interval [+4.1, +8.1], bootstrap p below its
    resolution, McNemar 26 / 6; margin_test as fashion_mnist.py stores it (None: an old JSON)."""
    benchmark = synthetic_benchmark(ours_robust=0.611, ours_clean=0.90)
    item = {
        "first": "ours", "second": "diffpure", "attack": "pgd-eot", "n": 100,
        "mean": {"difference": 0.061, "ci95": [0.041, 0.081], "p_value": 0.0, "samples": 10000},
        "worst_case": {"only_first": 26, "only_second": 6, "p_value": 0.00053505},
    }
    if margin_test is not None:
        item["margin_test"] = {"difference": 0.061, "margin": 0.05, "alternative": "greater",
                               "samples": 10000, **margin_test}
    benchmark["paired"] = [item]
    return benchmark


def test_a_margin_target_is_judged_against_the_margin_not_against_zero() -> None:
    missed = benchmark_page(with_diffpure_comparison(
        {"ci": {"one_sided95": 0.044, "two_sided95": [0.041, 0.081]}, "p_value": 0.14}))
    assert ("ours >= 5 points over DiffPure-style: missed (+6.1 points; one-sided paired margin "
            "test: 95% lower bound +4.4, p = 0.14 for H0 difference <= 5; worst case 26 / 6 "
            "images, McNemar p = 0.00054)") in missed
    met = benchmark_page(with_diffpure_comparison(
        {"ci": {"one_sided95": 0.0512, "two_sided95": [0.049, 0.081]}, "p_value": 0.031}))
    assert ("ours >= 5 points over DiffPure-style: met (+6.1 points; one-sided paired margin "
            "test: 95% lower bound +5.1, p = 0.031 for H0 difference <= 5;") in met
    old = benchmark_page(with_diffpure_comparison(None))  # a JSON from before the margin test
    assert "ours >= 5 points over DiffPure-style: not shown significant (+6.1 points;" in old
    assert "[+4.1, +8.1] reaches below 5" in old
    for page in (missed, met, old):
        assert "| ours vs diffpure | +6.1 [+4.1, +8.1] | < 0.0001 | 26 / 6 | 0.00054 |" in page
        assert "mean p < 0.0001 (bootstrap)" in page and "a lead of ours is significant in both" \
            " tests" in page
        assert not P_EQUALS_ZERO.search(page), P_EQUALS_ZERO.search(page)


def test_no_p_value_on_the_published_page_prints_as_zero() -> None:
    published = (ROOT / "docs" / "benchmarks.md").read_text()
    assert not P_EQUALS_ZERO.search(published)
    paired_rows = [line for line in published.splitlines() if line.startswith("| ours vs ")]
    assert paired_rows and all(" | 0 |" not in line for line in paired_rows)
    assert "< 0.0001" in published


def headline_result(robust: float, clean: float, correct_runs: list[int], per_attack: dict,
                    runs: int = 5) -> dict:
    """A headline() result as benchmark.json keeps it (per image: the correct-run counts)."""
    summary = accuracy(robust, n=len(correct_runs))
    summary["within_submissions"] = {"1": robust, "3": robust + 0.1, "10": robust + 0.2}
    n_attacked = sum(per_attack.values())
    return {
        "n": len(correct_runs), "runs": runs, "selection_runs": runs, "seed": 0,
        "batch_size": 50, "threat_model": {"norm": "linf", "eps": 0.1},
        "attacks": [{"name": name} for name in per_attack],
        "per_attack": [{"name": name, "attacked": 10, "improved": count, "provided": count,
                        "seconds": 1.0} for name, count in per_attack.items()],
        "clean_unattacked": len(correct_runs) - n_attacked,
        "clean_accuracy": accuracy(clean, n=len(correct_runs)), "robust_accuracy": summary,
        "per_image": {"correct_runs": correct_runs,
                      "clean_correct_runs": [runs] * len(correct_runs)},
        "data_fingerprint": "x",
    }


def with_headline() -> dict:
    from benchmark_page import headline_comparisons

    benchmark = synthetic_benchmark(ours_robust=0.62, ours_clean=0.90)
    # 100 images: ours keeps 60 in every run, diffpure 30; undefended none
    benchmark["headline"] = {
        "undefended": headline_result(0.0, 0.92, [0] * 100, {"transfer": 8, "apgd-eot": 84}),
        "diffpure": headline_result(0.30, 0.85, [5] * 30 + [0] * 70,
                                    {"transfer": 20, "apgd-eot": 40}),
        "ours": headline_result(0.60, 0.90, [5] * 60 + [0] * 40,
                                {"transfer": 5, "transfer-guidance": 10, "apgd-eot": 20}),
    }
    benchmark["headline_paired"] = headline_comparisons(benchmark["headline"])
    return benchmark


def test_the_headline_leads_the_results_with_its_paired_tests() -> None:
    benchmark = with_headline()
    paired = {item["second"]: item for item in benchmark["headline_paired"]}
    assert set(paired) == {"undefended", "diffpure"}
    assert paired["diffpure"]["worst_case"]["only_first"] == 30
    assert abs(paired["diffpure"]["mean"]["difference"] - 0.30) < 1e-9
    page = benchmark_page(benchmark)
    results = page.index("## Results")
    headline = page.index("### Headline: the per-image worst of the attacks")
    per_attack = page.index("| defence | NFE | images/s |")
    assert results < headline < per_attack
    assert "the worst adversarial example over the attacks listed" in page
    assert "re-judged on R = 5 fresh purifications" in page
    assert ("| defence | robust % [95% CI] | worst of R % | within 1 % | within 3 % | "
            "within 10 % | clean % | per-image worst from (images) |") in page
    assert ("| ours | 60.0 [50.0, 70.0] | 55.0 | 60.0 | 70.0 | 80.0 | 90.0 | transfer 5, "
            "transfer-guidance 10, apgd-eot 20, clean image 65 |") in page
    assert "| undefended | 0.0 [-10.0, 10.0] | -5.0 |" in page
    assert "| ours vs diffpure | +30.0 [" in page and "| 30 / 0 | 1.9e-09 |" in page
    assert "- Headline, paired against diffpure: mean p < 0.0001 (bootstrap)" in page
    assert "a lead of ours is significant in both tests" in page
    assert not P_EQUALS_ZERO.search(page), P_EQUALS_ZERO.search(page)


def test_a_single_attack_below_the_headline_is_flagged_with_its_paired_test() -> None:
    """The headline against the primary alone: ours' headline keeps 60 images in all 5 runs,
    but the primary alone keeps only 40 of them (a winner's curse): flagged; diffpure's
    primary keeps the same as its headline: not flagged."""
    import torch
    from benchmark_page import headline_against_attack

    benchmark = with_headline()
    indices = torch.arange(100)
    ours = torch.zeros(5, 100, dtype=torch.bool)
    ours[:, :40] = True
    diffpure = torch.zeros(5, 100, dtype=torch.bool)
    diffpure[:, :30] = True
    tables = {"ours": (indices, ours), "diffpure": (indices.flip(0), diffpure.flip(1)),
              "undefended": (indices[:50], ours[:, :50])}  # too few images: left out
    checks = headline_against_attack(benchmark["headline"], tables, "apgd-eot")
    by_name = {item["defence"]: item for item in checks}
    assert set(by_name) == {"ours", "diffpure"}
    assert abs(by_name["ours"]["mean"]["difference"] - 0.2) < 1e-9
    assert by_name["ours"]["worst_case"]["only_first"] == 20
    assert abs(by_name["diffpure"]["mean"]["difference"]) < 1e-9  # the flip is undone
    benchmark["headline_against_primary"] = checks
    page = benchmark_page(benchmark)
    assert "| ours | 60.0 | 40.0 | +20.0 [" in page
    assert "**For ours apgd-eot alone lies below the headline beyond the noise.**" in page
    benchmark["headline_against_primary"] = [by_name["diffpure"]]
    assert "No headline lies above apgd-eot alone beyond the noise." in benchmark_page(benchmark)


def test_a_json_without_a_headline_renders_as_before() -> None:
    old = synthetic_benchmark(0.6, 0.9)
    page = benchmark_page(old)
    assert "Headline" not in page and "### Each attack separately" not in page
    assert page.index("## Results\n\n| defence | NFE |") > 0
    empty = {**synthetic_benchmark(0.6, 0.9), "headline": {}, "headline_paired": []}
    assert benchmark_page(empty) == page


def test_the_benchmark_runs_the_headline_end_to_end(tmp_path: Path) -> None:
    """A tiny run of two unguided defences: the headline skips the attacks that need a
    guidance network, is stored per defence, kept by --from-json and leads the page."""
    output, docs = tmp_path / "run", tmp_path / "page.md"
    argv = ["--n", "4", "--batch-size", "4", "--runs", "2", "--pgd-steps", "1", "--aa-steps",
            "1", "--eot", "1", "--defences", "undefended", "trades", "--attacks", "primary",
            "--primary", "apgd-eot", "--output-dir", str(output), "--docs", str(docs)]
    benchmark_main(argv)
    benchmark = json.loads((output / "benchmark.json").read_text())
    assert set(benchmark["headline"]) == {"undefended", "trades"}
    for name, result in benchmark["headline"].items():
        assert (output / f"headline-{name}" / "headline.json").exists()
        assert [a["name"] for a in result["per_attack"]] == ["transfer", "autoattack-rand",
                                                             "apgd-eot"]
        assert set(result["per_image"]) == {"correct_runs", "clean_correct_runs"}
        assert len(result["per_image"]["correct_runs"]) == 4
    assert benchmark["headline_paired"] == []  # no ours in this run
    page = docs.read_text()
    assert page.index("### Headline") < page.index("| defence | NFE |")
    rewritten = tmp_path / "again.md"
    benchmark_main(["--from-json", str(output / "benchmark.json"), "--docs", str(rewritten)])
    assert rewritten.read_text() == page


def test_a_bad_headline_attack_is_refused_before_any_model_loads(capsys) -> None:
    for bad, message in ((["pgd:eps=0.1", "pgd:eps=0.2,name=b"], "one threat model"),
                         (["nonsense"], "attack kind must be one of")):
        with pytest.raises(SystemExit) as exit_info:
            benchmark_main(["--headline-attacks", *bad])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_the_other_attacks_are_compared_with_the_primary_on_ours() -> None:
    benchmark = synthetic_benchmark(ours_robust=0.62, ours_clean=0.90)
    benchmark["attack_paired"] = [{
        "model": "ours", "first": "apgd-em-eot", "second": "apgd-eot", "n": 100,
        "mean": {"difference": -0.03, "ci95": [-0.06, 0.0], "p_value": 0.06, "samples": 10000},
        "worst_case": {"only_first": 2, "only_second": 7, "p_value": 0.18},
    }]
    page = benchmark_page(benchmark)
    assert "### Attacks against the primary" in page
    assert "| apgd-em-eot vs apgd-eot | -3.0 [-6.0, +0.0] | 0.06 | 2 / 7 | 0.18 |" in page
    assert "### Attacks against the primary" not in benchmark_page(synthetic_benchmark(0.6, 0.9))


def test_the_default_attacks_include_em_weighting_and_the_guidance_feature_attack() -> None:
    args = build_parser().parse_args(["--primary", "apgd-eot", "--pgd-steps", "3", "--eot", "2"])
    specs = {spec.label: spec for spec in attack_specs(args)}
    assert list(specs) == ["apgd-eot", "pgd-eot", "apgd-em-eot", "autoattack-rand", "bpda-eot"]
    assert specs["apgd-em-eot"].eot_weighting == "em"
    assert (specs["apgd-em-eot"].steps, specs["apgd-em-eot"].eot) == (3, 2)
    headline = {spec.label: spec for spec in headline_specs(args)}
    assert "feature-guidance" in headline and needs_guidance(headline["feature-guidance"])
    assert not needs_guidance(headline["autoattack-rand"])


@pytest.mark.slow
def test_ours_under_the_em_attack_is_paired_with_the_primary(tmp_path: Path) -> None:
    output, docs = tmp_path / "run", tmp_path / "page.md"
    benchmark_main(["--n", "2", "--batch-size", "2", "--runs", "1", "--pgd-steps", "1",
                    "--eot", "1", "--defences", "ours", "--attacks", "primary", "apgd-em",
                    "--primary", "apgd-eot", "--no-headline", "--diffpure-t-star", "200",
                    "--output-dir", str(output), "--docs", str(docs), "--threads", "1"])
    benchmark = json.loads((output / "benchmark.json").read_text())
    [item] = benchmark["attack_paired"]
    assert (item["first"], item["second"], item["n"]) == ("apgd-em-eot", "apgd-eot", 2)
    assert "| apgd-em-eot vs apgd-eot |" in docs.read_text()


def test_the_plug_in_targets_are_judged_on_the_headline() -> None:
    """Non-inferiority to TRADES at a 3-point margin, 4 clean points over it, worst of R within
    8 points of the mean (the made-up accuracy() puts it 5 below) and the clean cost."""
    from benchmark_page import headline_comparisons

    def page_with(trades_correct_runs: list[int], trades_clean: float, cost=None) -> str:
        benchmark = with_headline()
        benchmark["headline"]["trades"] = headline_result(0.6, trades_clean, trades_correct_runs,
                                                          {"apgd-eot": 40})
        benchmark["headline_paired"] = headline_comparisons(benchmark["headline"])
        if cost is not None:
            benchmark["clean_cost"] = {"standard": cost}
        return benchmark_page(benchmark)

    tied = page_with([5] * 60 + [0] * 40, 0.85)
    assert "- ours non-inferior to trades (3-point margin): met (+0.0 points; one-sided 95% " \
           "lower bound +0.0" in tied
    assert "- ours clean accuracy at least 4 points above trades: met (+5.0 points)." in tied
    assert "- ours worst of R within 8 points of its mean: met (5.0 points below)." in tied
    assert "- clean cost at most 4 points against the bare classifier: not measured" in tied
    cost = {"n": 10000, "bare": 0.924, "purified": 0.846,
            "cost": {"difference": 0.078, "ci95": [0.071, 0.085], "p_value": 0.0,
                     "samples": 10000, "mcnemar": {"only_first": 900, "only_second": 120,
                                                   "p_value": 1e-150}}}
    behind = page_with([5] * 70 + [0] * 30, 0.88, cost)
    assert "- ours non-inferior to trades (3-point margin): missed (-10.0 points;" in behind
    assert "- ours clean accuracy at least 4 points above trades: missed (+2.0 points)." in behind
    assert "- clean cost at most 4 points against the bare classifier: missed (7.8 points on " \
           "10000 test images)." in behind
    assert "| standard | 10000 | 92.4 | 84.6 | 7.8 [7.1, 8.5] | 1e-150 |" in behind
    assert "non-inferior" not in benchmark_page(synthetic_benchmark(0.6, 0.9))


def test_unseen_classifier_rows_are_not_rivals_of_ours() -> None:
    """ours-NAME (ours in front of an unseen classifier) is the same purifier: "ours beats every
    other defence" compares ours with the other defences only."""
    benchmark = synthetic_benchmark(ours_robust=0.62, ours_clean=0.90)
    benchmark["report"]["records"] += [record(model, attack, 0.9, robust)
                                       for model, robust in (("ours-mob", 0.8), ("mob", 0.01))
                                       for attack in ("pgd-eot", "bpda-eot")]
    benchmark["costs"].update({"ours-mob": {"nfe": 10, "images_per_s": 3.0},
                               "mob": {"nfe": 0, "images_per_s": 9.0}})
    assert "beats every other defence under pgd-eot: missed (62.0 vs ours-mob" in \
        benchmark_page(benchmark)
    benchmark["unseen"] = ["mob"]
    page = benchmark_page(benchmark)
    assert "beats every other defence under pgd-eot: met (62.0 vs diffpure 55.0" in page
    assert "| ours-mob | 10 |" in page


def test_unseen_classifiers_get_their_rows_pairs_and_clean_cost(tmp_path: Path) -> None:
    """--unseen NAME=CLASSIFIER adds NAME and ours-NAME, paired with each other under the
    primary and on the headline; --clean-n measures their clean cost apart."""
    output, docs = tmp_path / "run", tmp_path / "page.md"
    benchmark_main(["--n", "2", "--batch-size", "2", "--runs", "2", "--pgd-steps", "1",
                    "--eot", "1", "--defences", "undefended", "--attacks", "primary",
                    "--primary", "apgd-eot", "--unseen", "robust=fashion-mnist-resnet18-trades",
                    "--headline-attacks", "transfer:steps=1,eps=0.1",
                    "apgd-eot:steps=1,eot=1,eps=0.1", "--clean-n", "4",
                    "--output-dir", str(output), "--docs", str(docs), "--threads", "1"])
    benchmark = json.loads((output / "benchmark.json").read_text())
    assert list(benchmark["costs"]) == ["undefended", "robust", "ours-robust"]
    assert benchmark["unseen"] == ["robust"]
    assert "never saw (timm resnet18), alone" in benchmark["descriptions"]["robust"]
    assert [(item["first"], item["second"]) for item in benchmark["paired"]] == \
        [("ours-robust", "robust")]
    assert [(item["first"], item["second"]) for item in benchmark["headline_paired"]] == \
        [("ours-robust", "robust")]
    [(name, figures)] = benchmark["clean_cost"].items()  # no ours: no "standard" pair
    assert name == "robust" and figures["n"] == 4
    page = docs.read_text()
    assert "| ours-robust vs robust |" in page and "| robust | 4 |" in page
    with pytest.raises(SystemExit):
        benchmark_main(["--unseen", "ours=fashion-mnist-resnet18"])


def test_clean_only_stores_the_clean_cost_that_the_whole_run_resumes(tmp_path: Path) -> None:
    """--clean-only measures the clean cost alone (no benchmark.json, no page) into
    output-dir/clean-cost; the run with every defence over that folder reads it, measuring
    nothing again."""
    output, docs = tmp_path / "run", tmp_path / "page.md"
    common = ["--n", "2", "--batch-size", "2", "--runs", "2", "--defences", "undefended",
              "--unseen", "robust=fashion-mnist-resnet18-trades", "--clean-n", "4",
              "--output-dir", str(output), "--docs", str(docs), "--threads", "1"]
    benchmark_main([*common, "--clean-only"])
    assert not (output / "benchmark.json").exists() and not docs.exists()
    stored = {path.name: path.read_bytes() for path in (output / "clean-cost").glob("batches-*")}
    assert stored and b"robust-purified" in b"".join(stored.values())

    benchmark_main([*common, "--pgd-steps", "1", "--eot", "1", "--attacks", "primary",
                    "--primary", "apgd-eot", "--headline-attacks", "transfer:steps=1,eps=0.1"])
    assert {path.name: path.read_bytes()
            for path in (output / "clean-cost").glob("batches-*")} == stored
    benchmark = json.loads((output / "benchmark.json").read_text())
    assert benchmark["clean_cost"]["robust"]["n"] == 4
    with pytest.raises(SystemExit):
        benchmark_main(["--defences", "undefended", "--clean-only"])  # no --clean-n


def test_plug_in_rows_run_on_fewer_images_and_pair_on_those(tmp_path: Path) -> None:
    """--plug-in-n k: ours in front of the TRADES classifier and the --unseen rows run on the
    first k images only; every pair with them (primary and headline) is on those k images,
    and the page says so."""
    output, docs = tmp_path / "run", tmp_path / "page.md"
    benchmark_main(["--n", "4", "--batch-size", "2", "--runs", "2", "--pgd-steps", "1",
                    "--eot", "1", "--defences", "ours", "ours-trades-classifier",
                    "--attacks", "primary", "--primary", "apgd-eot",
                    "--unseen", "robust=fashion-mnist-resnet18-trades", "--plug-in-n", "2",
                    "--headline-attacks", "apgd-eot:steps=1,eot=1,eps=0.1",
                    "--output-dir", str(output), "--docs", str(docs), "--threads", "1"])
    benchmark = json.loads((output / "benchmark.json").read_text())
    counts = {item["model"]: item["n"] for item in benchmark["report"]["records"]}
    assert counts == {"ours": 4, "ours-trades-classifier": 2, "robust": 2, "ours-robust": 2}
    assert benchmark["report"]["settings"]["n_per_model"] == {
        "ours-trades-classifier": 2, "robust": 2, "ours-robust": 2}
    assert {(item["first"], item["second"]): item["n"] for item in benchmark["paired"]} == {
        ("ours", "ours-trades-classifier"): 2, ("ours-robust", "robust"): 2}
    assert {name: result["n"] for name, result in benchmark["headline"].items()} == counts
    for result in benchmark["headline"].values():  # the primary's examples, never recomputed
        [attack] = result["per_attack"]
        assert attack["from_evaluation"] == attack["attacked"] > 0
    assert {(item["first"], item["second"]): item["n"]
            for item in benchmark["headline_paired"]} == {
        ("ours", "ours-trades-classifier"): 2, ("ours-robust", "robust"): 2}
    page = docs.read_text()
    assert "| ours-trades-classifier (first 2 images) |" in page
    assert "| ours vs ours-trades-classifier (first 2 images) |" in page
    assert "on fewer images (the first of the same, `--plug-in-n`): ours-trades-classifier 2" \
        in page
    with pytest.raises(SystemExit):  # not a whole number of batches
        benchmark_main(["--n", "4", "--batch-size", "2", "--plug-in-n", "3",
                        "--defences", "ours-trades-classifier", "--output-dir",
                        str(tmp_path / "odd"), "--docs", str(docs)])


def test_a_benchmark_run_in_parts_merges_into_the_run_of_the_whole(tmp_path: Path) -> None:
    """Parts with some defences each (--defences alone: only the --unseen rows), merged with
    merge_outputs: the whole run attacks nothing again and holds every row and pair."""
    from purifyguard.evaluation import merge_outputs

    common = ["--n", "2", "--batch-size", "2", "--runs", "2", "--pgd-steps", "1", "--eot", "1",
              "--attacks", "primary", "--primary", "apgd-eot", "--headline-attacks",
              "transfer:steps=1,eps=0.1", "apgd-eot:steps=1,eot=1,eps=0.1", "--threads", "1",
              "--docs", str(tmp_path / "page.md")]
    unseen = ["--unseen", "robust=fashion-mnist-resnet18-trades"]
    benchmark_main([*common, "--defences", "undefended", "--output-dir", str(tmp_path / "a")])
    benchmark_main([*common, "--defences", *unseen, "--output-dir", str(tmp_path / "b")])
    part = json.loads((tmp_path / "b" / "benchmark.json").read_text())
    assert list(part["costs"]) == ["robust", "ours-robust"]
    taken = {item["name"]: item["from_evaluation"]
             for item in part["headline"]["ours-robust"]["per_attack"]}
    attacked = {item["name"]: item["attacked"]
                for item in part["headline"]["ours-robust"]["per_attack"]}
    assert attacked["apgd-eot"] > 0
    assert taken == {"transfer": 0, "apgd-eot": attacked["apgd-eot"]}  # the primary's examples

    merge_outputs([tmp_path / "a", tmp_path / "b"], tmp_path / "whole")
    stored = {path.name: path.read_text() for path in (tmp_path / "whole").glob("batches-*")}
    benchmark_main([*common, "--defences", "undefended", *unseen,
                    "--output-dir", str(tmp_path / "whole")])
    assert {path.name: path.read_text()
            for path in (tmp_path / "whole").glob("batches-*")} == stored  # nothing ran again
    whole = json.loads((tmp_path / "whole" / "benchmark.json").read_text())
    assert str(tmp_path) not in whole["command"] and "<run folder>" in whole["command"]
    assert list(whole["headline"]) == ["undefended", "robust", "ours-robust"]
    for name in ("robust", "ours-robust"):  # the parts' headline state, judged again alike
        assert whole["headline"][name]["robust_accuracy"] == \
            part["headline"][name]["robust_accuracy"]
    assert [(item["first"], item["second"]) for item in whole["paired"]] == \
        [("ours-robust", "robust")]
    with pytest.raises(SystemExit):
        benchmark_main(["--defences", "--output-dir", str(tmp_path / "c")])


def test_a_high_eot_headline_keeps_a_low_eot_run_beside_it() -> None:
    args = build_parser().parse_args(["--pgd-steps", "20", "--eot", "8", "--aa-steps", "10"])
    specs = {spec.label: spec for spec in headline_specs(args)}
    assert list(specs) == ["transfer", "transfer-guidance", "feature-guidance",
                           "autoattack-rand", "apgd-eot-eot2", "apgd-eot", "apgd-eot-smooth"]
    assert (specs["apgd-eot-eot2"].steps, specs["apgd-eot-eot2"].eot) == (20, 2)
    assert specs["apgd-eot"].eot == 8
    low = build_parser().parse_args(["--pgd-steps", "20", "--eot", "2"])
    assert "apgd-eot-eot2" not in [spec.label for spec in headline_specs(low)]
