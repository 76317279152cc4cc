"""Robustness evaluation: attacks, verdicts, resume, report schema, BPDA, sanity checks."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from purifyguard import PurifiedModel
from purifyguard.data import load_dataset
from purifyguard.evaluation import (
    AttackSpec,
    build_defences,
    compare,
    evaluate,
    harness,
    markdown_table,
    parse_attack,
    validate_report,
    wilson_interval,
)
from purifyguard.evaluation.attacks import attacked_model
from purifyguard.evaluation.report import RECORD_SCHEMA, REPORT_SCHEMA
from purifyguard.evaluation.seeds import seed_everything

DOCS = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"
SHARED_FASHION_MNIST = Path("/work/shared/data/fashion-mnist")
FASHION_MEAN, FASHION_STD = (0.286,), (0.353,)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


@pytest.fixture(scope="module")
def fashion_test() -> tuple[torch.Tensor, torch.Tensor]:
    return _fashion(train=False).tensors(256)


@pytest.fixture(scope="module")
def fashion_classifier() -> nn.Module:
    """A small CNN trained here on real Fashion-MNIST (400 Adam steps, about 85% test accuracy)."""
    images, labels = _fashion(train=True).tensors(25600)
    torch.manual_seed(0)
    classifier = small_cnn()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    for step in range(400):
        rows = torch.randint(0, len(labels), (64,))
        x = (images[rows] - FASHION_MEAN[0]) / FASHION_STD[0]
        loss = F.cross_entropy(classifier(x), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return classifier.eval()


def _fashion(train: bool):
    if "PURIFYGUARD_FASHION_MNIST" not in os.environ and SHARED_FASHION_MNIST.exists():
        os.environ["PURIFYGUARD_FASHION_MNIST"] = str(SHARED_FASHION_MNIST)
    return load_dataset("fashion-mnist", train=train, download=False)


def undefended(classifier: nn.Module) -> PurifiedModel:
    return PurifiedModel(classifier, purifier=False, mean=FASHION_MEAN, std=FASHION_STD)


class RoundsInput(nn.Module):
    """Gradient masking by quantisation: the input is rounded to 8 bits, its gradient is 0."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier((torch.round(x * 255) / 255 - FASHION_MEAN[0]) / FASHION_STD[0])


def tiny_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 13 * 13, 10)
    ).eval()


@pytest.fixture
def purified(make_purifier) -> PurifiedModel:
    return PurifiedModel(tiny_classifier(), make_purifier(t_star=3), mean=(0.5,), std=(0.5,))


def structured_batch(n: int = 12, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=generator), torch.arange(n) % 10


def without_timings(report: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in report["records"]]


# --- attacks on a real classifier ------------------------------------------------------------


def test_pgd_drives_an_undefended_fashion_mnist_classifier_to_near_zero(
    fashion_classifier, fashion_test
):
    # At the protocol's eps = 0.1 this briefly trained, smooth classifier keeps about 20% under
    # PGD (torchattacks' PGD agrees); at 0.2 nothing survives.
    report = evaluate(
        undefended(fashion_classifier), fashion_test, ["pgd:eps=0.2,steps=20,eot=1"],
        n=128, batch_size=64, runs=1, progress=False,
    )
    record = report["records"][0]
    assert record["clean_accuracy"]["mean"] > 0.8
    assert record["robust_accuracy"]["mean"] < 0.05
    assert record["perturbation"]["within_eps"]


def test_robust_accuracy_is_non_increasing_in_eps(fashion_classifier, fashion_test):
    sweep = [0.0, 0.01, 0.03, 0.06, 0.1]
    attacks = [AttackSpec("pgd", name=f"eps={e}", eps=e, steps=10, eot=1) for e in sweep]
    report = evaluate(
        undefended(fashion_classifier), fashion_test, attacks, n=128, batch_size=64, runs=1,
        progress=False,
    )
    accuracies = [r["robust_accuracy"]["mean"] for r in report["records"]]
    assert accuracies == sorted(accuracies, reverse=True), accuracies
    assert accuracies[0] > accuracies[-1] + 0.5


def test_l2_pgd_stays_in_its_ball_and_lowers_accuracy(fashion_classifier, fashion_test):
    report = evaluate(
        undefended(fashion_classifier), fashion_test, ["pgd:norm=l2,eps=1.5,steps=10,eot=1"],
        n=64, batch_size=64, runs=1, progress=False,
    )
    record = report["records"][0]
    assert record["perturbation"]["within_eps"] and record["perturbation"]["max"] > 1.0
    assert record["robust_accuracy"]["mean"] < record["clean_accuracy"]["mean"] - 0.3


# --- sanity checks ----------------------------------------------------------------------------


def test_a_model_that_masks_gradients_fails_the_sanity_checks(fashion_classifier, fashion_test):
    masked = RoundsInput(fashion_classifier)
    report = evaluate(
        masked, fashion_test, ["pgd:eps=0.1,steps=5,eot=1"], n=32, batch_size=32, runs=1,
        sanity=True, sanity_n=32, progress=False,
    )
    checks = {c["check"]: c for c in report["sanity"]["model"]}
    assert not checks["input gradients are non-zero"]["passed"]
    assert not checks["unbounded attack succeeds"]["passed"]
    assert report["records"][0]["sanity"].startswith("failed")
    assert "**FAILED**" in markdown_table(report)
    validate_report(report)


def test_an_honest_model_passes_the_sanity_checks(fashion_classifier, fashion_test):
    report = evaluate(
        undefended(fashion_classifier), fashion_test, ["pgd:eps=0.1,steps=5,eot=1"], n=32,
        batch_size=32, runs=1, sanity=True, sanity_n=32, progress=False,
    )
    assert all(c["passed"] for c in report["sanity"]["model"]), report["sanity"]
    assert report["records"][0]["sanity"] == "passed"


# --- BPDA -------------------------------------------------------------------------------------


def test_bpda_gradient_is_the_classifiers_gradient_at_the_purified_point(purified):
    x, y = structured_batch(4)
    bpda = attacked_model(AttackSpec("bpda"), purified, None)
    x = x.clone().requires_grad_()
    seed_everything(11)
    F.cross_entropy(bpda(x), y).backward()
    seed_everything(11)
    point = purified.purify(x.detach()).requires_grad_()
    F.cross_entropy(purified.classify(point), y).backward()
    assert not torch.equal(point.detach(), x.detach())
    torch.testing.assert_close(x.grad, point.grad)


def test_full_gradient_differs_from_bpda(purified):
    x, y = structured_batch(4)
    gradients = []
    for model in (purified, attacked_model(AttackSpec("bpda"), purified, None)):
        inputs = x.clone().requires_grad_()
        seed_everything(11)
        F.cross_entropy(model(inputs), y).backward()
        gradients.append(inputs.grad)
    assert not torch.allclose(*gradients)


# --- resume, report, grid ---------------------------------------------------------------------


class Interrupted(Exception):
    """Stands for a crash or a killed job in the middle of a run."""


ATTACKS = ["pgd:steps=1,eot=1,eps=0.1", "bpda:steps=1,eot=1", "transfer:steps=2,eot=1"]


def test_an_interrupted_run_resumes_and_matches_an_uninterrupted_one(
    purified, tmp_path, monkeypatch
):
    data = structured_batch(12)
    settings = {"n": 12, "batch_size": 4, "runs": 2, "seed": 3, "progress": False}
    reference = evaluate(purified, data, ATTACKS, output_dir=tmp_path / "whole", **settings)

    calls, crashes = [], []
    real_run_attack = harness.run_attack

    def crashing_run_attack(spec, *args, **kwargs):
        calls.append(spec.label)
        if len(calls) == 2 and not crashes:
            crashes.append(spec.label)
            raise Interrupted("simulated interruption")
        return real_run_attack(spec, *args, **kwargs)

    monkeypatch.setattr(harness, "run_attack", crashing_run_attack)
    with pytest.raises(Interrupted):
        evaluate(purified, data, ATTACKS, output_dir=tmp_path / "cut", **settings)
    with open(tmp_path / "cut" / "batches-0.jsonl", "a") as file:
        file.write('{"key": "half a line')  # the crash cut the last write short
    calls.clear()
    resumed = evaluate(purified, data, ATTACKS, output_dir=tmp_path / "cut", **settings)

    # 3 attacks x 3 batches, of which the first pgd batch finished before the interruption.
    assert len(calls) == 8 and calls.count("pgd") == 2
    assert without_timings(resumed) == without_timings(reference)
    calls.clear()
    evaluate(purified, data, ATTACKS, output_dir=tmp_path / "cut", **settings)
    assert calls == []  # everything finished: nothing runs again
    assert (tmp_path / "cut" / "grid-model-pgd.png").stat().st_size > 0


def test_a_resumed_folder_refuses_other_settings(purified, tmp_path):
    data = structured_batch(4)
    evaluate(purified, data, ["transfer:steps=1,eot=1"], n=4, batch_size=4, runs=1,
             output_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        evaluate(purified, data, ["transfer:steps=1,eot=1"], n=4, batch_size=4, runs=1, seed=9,
                 output_dir=tmp_path, progress=False)


def test_a_changed_model_is_never_answered_from_stored_batches(purified, tmp_path, monkeypatch):
    """Retrained weights or other purifier settings under the same name run again."""
    data = structured_batch(4)
    settings = {"n": 4, "batch_size": 4, "runs": 1, "output_dir": tmp_path, "progress": False}
    evaluate(purified, data, ["transfer:steps=1,eot=1"], **settings)
    calls = []
    real_run_attack = harness.run_attack
    monkeypatch.setattr(harness, "run_attack",
                        lambda spec, *args, **kwargs: calls.append(spec.label)
                        or real_run_attack(spec, *args, **kwargs))
    evaluate(purified, data, ["transfer:steps=1,eot=1"], **settings)
    assert calls == []
    with torch.no_grad():
        next(purified.classifier.parameters()).add_(0.01)
    evaluate(purified, data, ["transfer:steps=1,eot=1"], **settings)
    assert calls == ["transfer"]
    rescaled = purified.with_purifier(purified.purifier.with_settings(t_star=2))
    evaluate(rescaled, data, ["transfer:steps=1,eot=1"], **settings)
    assert calls == ["transfer", "transfer"]


def test_the_json_report_follows_the_documented_schema(purified, tmp_path):
    evaluate(
        purified, structured_batch(6), ["pgd:steps=1,eot=2", "square:n_queries=5",
                                        "autoattack-rand:steps=1,eot=1"],
        n=6, batch_size=6, runs=2, output_dir=tmp_path, progress=False,
    )
    report = json.loads((tmp_path / "report.json").read_text())
    validate_report(report)
    assert [r["attack"]["gradient_mode"] for r in report["records"]] == [
        "full", "black-box", "full",
    ]
    for record in report["records"]:
        accuracy = record["robust_accuracy"]
        assert len(accuracy["per_run"]) == 2 and record["runs"] == 2 and record["n"] == 6
        assert accuracy["worst_case"] <= accuracy["mean"] <= 1
        assert accuracy["ci95_mean"][0] <= accuracy["mean"] <= accuracy["ci95_mean"][1]
        assert record["attack"]["reduced"]
    broken = json.loads(json.dumps(report))
    del broken["records"][0]["robust_accuracy"]["worst_case"]
    broken["records"][1]["seed"] = "0"
    with pytest.raises(ValueError, match="worst_case(.|\n)*seed"):
        validate_report(broken)
    documented = DOCS.read_text()
    for key in _schema_keys(REPORT_SCHEMA) | _schema_keys(RECORD_SCHEMA):
        assert re.search(rf"`{re.escape(key)}`", documented), f"{key} is not documented"
    assert "| model | attack |" in (tmp_path / "report.md").read_text()


def _schema_keys(schema) -> set[str]:
    if isinstance(schema, list):
        return _schema_keys(schema[0])
    if not isinstance(schema, dict):
        return set()
    return set(schema) | {k for value in schema.values() for k in _schema_keys(value)}


def test_a_surrogate_attack_says_so_in_its_record(purified):
    report = evaluate(
        purified, structured_batch(4),
        ["pgd:steps=1,eot=1,gradient=surrogate,surrogate_steps=2"], n=4, batch_size=4, runs=1,
        progress=False,
    )
    assert report["records"][0]["attack"]["gradient_mode"] == "surrogate(ddim, 2 steps)"


# --- compare, command line, statistics --------------------------------------------------------


def test_compare_runs_every_defence_on_the_same_examples(purified):
    defences = build_defences(purified, adversarially_trained=undefended(tiny_classifier(1)))
    assert list(defences) == [
        "undefended", "adversarially-trained", "purifier-none", "purifier-pixel",
        "purifier-adversarial",
    ]
    report = compare(defences, structured_batch(4), ["transfer:steps=1,eot=1"], n=4,
                     batch_size=4, runs=1, progress=False)
    assert [r["model"] for r in report["records"]] == list(defences)
    assert report["models"]["purifier-pixel"]["purifier"]["guidance"] == "pixel"
    assert report["models"]["undefended"]["defended"] is False


def test_compare_sets_the_scale_of_each_guidance_mode(purified):
    own_scale = purified.purifier.config.guidance_scale
    defences = build_defences(purified, scales={"pixel": 0.5})
    assert defences["purifier-pixel"].purifier.config.guidance_scale == 0.5
    assert defences["purifier-adversarial"].purifier.config.guidance_scale == own_scale
    with pytest.raises(ValueError, match="unknown guidance modes"):
        build_defences(purified, scales={"pixels": 0.5})


def test_command_line_evaluates_a_timm_checkpoint(tmp_path, fashion_test):
    import timm
    from safetensors.torch import save_file

    from purifyguard.evaluation import cli

    classifier = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    save_file(classifier.state_dict(), tmp_path / "classifier.safetensors")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    _fashion(train=False)  # points the loader at the shared copy when there is one
    args = parser.parse_args([
        "--classifier", "resnet10t", "--checkpoint", str(tmp_path / "classifier.safetensors"),
        "--purifier", "none", "--attack", "pgd:steps=1,eot=1", "--n", "4", "--batch-size", "4",
        "--runs", "1", "--output-dir", str(tmp_path / "out"), "--no-progress",
    ])
    report = cli.run(args)
    assert report["records"][0]["model"] == "resnet10t"
    validate_report(json.loads((tmp_path / "out" / "report.json").read_text()))


def test_attack_specs_parse_and_reject_unknown_settings():
    spec = parse_attack("pgd:norm=l2,eps=1.5,steps=20,eot=4,random_start=false,name=x")
    assert (spec.norm, spec.eps, spec.steps, spec.eot, spec.random_start, spec.label) == (
        "l2", 1.5, 20, 4, False, "x",
    )
    assert spec.alpha == pytest.approx(1.5 / 4)
    with pytest.raises(ValueError, match="unknown attack setting"):
        parse_attack("pgd:epsilon=0.1")
    with pytest.raises(ValueError, match="kind"):
        parse_attack("fgsm")


def test_wilson_interval_matches_known_values():
    low, high = wilson_interval(0.5, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0.0, 20)[0] == 0.0 and wilson_interval(0.0, 20)[1] > 0.1


def test_with_purifier_leaves_the_original_model_alone(purified):
    bpda = attacked_model(AttackSpec("bpda"), purified, None)
    bare = purified.with_purifier(None)
    assert bpda.purifier.config.gradient_mode == "bpda" and bare.purifier is None
    assert purified.purifier.config.gradient_mode == "full"
    assert bpda.classifier is purified.classifier and bare.normalize is purified.normalize


DISTRIBUTED_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from conftest import make_unet
from test_evaluation import tiny_classifier, structured_batch, without_timings
from purifyguard import PurifiedModel, Purifier, evaluate
model = PurifiedModel(tiny_classifier(), Purifier(make_unet(), t_star=3), mean=(0.5,), std=(0.5,))
report = evaluate(model, structured_batch(8), ["pgd:steps=1,eot=1"], n=8, batch_size=2, runs=2,
                  seed=5, output_dir=sys.argv[1], progress=False)
json.dump({{"processes": report["settings"]["num_processes"],
            "records": without_timings(report)}}, open(sys.argv[1] + "/check.json", "w"))
"""


@pytest.mark.slow
def test_two_processes_shard_the_batches_and_report_what_one_process_reports(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(DISTRIBUTED_SCRIPT.format(tests=str(Path(__file__).parent)))
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    str(script), str(tmp_path / "two")], check=True, capture_output=True)
    one = json.loads((tmp_path / "one" / "check.json").read_text())
    two = json.loads((tmp_path / "two" / "check.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["records"] == one["records"]
    assert len((tmp_path / "two" / "batches-1.jsonl").read_text().splitlines()) == 4


def test_attacks_without_noise_to_average_take_one_eot_sample():
    assert parse_attack("transfer:eps=0.1,steps=5").eot == 1
    assert parse_attack("square:eps=0.1").eot == 1
    assert parse_attack("pgd:eps=0.1,steps=5").eot == 20
