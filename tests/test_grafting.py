"""Gradient grafting (purifyguard/evaluation/grafting.py): one backward pass through the
purification carries the gradients of all the EOT draws; the record says what it cost."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_evaluation import tiny_classifier

from purifyguard import PurifiedModel
from purifyguard.evaluation import AttackSpec, evaluate, parse_attack
from purifyguard.evaluation.apgd import apgd_eot
from purifyguard.evaluation.grafting import grafted_draws
from purifyguard.evaluation.pgd import eot_draws
from purifyguard.evaluation.report import validate_report


@pytest.fixture
def guided(make_purifier) -> PurifiedModel:
    """A tiny latent-guided purifier (full gradient, stochastic DDPM) before a tiny classifier."""
    purifier = make_purifier(t_star=20, sampler="ddpm", guidance_scale=50.0)
    return PurifiedModel(tiny_classifier(), purifier, mean=(0.5,), std=(0.5,))


def test_with_one_draw_the_grafted_gradient_is_the_full_gradient(guided, images):
    labels = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(7)
    expected = eot_draws(guided, images, labels, eot=1)
    torch.manual_seed(7)
    gradient, draws = grafted_draws(guided, images, labels, eot=1)
    assert expected.gradients.abs().sum() > 0
    torch.testing.assert_close(gradient, expected.gradients[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(draws.losses, expected.losses)
    assert torch.equal(draws.correct, expected.correct)


def test_the_draws_gradients_at_the_purified_images_ride_on_the_first_draws_backward(
        guided, images):
    """Reproduced by hand: the mean of the classifier's gradients at three purifications,
    pulled back through the graph of the first."""
    labels = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(3)
    point = images.clone().requires_grad_()
    first = guided.purify(point)
    with torch.no_grad():
        purified = [first.detach()] + [guided.purify(images) for _ in range(2)]
    at_outputs = []
    for image in purified:
        image = image.clone().requires_grad_()
        loss = F.cross_entropy(guided.classify(image), labels, reduction="sum")
        at_outputs.append(torch.autograd.grad(loss, image)[0])
    expected = torch.autograd.grad(first, point, grad_outputs=torch.stack(at_outputs).mean(0))[0]
    torch.manual_seed(3)
    gradient, draws = grafted_draws(guided, images, labels, eot=3)
    torch.testing.assert_close(gradient, expected, rtol=1e-4, atol=1e-7)
    assert draws.gradients.shape == (3, *images.shape)
    assert not torch.equal(draws.gradients[0], draws.gradients[1])  # three different draws


def test_graft_needs_a_purified_model_and_is_an_option_of_apgd_eot(images):
    bare = tiny_classifier()
    with pytest.raises(ValueError, match="graft=True needs a PurifiedModel"):
        apgd_eot(bare, images, torch.tensor([0, 1, 2, 3]), eps=0.1, steps=2, graft=True)
    averaging = PurifiedModel(bare, purifier=False, mean=(0.5,), std=(0.5,), n_samples=2)
    with pytest.raises(ValueError, match="n_samples=2"):
        apgd_eot(averaging, images, torch.tensor([0, 1, 2, 3]), eps=0.1, steps=2, graft=True)
    with pytest.raises(ValueError, match="graft=True is an option of apgd-eot, not of 'pgd'"):
        parse_attack("pgd:graft=true")
    with pytest.raises(ValueError, match="graft"):
        AttackSpec("apgd-eot", graft="yes")


def test_a_grafted_attack_records_its_cost_and_keeps_old_batch_keys(guided, images, tmp_path):
    labels = torch.tensor([0, 1, 2, 3])
    data = torch.utils.data.TensorDataset(images, labels)
    spec = "apgd-eot:eps=0.1,steps=3,eot=3,select_draws=1,graft=true"
    report = evaluate(guided, data, [spec], n=4, batch_size=4, runs=2, seed=0, progress=False,
                      output_dir=tmp_path)
    validate_report(report)
    attack = report["records"][0]["attack"]
    assert attack["graft"] is True
    assert attack["gradient_evaluations"] == 3  # one backward pass per iteration
    assert attack["crafting_forward_passes"] == 3 * 2
    assert report["records"][0]["convergence"]["gradient_evaluations"] == [1, 2, 3]
    plain = parse_attack("apgd-eot:eps=0.1,steps=3,eot=3")
    assert "graft" not in plain.identity()  # batches stored before grafting keep their keys
    assert plain.to_dict()["gradient_evaluations"] == 9
