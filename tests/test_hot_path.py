"""The hot path changes no result: chunked purification equals unchunked, the batched EOT
gradient equals the sequential one, every float dtype works, and memory stays bounded for a
large batch (measured in a subprocess, not timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from purifyguard import PurifiedModel
from purifyguard.evaluation.pgd import eot_gradient

GUIDED = {"t_star": 6, "sampler": "ddim", "n_steps": 3, "eta": 0.5, "guidance": "adversarial",
          "guidance_scale": 2.0}


def grey_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(4, 10),
    ).eval()


@pytest.mark.parametrize("settings", [GUIDED, {"t_star": 4, "sampler": "ddpm"}])
def test_chunked_purification_equals_unchunked(make_purifier, settings):
    purifier = make_purifier(**settings)
    x = torch.rand(7, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    whole = purifier.purify(x, seed=3, chunk_size=100)
    chunked = purifier.purify(x, seed=3, chunk_size=2)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    assert purifier.purify(x, seed=4, chunk_size=2).sub(whole).abs().max() > 1e-3  # the control


def test_chunk_size_is_checked(make_purifier, images):
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        make_purifier().purify(images, chunk_size=0)


def test_the_batched_eot_gradient_equals_the_sequential_one():
    """On a deterministic model every EOT sample is the same pass, so batching the copies in
    chunks must give exactly the plain gradient."""
    model = grey_classifier()
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.arange(5)
    expected = torch.autograd.grad(
        F.cross_entropy(model(x.requires_grad_()), y, reduction="sum"), x)[0]
    for chunk_size in (None, 3, 15):
        batched = eot_gradient(model, x, y, eot=3, chunk_size=chunk_size)
        torch.testing.assert_close(batched, expected, atol=1e-6, rtol=1e-5)


def test_the_batched_eot_gradient_averages_independent_noise(make_purifier):
    """On the purifier, the eot copies get independent noise: their mean gradient differs from
    one pass's, and is the mean of the per-copy gradients."""
    model = PurifiedModel(grey_classifier(), make_purifier(**GUIDED))
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 2])
    torch.manual_seed(0)
    one = eot_gradient(model, x, y, eot=1)
    torch.manual_seed(0)
    four = eot_gradient(model, x, y, eot=4, chunk_size=3)
    assert torch.isfinite(four).all() and four.abs().sum() > 0
    assert not torch.allclose(one, four)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_every_float_dtype_purifies_classifies_and_differentiates(make_purifier, dtype):
    model = PurifiedModel(grey_classifier(), make_purifier(**GUIDED))
    x = torch.rand(3, 1, 28, 28).to(dtype).requires_grad_()
    logits = model(x)
    assert logits.dtype == dtype and torch.isfinite(logits.float()).all()
    (gradient,) = torch.autograd.grad(logits.float().sum(), x)
    assert gradient.dtype == dtype and torch.isfinite(gradient.float()).all()
    assert model.purify(x.detach(), seed=0).dtype == dtype


def test_a_bfloat16_purifier_purifies_float32_images(make_purifier, tmp_path):
    from purifyguard import Purifier

    make_purifier(**GUIDED).save_pretrained(tmp_path / "p", guidance_kwargs={"channels": [8, 16, 32, 64]})
    purifier = Purifier.from_pretrained(tmp_path / "p", torch_dtype=torch.bfloat16)
    assert purifier.unet.dtype == torch.bfloat16
    x = torch.rand(3, 1, 28, 28)
    purified = purifier.purify(x, seed=0)
    assert purified.dtype == torch.float32 and torch.isfinite(purified).all()
    reference = Purifier.from_pretrained(tmp_path / "p").purify(x, seed=0)
    assert (purified - reference).abs().mean() < 0.05  # bf16 arithmetic, same process


PEAK = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, "tests")
    from conftest import make_unet
    from purifyguard import Purifier
    torch.set_num_threads(1)

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    purifier = Purifier(make_unet(), t_star=2, sampler="ddim", n_steps=1)
    x = torch.rand(1024, 1, 28, 28)
    purifier.purify(x[:2])
    with open("/proc/self/clear_refs", "w") as handle:  # reset the peak (VmHWM) to VmRSS
        handle.write("5")
    before = status("VmRSS")
    purifier.purify(x, seed=0, chunk_size=int(sys.argv[1]))
    print(json.dumps({"growth_kib": status("VmHWM") - before}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="needs Linux's /proc/self/clear_refs to reset the peak memory counter")
def test_a_large_batch_stays_within_the_memory_of_its_chunks():
    def growth(chunk_size: int) -> int:
        result = subprocess.run([sys.executable, "-c", PEAK, str(chunk_size)], check=True,
                                capture_output=True, text=True, timeout=600)
        return json.loads(result.stdout.strip().splitlines()[-1])["growth_kib"]

    chunked, whole = growth(32), growth(1024)
    assert chunked < whole / 4, (chunked, whole)
