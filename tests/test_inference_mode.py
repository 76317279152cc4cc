"""Outputs made without a graph are ordinary tensors, and inference mode would change no value.

The library runs its no-graph work under torch.no_grad(), not torch.inference_mode():
benchmarks/experiments/inference_mode.py found no consistent gain (docs/performance.md, "Inference mode"),
and inference tensors cannot be saved for backward, so a user who purifies without a graph and
then puts the result into one would hit an error. These tests keep that promise, and check that a
user who wraps an unguided purification or a classification in inference mode gets the same
values.
"""

from __future__ import annotations

import pytest
import torch

from purifyguard import PurifiedModel


def tiny_classifier(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, stride=2), torch.nn.Tanh(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 13 * 13, 10),
    ).eval()


def assert_usable_in_a_later_graph(output: torch.Tensor) -> None:
    """A graph that saves output for backward (the product with a weight needing a gradient)
    runs, and its gradient is the output itself."""
    assert not output.is_inference()
    weights = torch.ones_like(output, requires_grad=True)
    (output * weights).sum().backward()
    torch.testing.assert_close(weights.grad, output, rtol=0, atol=0)


@pytest.mark.parametrize("grad_mode", ["no_grad", "grad_enabled_but_nothing_requires_it"])
def test_a_purification_without_a_graph_can_enter_a_later_graph(make_purifier, images, grad_mode):
    purifier = make_purifier(t_star=20, sampler="ddim", n_steps=3, guidance="none")
    if grad_mode == "no_grad":
        with torch.no_grad():
            purified = purifier.purify(images, seed=0)
    else:
        purified = purifier.purify(images, seed=0)
    assert not purified.requires_grad
    assert_usable_in_a_later_graph(purified)


def test_classifying_and_the_defended_forward_without_a_graph_can_enter_a_later_graph(
    make_purifier, images,
):
    model = PurifiedModel(tiny_classifier(),
                          make_purifier(t_star=20, sampler="ddim", n_steps=3, guidance="none"))
    with torch.no_grad():
        logits = model.classify(images)
        defended = model(images)
    assert_usable_in_a_later_graph(logits)
    assert_usable_in_a_later_graph(defended)


@pytest.mark.parametrize("guidance", ["none", "pixel"])
def test_unguided_purification_in_inference_mode_equals_no_grad(make_purifier, images, guidance):
    """No guidance network, or one at scale 0: no step takes a gradient, so a user may wrap the
    call in inference mode and gets the very same images."""
    purifier = make_purifier(t_star=20, sampler="ddim", n_steps=3, guidance=guidance,
                             guidance_scale=0.0)
    with torch.no_grad():
        expected = purifier.purify(images, seed=0)
    with torch.inference_mode():
        purified = purifier.purify(images, seed=0)
    torch.testing.assert_close(purified, expected, rtol=0, atol=0)
    assert_usable_in_a_later_graph(purified.clone())  # a clone outside is an ordinary tensor


def test_classifying_in_inference_mode_equals_no_grad(images):
    model = PurifiedModel.undefended(tiny_classifier())
    with torch.no_grad():
        expected = model.classify(images)
    with torch.inference_mode():
        logits = model.classify(images)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_a_guided_purification_in_the_callers_inference_mode_runs_and_equals_no_grad(
        make_purifier, images):
    """Guided steps need autograd for their guidance gradient: purify leaves the caller's
    inference mode for the call instead of failing deep inside a step."""
    purifier = make_purifier(t_star=20, sampler="ddim", n_steps=3, guidance_scale=50.0)
    with torch.no_grad():
        expected = purifier.purify(images, seed=0)
    with torch.inference_mode():
        purified = purifier.purify(images, seed=0)
    torch.testing.assert_close(purified, expected, rtol=0, atol=0)
    assert_usable_in_a_later_graph(purified)
