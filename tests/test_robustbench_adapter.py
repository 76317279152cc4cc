"""The RobustBench-style entry point: the protocol's attacks and budgets, and figures that are
the report's own."""

from __future__ import annotations

import pytest

from purifyguard import PurifiedModel, bundled_classifier
from purifyguard.adapters.robustbench import EPSILONS, benchmark
from purifyguard.evaluation import validate_report


@pytest.fixture(scope="module")
def undefended() -> PurifiedModel:
    return PurifiedModel(bundled_classifier(), purifier=False)


def test_benchmark_returns_the_reports_clean_and_lowest_robust_accuracy(undefended, tmp_path):
    clean, robust, report = benchmark(
        undefended, "fashion-mnist", "Linf", n_examples=6, batch_size=3, runs=2, steps=1,
        eot=1, n_queries=5, output_dir=tmp_path, progress=False,
    )

    validate_report(report)
    records = report["records"]
    assert [r["attack"]["kind"] for r in records] == [
        "pgd", "autoattack-rand", "bpda", "transfer", "square"
    ]
    assert all(r["attack"]["eps"] == 0.1 and r["attack"]["norm"] == "linf" for r in records)
    assert all(r["attack"]["reduced"] for r in records)
    assert all(r["n"] == 6 and r["runs"] == 2 for r in records)
    assert clean == records[0]["clean_accuracy"]["mean"]
    assert robust == min(r["robust_accuracy"]["mean"] for r in records)
    assert 0 <= robust <= clean <= 1
    assert (tmp_path / "report.json").exists()


def test_benchmark_takes_the_l2_budget_other_statistics_and_chosen_attacks(undefended):
    clean, robust, report = benchmark(
        undefended, threat_model="L2", n_examples=4, batch_size=4, runs=1, progress=False,
        attacks=["pgd:norm=l2,eps=1.5,steps=1,eot=1"], statistic="worst_case",
    )

    (record,) = report["records"]
    assert record["attack"]["eps"] == EPSILONS["fashion-mnist", "l2"] == 1.5
    assert clean == record["clean_accuracy"]["worst_case"]
    assert robust == record["robust_accuracy"]["worst_case"]


def test_benchmark_rejects_threat_models_and_data_sets_without_a_budget(undefended):
    with pytest.raises(ValueError, match="'Linf' or 'L2'"):
        benchmark(undefended, threat_model="corruptions", n_examples=1)
    with pytest.raises(ValueError, match="pass eps"):
        benchmark(undefended, dataset="imagefolder", n_examples=1)
    with pytest.raises(ValueError, match="statistic"):
        benchmark(undefended, statistic="median", n_examples=1)
