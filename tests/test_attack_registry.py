"""The attack registry (purifyguard/evaluation/attack_registry.py): an attack added with one
decorated function or class is accepted by parse_attack, AttackSpec and evaluate, and recorded
in the report; bad registrations are refused; the built-ins and their batch keys are as before."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_evaluation import structured_batch, tiny_classifier

import purifyguard
from purifyguard.evaluation import (
    Attack,
    AttackSpec,
    parse_attack,
    register_attack,
    registered_attacks,
    validate_report,
)
from purifyguard.evaluation.attack_registry import ATTACKS, unregister_attack
from purifyguard.evaluation.attacks import KINDS, STEPPED_KINDS, default_attacks, run_attack
from purifyguard.evaluation.store import batch_key

PROTOCOL = ("apgd-eot", "pgd", "autoattack-rand", "bpda", "transfer", "square")
BUILT_IN = (*PROTOCOL, "feature")  # feature: exposed_attacks.py, not in the protocol's set


@pytest.fixture(autouse=True)
def clean_registry():
    """Every kind a test registers is gone afterwards, so other tests see the built-ins only."""
    before = registered_attacks()
    yield
    for kind in registered_attacks():
        if kind not in before:
            unregister_attack(kind)
    assert registered_attacks() == before


def register_fgsm() -> None:
    @register_attack("fgsm", default_step=1.0, uses_eot=False,
                     gradient_evaluations=lambda spec: 1)
    def fgsm(spec, model, images, labels):
        """One signed-gradient step of spec.alpha (eps by default)."""
        images = images.clone().requires_grad_(True)
        loss = F.cross_entropy(model(images), labels)
        (gradient,) = torch.autograd.grad(loss, images)
        return (images + spec.alpha * gradient.sign()).detach()


def test_the_registry_lists_the_built_ins_in_their_order():
    assert registered_attacks() == BUILT_IN
    assert tuple(KINDS) == BUILT_IN and set(ATTACKS) == set(BUILT_IN)
    assert tuple(STEPPED_KINDS) == ("apgd-eot", "pgd", "bpda", "transfer", "feature")
    assert [spec.kind for spec in default_attacks()] == list(PROTOCOL)
    assert purifyguard.evaluation.register_attack is register_attack
    assert all(isinstance(attack, Attack) and attack.description for attack in ATTACKS.values())


def test_built_in_specs_keep_their_batch_keys():
    """Stored batches are found by these keys: the registry must not change them."""
    keys = [batch_key("m", spec, 3, "v") for spec in default_attacks()]
    assert keys == ["m@v|apgd-eot#006f297f|3", "m@v|pgd#206ba66d|3",
                    "m@v|autoattack-rand#16a089bd|3", "m@v|bpda#59604fd2|3",
                    "m@v|transfer#4efa025a|3", "m@v|square#ef163026|3"]
    more = {
        "bpda:steps=10,eot=2": "bpda#4459c05f",
        "transfer:eot=5,steps=300": "transfer#f646653f",
        "square:n_queries=10,eps=0.03": "square#21c4946a",
        "apgd-eot:steps=50,restarts=2,loss=ce,graft=true,eot=4,select_draws=0": "apgd-eot#b7e5e4ec",
        "apgd-eot:step_size=0.02,eot_weighting=em": "apgd-eot#e27fdccb",
        "pgd:gradient=surrogate,surrogate_steps=3,checkpointing=true,random_start=false,name=x":
            "x#348eaa44",
        "autoattack-rand:random_start=false,step_size=0.5": "autoattack-rand#dc8c214b",
        "square:gradient=surrogate,checkpointing=true": "square#2fa1bdad",
    }
    for text, key in more.items():
        assert batch_key("m", parse_attack(text), 3, "v") == f"m@v|{key}|3", text


def test_a_registered_function_is_parsed_evaluated_and_recorded(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of .*'square'.*\\), got 'fgsm'"):
        parse_attack("fgsm:eps=0.1")
    register_fgsm()
    assert registered_attacks() == (*BUILT_IN, "fgsm") and "fgsm" in KINDS
    assert "fgsm" not in STEPPED_KINDS
    spec = parse_attack("fgsm:eps=0.3,steps=1,eot=5")
    assert (spec.kind, spec.label, spec.eot, spec.alpha) == ("fgsm", "fgsm", 1, 0.3)
    assert ATTACKS["fgsm"].description == "One signed-gradient step of spec.alpha (eps by default)."

    model = tiny_classifier()
    images, _ = structured_batch(8)
    with torch.no_grad():
        labels = model(images).argmax(1)  # every clean verdict right: the attack has room
    report = purifyguard.evaluate(model, (images, labels), ["fgsm:eps=0.3,steps=1"], n=8,
                                  batch_size=4, runs=1, progress=False, output_dir=tmp_path)
    (record,) = report["records"]
    attack = record["attack"]
    assert (attack["kind"], attack["name"], attack["step_size"], attack["eot"]) == (
        "fgsm", "fgsm", 0.3, 1)
    assert attack["gradient_mode"] == "full" and attack["n_queries"] is None
    assert attack["gradient_evaluations"] == 1 and attack["restarts"] is None
    assert attack["reduced"] is True  # 1 step, below the protocol's 200
    assert record["clean_accuracy"]["mean"] == 1.0
    assert record["robust_accuracy"]["mean"] < 1.0
    assert record["perturbation"]["within_eps"]
    assert record["perturbation"]["max"] == pytest.approx(0.3, abs=1e-6)
    validate_report(json.loads((tmp_path / "report.json").read_text()))


def test_a_registered_class_is_an_attack_spec_kind_with_its_own_rules():
    @register_attack("sign-shift")
    class SignShift(Attack):
        """A fixed perturbation: +eps on every pixel, one on_step per step."""

        default_step = 0.5
        stepped = True
        options = ("n_queries",)
        reference_steps = None

        def validate(self, spec):
            if spec.norm != "linf":
                raise ValueError("sign-shift is an linf attack")

        def run(self, spec, model, images, labels, *, seed, on_step, trace):
            for _ in range(spec.steps):
                on_step()
            return images + spec.eps

    assert "sign-shift" in STEPPED_KINDS
    spec = AttackSpec("sign-shift", eps=0.25, steps=3, eot=2, n_queries=7)
    assert spec.alpha == 0.125 and spec.gradient_evaluations == 6
    record = spec.to_dict()
    assert record["n_queries"] == 7 and record["kind"] == "sign-shift"
    assert record["reduced"] is True  # eot 2 < 20 (steps are not compared)
    assert AttackSpec("sign-shift", n_queries=5000).reduced is False
    with pytest.raises(ValueError, match="attack 'sign-shift': sign-shift is an linf attack"):
        parse_attack("sign-shift:norm=l2")
    with pytest.raises(ValueError, match="graft=True is an option of apgd-eot, not of"):
        AttackSpec("sign-shift", graft=True)

    steps = []
    images = torch.zeros(2, 1, 4, 4)
    adversarial = run_attack(spec, tiny_classifier(), images, torch.zeros(2, dtype=torch.long),
                             seed=0, on_step=lambda: steps.append(1))
    assert len(steps) == 3 and torch.equal(adversarial, images + 0.25)


def test_a_kind_registered_twice_is_refused():
    register_fgsm()
    with pytest.raises(ValueError, match="attack kind 'fgsm' is already registered"):
        register_fgsm()
    with pytest.raises(ValueError, match="attack kind 'pgd' is already registered"):
        register_attack("pgd")
    unregister_attack("fgsm")
    register_fgsm()  # replaced after unregistering
    with pytest.raises(ValueError, match="built in"):
        unregister_attack("pgd")
    with pytest.raises(ValueError, match="not registered"):
        unregister_attack("nothing")


@pytest.mark.parametrize("kind", ["", "pgd:x", "a,b", "a=b", "two words", " pgd", "-x", "a/b", 3])
def test_a_bad_kind_name_is_refused(kind):
    with pytest.raises(ValueError, match="an attack kind must be a str"):
        register_attack(kind)


def test_bad_registrations_are_refused_and_register_nothing():
    def run(spec, model, images, labels):
        return images

    with pytest.raises(ValueError, match="unknown attack property 'step'"):
        register_attack("toy", step=0.1)(run)
    with pytest.raises(ValueError, match="attack kind 'toy': default_step must be a number > 0"):
        register_attack("toy", default_step=0)(run)
    with pytest.raises(ValueError, match="access must be one of"):
        register_attack("toy", access="grey-box")(run)
    with pytest.raises(ValueError, match="each option must be one of"):
        register_attack("toy", options=("source_model",))(run)
    with pytest.raises(ValueError, match="must take \\(spec, model, images, labels\\)"):
        register_attack("toy")(lambda spec, model: spec)
    with pytest.raises(ValueError, match="decorates a function or an Attack subclass"):
        register_attack("toy")(int)
    assert registered_attacks() == BUILT_IN


def test_an_attack_that_leaves_its_ball_is_refused_not_counted():
    @register_attack("overshoot", default_step=1.0, uses_eot=False)
    def overshoot(spec, model, images, labels):
        return (images + 3 * spec.eps).clamp(0, 1)

    with pytest.raises(ValueError, match="'overshoot' attack returned images outside its linf "
                                         "ball of eps 0.1"):
        purifyguard.evaluate(tiny_classifier(), structured_batch(4), ["overshoot:eps=0.1,steps=1"],
                             n=4, runs=1, progress=False)


def test_an_attack_class_without_run_is_refused_when_registered():
    class Nothing(Attack):
        """Crafts nothing."""

    with pytest.raises(ValueError, match="'nothing': it crafts nothing: decorate a function"):
        register_attack("nothing")(Nothing)
    assert "nothing" not in registered_attacks()
