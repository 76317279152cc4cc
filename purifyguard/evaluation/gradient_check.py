"""Does autograd's input gradient describe how the defended model's output really changes?

With the purification noise fixed (torch's global generator reseeded before every call, so
each call of a purifier draws the same noise and the defence becomes a deterministic function,
as DDIM with eta 0 and a fixed seed is), the directional derivative along a random direction d
can be measured by central finite differences, (f(x + h d) - f(x - h d)) / 2h, and compared
with autograd's <grad f(x), d>. f is a random linear functional of the logits (it never
saturates as a loss can). Everything runs in float64, on a float64 copy of the model (the
model itself is left as it is), so that rounding error plays no part at the steps used: the
finite differences are taken at every h of STEPS (1e-2, 1e-3, 1e-4) along the same directions.

The verdict (values["kind"]), in this order:

- "nondeterministic": the model answers differently with the noise seeded the same; nothing
  can be checked.
- "flat/quantised": autograd's gradient is (almost) zero (at most NEAR_ZERO_RATIO of the
  smallest finite difference over h, or exactly zero) while the output moves, or nothing moves
  at all: input rounding / quantisation or another non-differentiable step hides the gradient.
  (The smallest: a jumping output makes the finite differences at small h huge, and an exact
  but local gradient is not zero against all of them.)
- "shattered": the finite differences at the different h disagree with each other (the
  largest pairwise relative difference above MAX_FD_SPREAD, or the lowest pairwise cosine below
  MIN_FD_COSINE). The output is not smooth at those scales: it jumps, e.g. where a guidance
  step x - s * grad g(x) differentiates a ReLU network g (its input gradient is piecewise
  constant) and a large scale s turns every kink into a visible step. Autograd is exact within
  the piece the point lies in, but that gradient says little about where the output goes a
  step away; an attack wants a smooth substitute (SMOOTH_SUBSTITUTE).
- "detached": the finite differences agree with each other, autograd disagrees with them
  (cosine below MIN_COSINE or relative error above MAX_RELATIVE_ERROR): part of the
  computation is detached (the purifier's guidance term, say) or has a substitute backward.
- "fine": the finite differences agree with each other and autograd agrees with them.

Autograd is compared with the finite differences of the smallest h (the most accurate for a
smooth function; in float64 rounding is still negligible there).

The point x is the image plus a small random jitter (JITTER), so that images already on a
quantisation grid (k / 255) do not sit where a rounding step happens to be flat.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from purifyguard.evaluation.arguments import check_model
from purifyguard.evaluation.seeds import derive_seed, seed_everything
from purifyguard.validation import check_images, check_int, check_number

GRADIENT_CHECK = "input gradient matches finite differences (noise fixed)"
STEPS = (1e-2, 1e-3, 1e-4)  # the finite-difference steps h (L-inf: each pixel moves by +-h)
DIRECTIONS = 4
JITTER = 0.01
MIN_COSINE = 0.9  # autograd against the finite differences
MAX_RELATIVE_ERROR = 0.35
# finite differences at two h: |fd_1 - fd_2| / max(|fd_1|, |fd_2|). A plain ReLU classifier
# crosses kinks at h = 0.01 and measures up to about 0.4 here (the bundled ResNets: 0.19-0.38)
# with stable magnitudes; a shattered guidance step measures 1 and more, its signs flipping.
MAX_FD_SPREAD = 0.5
MIN_FD_COSINE = 0.9  # finite differences at two h: their cosine
NEAR_ZERO_RATIO = 0.05  # autograd below this share of the finite differences counts as zero
SMOOTH_SUBSTITUTE = "substitute=smooth"  # the apgd-eot / pgd option a shattered gradient wants
KINDS = ("fine", "shattered", "detached", "flat/quantised", "nondeterministic")
_TINY = 1e-12


def gradient_check(
    model: nn.Module, images: torch.Tensor, *, seed: int = 0, directions: int = DIRECTIONS,
    steps: Sequence[float] = STEPS,
) -> dict[str, Any]:
    """The check as {"check", "passed", "message", "values"}: autograd against central finite
    differences at each step h of `steps` (L-inf, each pixel moves by +-h) along `directions`
    random sign directions per image, in float64, the noise fixed by `seed`.

    values: kind (one of KINDS, see the module's docstring), cosine, relative_error
    (|autograd - fd| / |fd|) and magnitude_ratio (|autograd| / |fd|) against the finite
    differences of the smallest h (step), finite_differences (per h: the derivatives and the
    same three figures), finite_difference_spread and finite_difference_cosine (the worst pair
    of h), autograd (the derivatives), deterministic, steps, directions, examples, dtype.
    Arguments are checked first (ValueError naming the argument)."""
    check_model("model", model)
    images = check_images(images)
    seed = check_int("seed", seed)
    directions = check_int("directions", directions, 1)
    return run_gradient_check(model, images, seed=seed, directions=directions,
                              steps=_check_steps(steps))


def run_gradient_check(
    model: nn.Module, images: torch.Tensor, *, seed: int, directions: int = DIRECTIONS,
    steps: Sequence[float] = STEPS,
) -> dict[str, Any]:
    """gradient_check on arguments checked already (the sanity checks' path: the model is
    checked once, by their entry point)."""
    steps = tuple(sorted(steps, reverse=True))
    model = _float64_copy(model)
    device = next((p.device for p in model.parameters()), images.device)
    generator = torch.Generator().manual_seed(derive_seed(seed, "gradient-check"))
    jitter = (torch.rand(images.shape, generator=generator, dtype=torch.float64) * 2 - 1) * JITTER
    x = (images.detach().cpu().double() + jitter).clamp(steps[0], 1 - steps[0]).to(device)
    noise_seed = derive_seed(seed, "gradient-check-noise")

    def functional(point: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        seed_everything(noise_seed)
        logits = model(point).double()
        return (logits * weights).sum(1) if weights is not None else logits

    with torch.no_grad():
        logits = functional(x)
        weights = torch.randn(logits.shape, generator=generator, dtype=torch.float64).to(device)
        again = functional(x, weights)
    deterministic = bool(torch.allclose((logits * weights).sum(1), again, rtol=1e-7, atol=1e-9))
    point = x.clone().requires_grad_()
    with torch.enable_grad():
        gradient = torch.autograd.grad(functional(point, weights).sum(), point)[0]
    autograd: list[torch.Tensor] = []
    finite: dict[float, list[torch.Tensor]] = {h: [] for h in steps}
    with torch.no_grad():
        for _ in range(directions):
            d = torch.randint(0, 2, images.shape, generator=generator).to(device, x.dtype) * 2 - 1
            autograd.append((gradient * d).flatten(1).sum(1))
            for h in steps:
                ahead, behind = functional(x + h * d, weights), functional(x - h * d, weights)
                finite[h].append((ahead - behind) / (2 * h))
    return _verdict(torch.stack(autograd).cpu(),
                    {h: torch.stack(values).cpu() for h, values in finite.items()},
                    deterministic, directions)


def _check_steps(steps: Any) -> tuple[float, ...]:
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
        raise ValueError(f"steps must be a sequence of finite-difference steps, got {steps!r}")
    checked = tuple(check_number("each of steps", h, positive=True) for h in steps)
    if len(set(checked)) < 2:
        raise ValueError(f"steps must hold at least two different finite-difference steps (to "
                         f"tell a shattered gradient from a detached one), got {steps!r}")
    if max(checked) >= 0.25:
        raise ValueError(f"steps must be < 0.25 (finite-difference steps), got {steps!r}")
    return checked


def _float64_copy(model: nn.Module) -> nn.Module:
    """A float64 deep copy of the model; a purifier's compiled denoiser is not copied (the copy
    runs eagerly: a compiled graph is specialised to float32)."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        compiled = getattr(module, "_compiled", None)
        if isinstance(compiled, dict):
            memo[id(compiled)] = {}
    return copy.deepcopy(model, memo).to(torch.float64)


def _compare(estimate: torch.Tensor, reference: torch.Tensor) -> tuple[float, float, float]:
    """cosine, |estimate - reference| / |reference|, |estimate| / |reference|."""
    size_e, size_r = float(estimate.norm()), float(reference.norm())
    cosine = float((estimate * reference).sum()) / (size_e * size_r + _TINY)
    return (cosine, float((estimate - reference).norm()) / (size_r + _TINY),
            size_e / (size_r + _TINY))


def _fd_agreement(finite: dict[float, torch.Tensor]) -> tuple[float, float]:
    """The worst pair of h: the largest relative difference |fd_1 - fd_2| / max(|fd_1|, |fd_2|)
    and the lowest cosine (1 when both are zero)."""
    spread, lowest = 0.0, 1.0
    for first, second in itertools.combinations(finite.values(), 2):
        size = max(float(first.norm()), float(second.norm()))
        if size <= _TINY:
            continue
        spread = max(spread, float((first - second).norm()) / size)
        lowest = min(lowest, float((first * second).sum())
                     / (float(first.norm()) * float(second.norm()) + _TINY))
    return spread, lowest


def _verdict(autograd: torch.Tensor, finite: dict[float, torch.Tensor], deterministic: bool,
             directions: int) -> dict[str, Any]:
    steps = list(finite)
    step = min(steps)
    cosine, relative, ratio = _compare(autograd, finite[step])
    spread, fd_cosine = _fd_agreement(finite)
    size_a = float(autograd.norm())
    sizes = sorted(float(f.norm()) for f in finite.values())
    smallest_fd, largest_fd = sizes[0], sizes[-1]
    per_step = []
    for h, derivatives in finite.items():
        c, r, m = _compare(autograd, derivatives)
        per_step.append({"h": h, "cosine": c, "relative_error": r, "magnitude_ratio": m,
                         "derivatives": derivatives.tolist()})
    values = {"kind": None, "cosine": cosine, "relative_error": relative,
              "magnitude_ratio": ratio, "deterministic": deterministic, "step": step,
              "steps": steps, "directions": directions, "examples": autograd.shape[1],
              "finite_differences": per_step, "finite_difference_spread": spread,
              "finite_difference_cosine": fd_cosine, "autograd": autograd.tolist(),
              "dtype": "float64"}
    hs = ", ".join(f"{h:g}" for h in steps)
    setting = f"float64, h = {hs}, {directions} directions x {autograd.shape[1]} images"
    if not deterministic:
        return _check("nondeterministic", "the model answers differently with the noise seeded "
                      "the same: its randomness does not come from torch's global generator, so "
                      f"its gradient cannot be checked ({setting})", values)
    if largest_fd <= _TINY and size_a <= _TINY:
        return _check("flat/quantised", "the output does not move under finite differences and "
                      "the gradient is zero: a flat (quantised or saturated) model leaves an "
                      f"attack no signal ({setting})", values)
    sizes_at = (f"|autograd| {size_a:.3g}, |fd| " + ", ".join(
        f"{float(f.norm()):.3g} at h = {h:g}" for h, f in finite.items()))
    if size_a <= NEAR_ZERO_RATIO * smallest_fd or (size_a <= _TINY and largest_fd > _TINY):
        return _check("flat/quantised", "autograd's gradient is (almost) zero while the output "
                      "moves: input rounding / quantisation or another non-differentiable step "
                      f"hides the gradient; {sizes_at} (zero if at most {NEAR_ZERO_RATIO} of the "
                      f"smallest |fd|; {setting})", values)
    agreement = (f"finite differences between h: largest relative difference {spread:.3f}, "
                 f"lowest cosine {fd_cosine:.3f}")
    if spread > MAX_FD_SPREAD or fd_cosine < MIN_FD_COSINE:
        return _check("shattered", "the gradient is shattered: the finite differences at "
                      f"different h disagree with each other ({agreement}; they agree if <= "
                      f"{MAX_FD_SPREAD} and >= {MIN_FD_COSINE}; {sizes_at}), so the output is "
                      "not smooth at these scales (it jumps, e.g. where a guidance step "
                      "differentiates a ReLU network with a large scale) and autograd's exact "
                      "but local gradient does not say where it goes a step away; attack with "
                      f"the smooth substitute ({SMOOTH_SUBSTITUTE}, an option of apgd-eot and "
                      f"pgd, e.g. 'apgd-eot:{SMOOTH_SUBSTITUTE}') ({setting})", values)
    measured = (f"cosine {cosine:.3f}, relative error {relative:.3f}, |autograd|/|fd| "
                f"{ratio:.3f} at h = {step:g}")
    if cosine >= MIN_COSINE and relative <= MAX_RELATIVE_ERROR:
        return _check("fine", f"autograd agrees with finite differences: {measured}; "
                      f"{agreement} ({setting})", values)
    return _check("detached", "autograd's gradient is not the one that moves the output, while "
                  f"the finite differences agree with each other ({agreement}): part of the "
                  "computation is detached (e.g. the purifier's guidance term) or has a "
                  f"substitute backward; {measured} (must be >= {MIN_COSINE} and <= "
                  f"{MAX_RELATIVE_ERROR}; {setting})", values)


def _check(kind: str, message: str, values: dict[str, Any]) -> dict[str, Any]:
    values["kind"] = kind
    return {"check": GRADIENT_CHECK, "passed": kind == "fine", "message": message,
            "values": values}
