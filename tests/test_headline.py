"""The headline (purifyguard/evaluation/headline.py): per image the worst over attacks, chosen on
selection runs and judged again on fresh ones; the cheap attacks first, the later ones on the
survivors only; within-N figures; resume by attack and batch; one threat model."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from test_evaluation import structured_batch, tiny_classifier
from torch import nn

from purifyguard import PurifiedModel
from purifyguard.evaluation import evaluate, headline, headline_markdown, register_attack
from purifyguard.evaluation.attack_registry import unregister_attack
from purifyguard.evaluation.seeds import derive_seed

headline_module = importlib.import_module("purifyguard.evaluation.headline")

N = 8
CLEAN_WRONG = 7  # its class code says the next class: wrong in every run, never attacked
FOOLS = {"fool-a": {0, 1}, "fool-b": {2, 3}}
A, B = "fool-a:eps=0.1", "fool-b:eps=0.1"


def marked_batch(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose pixel (0, 0) codes the class the Marked model answers and whose pixel
    (1, 1) codes the image's index (so a planted attack knows which images it was given)."""
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(n, 1, 28, 28, generator=generator)
    labels = torch.arange(n) % 5
    codes = labels.clone()
    codes[CLEAN_WRONG] += 1
    images[:, 0, 0, 0] = (codes + 0.5) / 10
    images[:, 0, 1, 1] = torch.arange(n) / 100
    return images, labels


def indices(images: torch.Tensor) -> list[int]:
    return images[:, 0, 1, 1].mul(100).round().long().tolist()


class Marked(nn.Module):
    """Answers the class coded in pixel (0, 0); with noise, its logits draw Gaussian noise from
    torch's global generator (which predictions() seeds run by run), like a purifier."""

    def __init__(self, noise: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        self.noise = noise
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = (x[:, 0, 0, 0] * 10).floor().long().clamp(0, 9)
        logits = 3 * self.scale * F.one_hot(code, 10).float()
        return logits + self.noise * torch.randn_like(logits) if self.noise else logits


@pytest.fixture
def planted():
    """Two attacks: fool-a moves the class code of images 0-1 to the next class, fool-b that
    of images 2-3 (0.08 < eps); each logs the image indices of every batch it is given, and
    raises on the call given in fail_on[kind] (an interruption)."""
    seen: dict[str, list[list[int]]] = {kind: [] for kind in FOOLS}
    fail_on: dict[str, int] = {}

    def make(kind: str):
        def run(spec, model, images, labels):
            seen[kind].append(indices(images))
            if fail_on.get(kind) == len(seen[kind]):
                raise RuntimeError("interrupted")
            fooled = torch.tensor([i in FOOLS[kind] for i in indices(images)])
            out = images.clone()
            out[fooled, 0, 0, 0] += 0.08
            return out
        return run

    for kind in FOOLS:
        register_attack(kind, uses_eot=False)(make(kind))
    yield seen, fail_on
    for kind in FOOLS:
        unregister_attack(kind)


def run_headline(model, attacks, **settings):
    settings = {"n": N, "batch_size": 4, "runs": 4, "progress": False, "device": "cpu",
                **settings}
    return headline(model, marked_batch(), attacks, **settings)


def flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


# --- the worst over attacks, and who runs on what ---------------------------------------------


def test_the_per_image_worst_is_below_every_single_attack(planted):
    model = Marked()
    result = run_headline(model, [A, B])
    report = evaluate(model, marked_batch(), [A, B], n=N, batch_size=4, runs=4, progress=False,
                      device="cpu", eot_check=0)
    singles = {r["attack"]["name"]: r["robust_accuracy"]["mean"] for r in report["records"]}
    assert singles == {"fool-a": 5 / N, "fool-b": 5 / N}  # each misses the other's two images
    assert result["robust_accuracy"]["mean"] == 3 / N < min(singles.values())
    assert result["clean_accuracy"]["mean"] == 7 / N
    assert result["per_image"]["attack"] == ["fool-a"] * 2 + ["fool-b"] * 2 + ["clean"] * 4
    assert result["per_image"]["correct_runs"] == [0, 0, 0, 0, 4, 4, 4, 0]
    assert [(s["name"], s["provided"], s["improved"]) for s in result["per_attack"]] == [
        ("fool-a", 2, 2), ("fool-b", 2, 2)]
    assert result["clean_unattacked"] == 4
    assert result["perturbation"]["within_eps"] and result["perturbation"]["max"] > 0.07
    assert [a["name"] for a in result["attacks"]] == ["fool-a", "fool-b"]


def test_each_attack_runs_only_on_the_survivors_of_the_earlier_ones(planted):
    seen, _ = planted
    result = run_headline(Marked(), [A, B])
    assert seen["fool-a"] == [[0, 1, 2, 3], [4, 5, 6]]  # not 7: wrong clean in every run
    assert seen["fool-b"] == [[2, 3, 4, 5], [6]]  # not 0-1: fool-a fooled them in every run
    assert [s["attacked"] for s in result["per_attack"]] == [7, 5]


def test_the_verdict_uses_fresh_purifications_never_used_in_selection(planted, monkeypatch):
    calls = []
    real = headline_module.predictions

    def spy(model, images, runs, seed):
        calls.append((runs, seed))
        return real(model, images, runs, seed)

    monkeypatch.setattr(headline_module, "predictions", spy)
    result = run_headline(Marked(noise=2.0), [A, B], runs=5, selection_runs=3)
    selection = {seed for runs, seed in calls if runs == 3}
    verdict = {seed for runs, seed in calls if runs == 5}
    assert len(verdict) == 4  # 2 batches x (clean, chosen), each on its own seed
    assert len(selection) >= 3 and not selection & verdict
    run_seeds = {kind: {derive_seed(s, "run", r) for s in seeds for r in range(5)}
                 for kind, seeds in (("selection", selection), ("verdict", verdict))}
    assert not run_seeds["selection"] & run_seeds["verdict"]
    assert result["runs"] == 5 and result["selection_runs"] == 3
    assert all(0 <= k <= 3 for k in result["per_image"]["selection_correct_runs"])
    assert all(0 <= k <= 5 for k in result["per_image"]["correct_runs"])


def test_within_n_submissions_are_reported_and_fall_with_n(planted):
    result = run_headline(Marked(noise=2.0), [A, B], n=N, runs=10)
    for key in ("robust_accuracy", "clean_accuracy"):
        summary = result[key]
        within = summary["within_submissions"]
        assert set(within) == {"1", "3", "10"}
        assert within["1"] >= within["3"] >= within["10"]
        assert within["1"] == pytest.approx(summary["mean"])
        assert within["10"] == pytest.approx(summary["worst_case"])
        assert summary["ci95_mean"][0] <= summary["mean"] <= summary["ci95_mean"][1]
    assert result["robust_accuracy"]["within_submissions"]["1"] > (
        result["robust_accuracy"]["within_submissions"]["10"])  # the noise matters here
    # Run r counts an image only when its clean image is right in run r too.
    per_image = result["per_image"]
    assert all(k <= c for k, c in zip(per_image["correct_runs"], per_image["clean_correct_runs"]))
    line = headline_markdown(result).splitlines()[0]
    assert line.startswith("**Robust accuracy") and "worst of 10" in line
    assert "within 1 / 3 / 10 submissions" in line


def test_an_attack_the_evaluation_ran_takes_its_kept_examples_instead(planted, tmp_path):
    seen, _ = planted
    model, folder = Marked(), tmp_path / "eval"
    evaluate(model, marked_batch(), [A], n=N, batch_size=4, runs=4, progress=False, device="cpu",
             eot_check=0, output_dir=folder, model_name="marked")
    kept = sorted(path.name for path in (folder / "adversarial").glob("marked--fool-a--*"))
    assert kept == ["marked--fool-a--batch0.safetensors", "marked--fool-a--batch1.safetensors"]
    seen["fool-a"].clear()
    alone = run_headline(model, [A, B])
    seen["fool-a"].clear()

    result = run_headline(model, [A, B], examples_from=folder, model_name="marked")
    assert seen["fool-a"] == []  # the evaluation's examples, not a second run
    assert [(s["name"], s["attacked"], s["from_evaluation"]) for s in result["per_attack"]] == [
        ("fool-a", 7, 7), ("fool-b", 5, 0)]
    assert result["per_image"] == alone["per_image"]  # the planted attack is deterministic
    assert "7 (7 from the evaluation)" in headline_markdown(result)

    (folder / "adversarial" / "marked--fool-a--batch1.safetensors").unlink()
    result = run_headline(model, [A, B], examples_from=folder, model_name="marked")
    assert seen["fool-a"] == [[4, 5, 6]]  # batch 1 of the evaluation kept nothing now
    assert result["per_attack"][0]["from_evaluation"] == 4
    assert result["per_image"] == alone["per_image"]

    seen["fool-a"].clear()  # another version of the model: its examples are not this one's
    result = run_headline(Marked(scale=2.0), [A], examples_from=folder, model_name="marked")
    assert flat(seen["fool-a"]) == list(range(7)) and result["per_attack"][0]["from_evaluation"] == 0


def test_examples_from_must_be_an_evaluation_of_the_same_images(planted, tmp_path):
    evaluate(Marked(), marked_batch(), [A], n=4, batch_size=4, runs=2, progress=False,
             device="cpu", eot_check=0, output_dir=tmp_path / "eval", model_name="marked")
    with pytest.raises(ValueError, match="go together"):
        run_headline(Marked(), [A], examples_from=tmp_path / "eval")
    with pytest.raises(ValueError, match="go together"):
        run_headline(Marked(), [A], model_name="marked")
    with pytest.raises(ValueError, match="evaluation output folder"):
        run_headline(Marked(), [A], examples_from=tmp_path, model_name="marked")
    with pytest.raises(ValueError, match="evaluated other images"):
        run_headline(Marked(), [A], examples_from=tmp_path / "eval", model_name="marked")


def test_a_deterministic_classifier_has_worst_case_equal_to_mean():
    classifier = tiny_classifier()
    model = PurifiedModel(classifier, purifier=False, mean=(0.5,), std=(0.5,))
    images, _ = structured_batch(8)
    with torch.no_grad():
        labels = model(images).argmax(-1)  # right on every clean image
    result = headline(model, (images, labels), ["pgd:eps=0.3,steps=3,eot=1"], n=8, runs=10,
                      progress=False, device="cpu")
    robust = result["robust_accuracy"]
    assert robust["worst_case"] == robust["mean"] == robust["majority"] < 1
    assert set(robust["within_submissions"].values()) == {robust["mean"]}
    assert set(result["per_image"]["correct_runs"]) <= {0, 10}
    assert result["perturbation"]["within_eps"]


def test_a_randomised_purified_model_with_real_attacks(make_purifier):
    model = PurifiedModel(tiny_classifier(), make_purifier(t_star=3), mean=(0.5,), std=(0.5,))
    images, _ = structured_batch(6)
    with torch.no_grad():
        labels = model.with_purifier(None)(images).argmax(-1)
    result = headline(model, (images, labels),
                      ["transfer:eps=0.2,steps=3", "pgd:eps=0.2,steps=2,eot=1"],
                      n=6, batch_size=4, runs=3, progress=False, device="cpu")
    first, second = result["per_attack"]
    assert 0 < first["attacked"] <= 6
    assert second["attacked"] <= first["attacked"]
    assert result["perturbation"]["within_eps"]
    assert result["robust_accuracy"]["mean"] <= result["clean_accuracy"]["mean"]
    assert sum(s["provided"] for s in result["per_attack"]) + result["clean_unattacked"] == 6


# --- resume ---------------------------------------------------------------------------------


def test_resume_skips_finished_attacks_and_carries_on_a_longer_list(planted, tmp_path):
    seen, _ = planted
    model = Marked(noise=1.0)
    run_headline(model, [A], output_dir=tmp_path)
    assert len(seen["fool-a"]) == 2
    result = run_headline(model, [A, B], output_dir=tmp_path)
    assert len(seen["fool-a"]) == 2 and len(seen["fool-b"]) > 0  # A not again, B ran
    calls_b = len(seen["fool-b"])
    again = run_headline(model, [A, B], output_dir=tmp_path)
    assert len(seen["fool-a"]) == 2 and len(seen["fool-b"]) == calls_b
    fresh = run_headline(model, [A, B], output_dir=tmp_path / "fresh")
    for other in (again, fresh):
        assert other["per_image"] == result["per_image"]
        assert other["robust_accuracy"] == result["robust_accuracy"]
    stored = json.loads((tmp_path / "headline.json").read_text())
    assert stored["per_image"] == result["per_image"]
    assert (tmp_path / "headline.md").read_text() == headline_markdown(result)


def test_resume_carries_on_an_interrupted_attack_where_it_stopped(planted, tmp_path):
    seen, fail_on = planted
    model = Marked(noise=1.0)
    whole = run_headline(model, [A, B], batch_size=2, output_dir=tmp_path / "whole")
    batches_b = list(seen["fool-b"])
    assert len(batches_b) >= 2
    seen["fool-b"].clear()
    fail_on["fool-b"] = 2
    with pytest.raises(RuntimeError, match="interrupted"):
        run_headline(model, [A, B], batch_size=2, output_dir=tmp_path / "cut")
    assert seen["fool-b"] == batches_b[:2]
    calls_a = len(seen["fool-a"])
    del fail_on["fool-b"]
    resumed = run_headline(model, [A, B], batch_size=2, output_dir=tmp_path / "cut")
    assert len(seen["fool-a"]) == calls_a  # finished: not again
    assert seen["fool-b"] == batches_b[:2] + batches_b[1:]  # from the batch that failed on
    assert resumed["per_image"] == whole["per_image"]
    assert resumed["per_attack"][1]["attacked"] == whole["per_attack"][1]["attacked"]


class CountingMarked(Marked):
    """Marked that counts the images it classifies (a verdict judged again would add some)."""

    def __init__(self) -> None:
        super().__init__(noise=1.0)
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return super().forward(x)


def test_a_finished_headline_run_again_reuses_its_verdict_unless_it_changed(planted, tmp_path):
    model = CountingMarked()
    first = run_headline(model, [A, B], output_dir=tmp_path)
    model.images = 0
    again = run_headline(model, [A, B], output_dir=tmp_path)
    assert model.images == 0 and again == first  # nothing purified, the stored verdict back
    more_runs = run_headline(model, [A, B], output_dir=tmp_path, runs=6, selection_runs=4)
    assert model.images == 2 * N * 6 and more_runs["runs"] == 6  # judged on 6 runs
    stored = json.loads((tmp_path / "headline.json").read_text())
    stored["per_image"]["selection_correct_runs"][0] += 1  # not the verdict of this state
    (tmp_path / "headline.json").write_text(json.dumps(stored))
    model.images = 0
    judged = run_headline(model, [A, B], output_dir=tmp_path, runs=6, selection_runs=4)
    assert model.images == 2 * N * 6 and judged["per_image"] == more_runs["per_image"]
    model.images = 0
    run_headline(model, [A, B], output_dir=tmp_path, runs=6, selection_runs=4,
                 resume=False)  # starts over: attacked and judged again
    assert model.images > 2 * N * 6


def test_resume_refuses_a_store_of_other_settings(planted, tmp_path):
    seen, _ = planted
    run_headline(Marked(), [A, B], output_dir=tmp_path)
    with pytest.raises(ValueError, match="other settings.*seed"):
        run_headline(Marked(), [A, B], output_dir=tmp_path, seed=1)
    with pytest.raises(ValueError, match="other settings.*model_version"):
        run_headline(Marked(scale=2.0), [A, B], output_dir=tmp_path)
    with pytest.raises(ValueError, match="other settings.*selection_runs"):
        run_headline(Marked(), [A, B], output_dir=tmp_path, selection_runs=2)
    with pytest.raises(ValueError, match="other attacks"):
        run_headline(Marked(), [B, A], output_dir=tmp_path)
    with pytest.raises(ValueError, match="other attacks"):
        run_headline(Marked(), ["fool-a:eps=0.1,steps=5", B], output_dir=tmp_path)
    calls = len(seen["fool-b"])
    result = run_headline(Marked(), [B], output_dir=tmp_path, resume=False)  # starts over
    assert len(seen["fool-b"]) == calls + 2
    assert [s["name"] for s in result["per_attack"]] == ["fool-b"]
    seen["fool-b"].clear()
    rejudged = run_headline(Marked(), [B], output_dir=tmp_path, runs=6, selection_runs=4)
    assert rejudged["runs"] == 6 and not seen["fool-b"]  # judged again, nothing attacked


# --- one threat model, and the arguments -------------------------------------------------------


def test_attacks_of_other_eps_or_norm_in_one_headline_are_refused(planted):
    seen, _ = planted
    with pytest.raises(ValueError, match="one threat model"):
        run_headline(Marked(), [A, "fool-b:eps=0.2"])
    with pytest.raises(ValueError, match="one threat model"):
        run_headline(Marked(), [A, "fool-b:eps=0.1,norm=l2"])
    assert seen == {"fool-a": [], "fool-b": []}


def test_bad_arguments_are_refused_before_anything_runs(planted):
    for attacks, match in ((None, "attacks must list"), ([A, A], "unique"),
                           (["fool-a:eps=0.1,name=clean"], "unique")):
        with pytest.raises(ValueError, match=match):
            run_headline(Marked(), attacks)
    with pytest.raises(ValueError, match="selection_runs"):
        run_headline(Marked(), [A], selection_runs=0)
    with pytest.raises(ValueError, match="undefended classifier"):
        run_headline(Marked(), ["transfer:eps=0.1"])


def test_an_attack_leaving_its_ball_is_refused(tmp_path):
    @register_attack("overshoot", uses_eot=False)
    def overshoot(spec, model, images, labels):
        return (images + 2 * spec.eps).clamp(0, 1)

    try:
        with pytest.raises(ValueError, match="outside its linf ball"):
            run_headline(Marked(), ["overshoot:eps=0.1"])
    finally:
        unregister_attack("overshoot")
