"""Purifier.compile_denoiser(): opt-in, the same purification as eager to float tolerance, the
full-gradient path with latent guidance kept eager, and an eager fallback when compiling fails."""

from __future__ import annotations

import shutil

import pytest
import torch

GUIDED = {"t_star": 6, "sampler": "ddim", "n_steps": 2, "guidance": "adversarial",
          "guidance_scale": 2.0}


def test_a_failing_compiler_warns_once_and_falls_back_to_eager(make_purifier, images, monkeypatch):
    calls = []

    def broken_compile(module, **options):
        def compiled(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("no C++ compiler found\nmore detail")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = make_purifier(**GUIDED)
    compiled = eager.with_settings().compile_denoiser()
    with pytest.warns(RuntimeWarning, match="compiled denoiser failed .RuntimeError: no C\\+\\+ "
                                            "compiler found.; using the eager denoiser"):
        purified = compiled.purify(images, seed=0)
    assert len(calls) == 1  # not tried again at the next step
    assert torch.equal(purified, eager.purify(images, seed=0))


def test_compiling_adds_nothing_to_the_saved_state(make_purifier, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **options: module)
    purifier = make_purifier(**GUIDED)
    keys = set(purifier.state_dict())
    assert set(purifier.compile_denoiser().state_dict()) == keys


def test_the_full_gradient_of_latent_guidance_stays_eager(make_purifier, images, monkeypatch):
    used = []

    def recording_compile(module, **options):
        def compiled(*args, **kwargs):
            used.append(torch.is_grad_enabled())
            return module(*args, **kwargs)
        return compiled

    monkeypatch.setattr(torch, "compile", recording_compile)
    purifier = make_purifier(**GUIDED).compile_denoiser()
    x = images.clone().requires_grad_()
    purifier(x).sum().backward()  # needs the double backward: eager only
    assert used == [] and x.grad.abs().sum() > 0
    purifier.purify(images, seed=0)  # no graph: compiled
    assert len(used) == GUIDED["n_steps"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_the_compiled_denoiser_purifies_as_eager_does(make_purifier, images):
    torch._dynamo.reset()
    eager = make_purifier(**GUIDED)
    compiled = eager.with_settings().compile_denoiser()
    torch.testing.assert_close(compiled.purify(images, seed=0), eager.purify(images, seed=0),
                               atol=1e-4, rtol=0)
