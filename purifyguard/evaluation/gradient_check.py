"""Does autograd's input gradient describe how the defended model's output really changes?

With the purification noise fixed (torch's global generator reseeded before every call, so
each call of a purifier draws the same noise and the defence becomes a deterministic function,
as DDIM with eta 0 and a fixed seed is), the directional derivative along a random direction d
can be measured by central finite differences, (f(x + h d) - f(x - h d)) / 2h, and compared
with autograd's <grad f(x), d>. f is a random linear functional of the logits (it never
saturates as a loss can). They agree for an honest model and disagree when part of the
computation hides from the backward pass:

- rounding / quantising the input or another non-differentiable step: autograd sees (almost)
  zero while the output moves;
- a detach of part of the purifier (the guidance term, say) or a substitute backward: autograd
  sees a gradient, but not the one that moves the output (low cosine or wrong size).

The point x is the image plus a small random jitter (JITTER), so that images already on a
quantisation grid (k / 255) do not sit where a rounding step happens to be flat.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from purifyguard.evaluation.arguments import check_model
from purifyguard.evaluation.seeds import derive_seed, seed_everything
from purifyguard.validation import check_images, check_int, check_number

GRADIENT_CHECK = "input gradient matches finite differences (noise fixed)"
STEP = 1e-3
DIRECTIONS = 4
JITTER = 0.01
MIN_COSINE = 0.9
MAX_RELATIVE_ERROR = 0.35
NEAR_ZERO_RATIO = 0.05  # autograd below this share of the finite differences counts as zero
_TINY = 1e-12


def gradient_check(
    model: nn.Module, images: torch.Tensor, *, seed: int = 0, directions: int = DIRECTIONS,
    step: float = STEP,
) -> dict[str, Any]:
    """The check as {"check", "passed", "message", "values"}: autograd against central finite
    differences of step `step` (L-inf, each pixel moves by +-step) along `directions` random
    sign directions per image, the noise fixed by `seed`. values: cosine, relative_error
    (|autograd - fd| / |fd|), magnitude_ratio (|autograd| / |fd|), deterministic."""
    check_model("model", model)
    images = check_images(images)
    seed = check_int("seed", seed)
    directions = check_int("directions", directions, 1)
    step = check_number("step", step, positive=True)
    if step >= 0.25:
        raise ValueError(f"step must be < 0.25 (a finite-difference step), got {step!r}")
    device = next((p.device for p in model.parameters()), images.device)
    generator = torch.Generator().manual_seed(derive_seed(seed, "gradient-check"))
    jitter = (torch.rand(images.shape, generator=generator) * 2 - 1) * JITTER
    x = (images.cpu() + jitter).clamp(step, 1 - step).to(device)
    noise_seed = derive_seed(seed, "gradient-check-noise")

    def functional(point: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        seed_everything(noise_seed)
        logits = model(point)
        return (logits * weights).sum(1) if weights is not None else logits

    with torch.no_grad():
        logits = functional(x)
        weights = torch.randn(logits.shape, generator=generator).to(device, logits.dtype)
        again = functional(x, weights)
    deterministic = bool(torch.allclose((logits * weights).sum(1), again, rtol=1e-5, atol=1e-6))
    point = x.clone().requires_grad_()
    with torch.enable_grad():
        gradient = torch.autograd.grad(functional(point, weights).sum(), point)[0]
    autograd, finite = [], []
    with torch.no_grad():
        for _ in range(directions):
            d = torch.randint(0, 2, images.shape, generator=generator).to(device, x.dtype) * 2 - 1
            autograd.append((gradient * d).flatten(1).sum(1))
            ahead, behind = functional(x + step * d, weights), functional(x - step * d, weights)
            finite.append((ahead - behind) / (2 * step))
    return _verdict(torch.stack(autograd).double(), torch.stack(finite).double(), deterministic,
                    step, directions)


def _verdict(autograd: torch.Tensor, finite: torch.Tensor, deterministic: bool, step: float,
             directions: int) -> dict[str, Any]:
    size_a, size_f = float(autograd.norm()), float(finite.norm())
    cosine = float((autograd * finite).sum()) / (size_a * size_f + _TINY)
    relative = float((autograd - finite).norm()) / (size_f + _TINY)
    ratio = size_a / (size_f + _TINY)
    values = {"cosine": cosine, "relative_error": relative, "magnitude_ratio": ratio,
              "deterministic": deterministic, "step": step, "directions": directions,
              "examples": autograd.shape[1]}
    setting = f"step {step:g}, {directions} directions x {autograd.shape[1]} images"
    if not deterministic:
        return _check(False, "the model answers differently with the noise seeded the same: its "
                      "randomness does not come from torch's global generator, so its gradient "
                      f"cannot be checked ({setting})", values)
    if size_f <= _TINY and size_a <= _TINY:
        return _check(False, "the output does not move under finite differences and the "
                      "gradient is zero: a flat (quantised or saturated) model leaves an "
                      f"attack no signal ({setting})", values)
    measured = f"cosine {cosine:.3f}, relative error {relative:.3f}, |autograd|/|fd| {ratio:.3f}"
    if cosine >= MIN_COSINE and relative <= MAX_RELATIVE_ERROR:
        return _check(True, f"autograd agrees with finite differences: {measured} ({setting})",
                      values)
    if ratio <= NEAR_ZERO_RATIO:
        reason = ("autograd's gradient is (almost) zero while the output moves: input rounding "
                  "/ quantisation or another non-differentiable step hides the gradient")
    else:
        reason = ("autograd's gradient is not the one that moves the output: part of the "
                  "computation is detached (e.g. the purifier's guidance term) or has a "
                  "substitute backward")
    return _check(False, f"{reason}; {measured} (must be >= {MIN_COSINE} and <= "
                  f"{MAX_RELATIVE_ERROR}; {setting})", values)


def _check(passed: bool, message: str, values: dict[str, Any]) -> dict[str, Any]:
    return {"check": GRADIENT_CHECK, "passed": bool(passed), "message": message,
            "values": values}
