"""Attacks from what the defence exposes (purifyguard/evaluation/exposed_attacks.py): transfer
crafted on the purifier's guidance network (source=guidance), the feature attack on its
representation, and init= starting apgd-eot / pgd from either's examples."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch
from test_evaluation import structured_batch, tiny_classifier

from purifyguard import PurifiedModel
from purifyguard.evaluation import evaluate, parse_attack, register_attack, validate_report
from purifyguard.evaluation.attack_registry import registered_attacks, unregister_attack
from purifyguard.evaluation.attacks import attacked_model, initial_examples, run_attack
from purifyguard.evaluation.exposed_attacks import GuidanceClassifier, feature_targets
from purifyguard.evaluation.pgd import eot_pgd, perturbation_norm
from purifyguard.evaluation.store import batch_key


@pytest.fixture
def guided(make_purifier) -> PurifiedModel:
    purifier = make_purifier(t_star=3, guidance="adversarial", guidance_scale=1.0)
    return PurifiedModel(tiny_classifier(), purifier, mean=(0.5,), std=(0.5,))


@dataclass
class Calls:
    """A module's forward calls (their inputs), recorded while `calls` is open."""

    inputs: list[torch.Tensor] = field(default_factory=list)


@contextmanager
def calls(module: torch.nn.Module) -> Iterator[Calls]:
    seen = Calls()
    handle = module.register_forward_pre_hook(
        lambda _, args: seen.inputs.append(args[0].detach().clone()))
    try:
        yield seen
    finally:
        handle.remove()


def test_transfer_from_the_guidance_network_crafts_on_it_not_on_the_classifier(guided):
    x, y = structured_batch(6)
    spec = parse_attack("transfer:source=guidance,eps=0.1,steps=3")
    assert spec.gradient_mode == "transfer from guidance network" and spec.eot == 1
    attacked = attacked_model(spec, guided, guided.with_purifier(None))
    network = guided.purifier.guidance.network
    assert isinstance(attacked, GuidanceClassifier)
    assert torch.equal(attacked(x), network(x))  # the network as a classifier of [0, 1] images
    # a timm network runs forward_features / forward_head: spy on its classifier head
    with calls(network.get_classifier()) as crafted, calls(guided.classifier) as classifier, \
            calls(guided.purifier.unet) as denoiser:
        adversarial = run_attack(spec, attacked, x, y, seed=5)
    assert len(crafted.inputs) == 3 and not classifier.inputs and not denoiser.inputs
    torch.manual_seed(5)
    expected = eot_pgd(network, x, y, eps=0.1, step_size=0.025, steps=3)
    assert torch.equal(adversarial, expected)
    assert float(perturbation_norm(x, adversarial, "linf").max()) <= 0.1 + 1e-6
    # the default source is the undefended classifier, as before
    plain = parse_attack("transfer:eps=0.1,steps=3")
    assert attacked_model(plain, guided, guided.with_purifier(None)).purifier is None


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.5)])
def test_the_feature_attack_pulls_features_toward_another_class_within_the_ball(
        guided, norm, eps):
    x, y = structured_batch(12)
    spec = parse_attack(f"feature:norm={norm},eps={eps},steps=10")
    attacked = attacked_model(spec, guided, None)  # no undefended classifier needed
    assert isinstance(attacked, GuidanceClassifier)
    with calls(guided.classifier) as classifier, calls(guided.purifier.unet) as denoiser:
        adversarial = run_attack(spec, attacked, x, y, seed=0)
    assert not classifier.inputs and not denoiser.inputs
    assert float(perturbation_norm(x, adversarial, norm).max()) <= eps * (1 + 1e-5)
    with torch.no_grad():
        clean, _ = attacked.features_and_logits(x)
        moved, _ = attacked.features_and_logits(adversarial)
    targets, toward = feature_targets(attacked, clean, y)
    assert toward.all()
    before, after = attacked.distance(clean, targets), attacked.distance(moved, targets)
    assert float(after.mean()) < 0.8 * float(before.mean())
    assert float(attacked.distance(moved, clean).mean()) > 0


def test_a_batch_of_one_class_is_pushed_away_from_its_own_features(guided):
    x, _ = structured_batch(4)
    y = torch.zeros(4, dtype=torch.long)
    attacked = attacked_model(parse_attack("feature:eps=0.1,steps=5"), guided, None)
    with torch.no_grad():
        clean, _ = attacked.features_and_logits(x)
    assert not feature_targets(attacked, clean, y)[1].any()
    adversarial = run_attack(parse_attack("feature:eps=0.1,steps=5"), attacked, x, y, seed=0)
    with torch.no_grad():
        moved, _ = attacked.features_and_logits(adversarial)
    assert float(attacked.distance(moved, clean).min()) > 0


@pytest.mark.parametrize("kind,first_gradient_call", [("pgd", 0), ("apgd-eot", 2)])
@pytest.mark.parametrize("init", ["transfer-guidance", "feature"])
def test_init_starts_the_full_gradient_attack_from_the_cheap_attacks_examples(
        guided, kind, first_gradient_call, init):
    x, y = structured_batch(4)
    fast = ",select_draws=0" if kind == "apgd-eot" else ""
    spec = parse_attack(f"{kind}:eps=0.1,steps=2,eot=1,init={init},init_steps=3{fast}")
    assert spec.to_dict()["init"] == {
        "name": init, "kind": spec.init_spec.kind, "norm": "linf", "eps": 0.1, "steps": 3,
        "step_size": 0.025, "random_start": True,
        "gradient_mode": "transfer from guidance network", "gradient_evaluations": 3,
    }
    attacked = attacked_model(spec, guided, None)
    start = initial_examples(spec, attacked, x, y, seed=3)
    assert not torch.equal(start, x)
    with calls(guided) as seen:  # apgd-eot probes the model twice on one image first
        run_attack(spec, attacked, x, y, seed=3)
    assert torch.allclose(seen.inputs[first_gradient_call], start, atol=1e-6)
    with calls(guided) as seen:
        run_attack(spec.replace(init=None, init_steps=None), attacked, x, y, seed=3)
    assert not torch.allclose(seen.inputs[first_gradient_call], start, atol=1e-3)


def test_init_with_a_smooth_substitute_crafts_on_the_real_guidance_network(guided):
    x, y = structured_batch(2)
    spec = parse_attack("pgd:eps=0.1,steps=1,eot=1,init=feature,init_steps=2,substitute=smooth")
    attacked = attacked_model(spec, guided, None)
    network = guided.purifier.guidance.network
    with calls(network.get_classifier()) as seen:
        start = initial_examples(spec, attacked, x, y, seed=1)
    assert len(seen.inputs) == 4  # clean features, 2 steps, the last iterate: the real one
    assert torch.equal(start, initial_examples(spec, guided, x, y, seed=1))
    run_attack(spec, attacked, x, y, seed=1)


def test_the_options_stay_out_of_the_batch_keys_until_they_are_set():
    for text in ("transfer", "pgd", "apgd-eot:steps=20"):
        default = parse_attack(text)
        spelled = parse_attack(f"{text}{',' if ':' in text else ':'}source=undefended"
                               if text == "transfer" else
                               f"{text}{',' if ':' in text else ':'}init=none")
        assert batch_key("m", spelled, 0, "v") == batch_key("m", default, 0, "v")
        assert default.to_dict()["init"] is None and "init" not in default.identity()
    assert batch_key("m", parse_attack("transfer:source=guidance"), 0, "v") != \
        batch_key("m", parse_attack("transfer"), 0, "v")
    keys = {batch_key("m", parse_attack(f"pgd:init={init}"), 0, "v")
            for init in ("transfer-guidance", "feature")}
    assert len(keys) == 2 and batch_key("m", parse_attack("pgd"), 0, "v") not in keys


@pytest.mark.parametrize("text,message", [
    ("pgd:source=guidance", "source='guidance' is an option of transfer, not of 'pgd'"),
    ("feature:source=guidance", "source='guidance' is an option of transfer"),
    ("transfer:source=classifier", "source must be one of"),
    ("bpda:init=feature", "init='feature' is an option of apgd-eot, pgd, not of 'bpda'"),
    ("transfer:init=feature", "init='feature' is an option of apgd-eot, pgd"),
    ("pgd:init=transfer", "init must be one of"),
    ("pgd:init_steps=5", "init_steps is the budget of the init attack: set init"),
    ("pgd:init=feature,init_steps=0", "init_steps"),
])
def test_options_on_the_wrong_kind_are_refused_by_name(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_attack(text)


def test_a_defence_without_a_guidance_network_is_refused_by_name(make_purifier):
    unguided = PurifiedModel(tiny_classifier(), make_purifier(t_star=3))
    pixel = PurifiedModel(tiny_classifier(), make_purifier(t_star=3, guidance="pixel",
                                                           guidance_scale=1.0))
    cases = {
        "transfer:source=guidance": "transfer:source=guidance crafts on the defence's guidance",
        "feature": "the feature attack crafts on the defence's guidance network",
        "pgd:init=feature": "init='feature' crafts on the defence's guidance network",
    }
    for text, message in cases.items():
        for model, reason in ((unguided, r"guidance \('none'\) uses no network"),
                              (pixel, r"guidance \('pixel'\) uses no network"),
                              (tiny_classifier(), "has no purifier")):
            with pytest.raises(ValueError, match=f"{message}.*{reason}"):
                attacked_model(parse_attack(text), model, None)


def test_init_on_a_kind_whose_run_takes_no_start_is_refused_by_name(guided):
    @register_attack("still", options=("init",))
    def still(spec, model, images, labels):
        return images.clone()

    @register_attack("moved", options=("init",))
    def moved(spec, model, images, labels, start=None):
        return images.clone() if start is None else start.clone()

    try:
        x, y = structured_batch(2)
        spec = parse_attack("still:eps=0.1,steps=1,init=feature,init_steps=1")
        attacked = attacked_model(spec, guided, None)
        with pytest.raises(ValueError, match="init='feature' starts the attack.*takes no start"):
            run_attack(spec, attacked, x, y, seed=0)
        # without init it runs as before, and a run that takes start gets the init's examples
        assert torch.equal(run_attack(spec.replace(init=None, init_steps=None), attacked, x, y,
                                      seed=0), x)
        spec = parse_attack("moved:eps=0.1,steps=1,init=feature,init_steps=1")
        assert torch.equal(run_attack(spec, attacked, x, y, seed=0),
                           initial_examples(spec, attacked, x, y, seed=0))
        assert torch.equal(run_attack(spec.replace(init=None, init_steps=None), attacked, x, y,
                                      seed=0), x)
    finally:
        for kind in ("still", "moved"):
            if kind in registered_attacks():
                unregister_attack(kind)


def test_evaluate_runs_the_exposed_attacks_and_records_them(guided):
    attacks = ["transfer:source=guidance,eps=0.1,steps=2", "feature:eps=0.1,steps=2",
               "pgd:eps=0.1,steps=1,eot=1,init=feature,init_steps=2"]
    report = evaluate(guided, structured_batch(6), attacks, n=6, batch_size=3, runs=1,
                      progress=False, eot_check=0)
    validate_report(report)
    records = {r["attack"]["name"]: r["attack"] for r in report["records"]}
    assert records["transfer"]["gradient_mode"] == "transfer from guidance network"
    assert records["feature"]["gradient_mode"] == "transfer from guidance network"
    assert records["feature"]["kind"] == "feature" and records["feature"]["eot"] == 1
    assert records["transfer"]["init"] is None
    assert records["pgd"]["init"]["kind"] == "feature" and records["pgd"]["init"]["steps"] == 2
    assert all(r["perturbation"]["within_eps"] for r in report["records"])
