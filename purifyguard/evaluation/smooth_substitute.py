"""Smooth-substitute gradients (BPDA done right): run the real defence forward, differentiate a
smooth stand-in backward, both on the SAME purification noise.

Why: the guided purifier's guidance network is a ReLU ResNet with a max-pool stem, so its input
gradient is piecewise constant, and every guided reverse step moves x_t by the guidance scale
times that gradient. The purified model then jumps at input changes far below an attack's step:
autograd is exact, but a poor direction (shattered gradients, Athalye et al. 2018). The stand-in
is the same PurifiedModel whose guidance network has its piecewise-linear parts made smooth
(smooth_copy: ReLU -> softplus(beta x) / beta, or SiLU / GELU scaled the same way; max pooling
-> average or LogSumExp pooling); the denoiser, the sampler and the classifier stay exact.

    attacked = smooth_substitute(model)      # SmoothSubstituteModel(model, stand-in)
    logits = attacked(x)                     # the value of model(x), the gradient of the stand-in

The output is real(x) + (s - s.detach()) with s = substitute(x): exactly the real model's value,
with the stand-in's gradient. The purifier draws its noise from torch's global generators (CPU,
and the CUDA generator of the images' device) unless it has fixed_noise (a seeded generator of
its own, the same on every call): the wrapper saves the generators' states before the real
forward, restores them before the stand-in's and leaves them where the real forward left them,
so both see the same noise and the stream after a call is that of a plain call of the real model.

Only modules are replaced: a network that calls F.relu or F.max_pool2d in its forward keeps
those (smooth_copy leaves them as they are); pass a stand-in guidance network of your own then.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from purifyguard.validation import check_choice, check_images, check_int, check_number

logger = logging.getLogger(__name__)

ACTIVATIONS = ("softplus", "silu", "gelu")
POOLS = ("avg", "lse")
DEFAULT_BETA = 10.0
DEFAULT_POOL = "lse"  # tends to max pooling as beta grows; "avg" does not (measured)
# The spec's names: "smooth" is the default stand-in (softplus).
SUBSTITUTES = ("smooth", *ACTIVATIONS)
_RELUS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU)


# --- the smooth layers -------------------------------------------------------------------------


class SmoothActivation(nn.Module):
    """f(beta x) / beta for f = softplus, SiLU or GELU: smooth, and ReLU in the limit beta -> inf
    (beta = 1: the plain SiLU / GELU). ReLU6 and LeakyReLU(a) are smoothed through it:
    g(x) - g(x - 6) and a x + (1 - a) g(x)."""

    def __init__(self, activation: str = "softplus", beta: float = DEFAULT_BETA,
                 kind: str = "relu", slope: float = 0.0) -> None:
        super().__init__()
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        self.beta = check_number("beta", beta, positive=True)
        self.kind, self.slope = kind, float(slope)

    def smooth_relu(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "softplus":
            return F.softplus(x, beta=self.beta)
        f = F.silu if self.activation == "silu" else F.gelu
        return f(self.beta * x) / self.beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "relu6":
            return self.smooth_relu(x) - self.smooth_relu(x - 6)
        if self.kind == "leaky":
            return self.slope * x + (1 - self.slope) * self.smooth_relu(x)
        return self.smooth_relu(x)

    def extra_repr(self) -> str:
        return f"{self.activation}, beta={self.beta:g}, replaces={self.kind}"


class LogSumExpPool2d(nn.Module):
    """The smooth maximum of each window, (1 / beta) log(mean exp(beta x)): the mean as beta -> 0,
    the max as beta -> inf. Same windows as the MaxPool2d it replaces (padding never wins)."""

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0,
                 dilation: Any = 1, ceil_mode: bool = False, beta: float = DEFAULT_BETA) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride if stride is not None else kernel_size)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.ceil_mode = bool(ceil_mode)
        self.beta = check_number("beta", beta, positive=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        sizes = [_pool_size(size, k, s, p, d, self.ceil_mode) for size, k, s, p, d in zip(
            (h, w), self.kernel_size, self.stride, self.padding, self.dilation)]
        # Pad with -inf (left/top: padding; right/bottom: what the windows reach, ceil_mode).
        reach = [(out - 1) * s + d * (k - 1) + 1 for out, s, d, k in zip(
            sizes, self.stride, self.dilation, self.kernel_size)]
        extra = [max(0, r - (size + 2 * p)) for r, size, p in zip(reach, (h, w), self.padding)]
        pads = (self.padding[1], self.padding[1] + extra[1], self.padding[0], self.padding[0] + extra[0])
        padded = F.pad(self.beta * x, pads, value=-math.inf)
        windows = F.unfold(padded, self.kernel_size, dilation=self.dilation, stride=self.stride)
        windows = windows.view(n, c, -1, windows.shape[-1])[..., : sizes[0] * sizes[1]]
        ones = F.pad(torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device), pads)
        count = F.unfold(ones, self.kernel_size, dilation=self.dilation, stride=self.stride).sum(1)
        pooled = (windows.logsumexp(2) - count.log()) / self.beta
        return pooled.view(n, c, sizes[0], sizes[1])

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"beta={self.beta:g}")


def smooth_copy(network: nn.Module, activation: str = "softplus", beta: float = DEFAULT_BETA,
                pool: str = DEFAULT_POOL) -> nn.Module:
    """A deep copy of `network` with its ReLU-family modules (nn.ReLU, as timm's ResNets use,
    nn.ReLU6, nn.LeakyReLU) replaced by SmoothActivation(activation, beta) and its nn.MaxPool2d
    by LogSumExpPool2d(beta) (pool="lse", the default: the copy tends to the network as beta
    grows) or nn.AvgPool2d (pool="avg", same windows, padding not counted); nn.AdaptiveMaxPool2d becomes nn.AdaptiveAvgPool2d (either pool). `network`
    is left unchanged; the copy is frozen and in eval mode like it, on its device and dtype."""
    check_choice("activation", activation, ACTIVATIONS)
    beta = check_number("beta", beta, positive=True)
    check_choice("pool", pool, POOLS)
    if not isinstance(network, nn.Module):
        raise ValueError(f"network must be an nn.Module, got {type(network).__name__}")
    smooth = copy.deepcopy(network)
    for name, module in list(smooth.named_modules()):
        replacement = _smooth_module(module, activation, beta, pool)
        if replacement is not None:
            if name == "":
                return replacement
            smooth.set_submodule(name, replacement)
    return smooth.requires_grad_(False).train(network.training)


def _smooth_module(module: nn.Module, activation: str, beta: float,
                   pool: str) -> nn.Module | None:
    if isinstance(module, nn.ReLU6):
        return SmoothActivation(activation, beta, "relu6")
    if isinstance(module, nn.LeakyReLU):
        return SmoothActivation(activation, beta, "leaky", module.negative_slope)
    if isinstance(module, nn.ReLU):
        return SmoothActivation(activation, beta)
    if isinstance(module, nn.MaxPool2d):
        if module.return_indices:
            raise ValueError("smooth_copy cannot replace a MaxPool2d that returns its indices")
        if pool == "lse":
            return LogSumExpPool2d(module.kernel_size, module.stride, module.padding,
                                   module.dilation, module.ceil_mode, beta)
        if _pair(module.dilation) != (1, 1):
            raise ValueError("pool='avg' cannot replace a dilated MaxPool2d; use pool='lse'")
        return nn.AvgPool2d(module.kernel_size, module.stride, module.padding,
                            ceil_mode=module.ceil_mode, count_include_pad=False)
    if isinstance(module, nn.AdaptiveMaxPool2d):
        if module.return_indices:
            raise ValueError("smooth_copy cannot replace an AdaptiveMaxPool2d that returns "
                             "its indices")
        return nn.AdaptiveAvgPool2d(module.output_size)
    return None


def piecewise_linear_modules(network: nn.Module) -> list[str]:
    """Names of the modules smooth_copy would replace (ReLU family, max pooling)."""
    kinds = (*_RELUS, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
    return [name or "<root>" for name, m in network.named_modules() if isinstance(m, kinds)]


# --- the straight-through model ----------------------------------------------------------------


class SmoothSubstituteModel(nn.Module):
    """The real model's output with the substitute's gradient, both on the same noise.

    forward(x) = real(x) + (s - s.detach()), s = substitute(x): the value is exactly real(x)'s;
    the input gradient is the substitute's. Without a graph to build (no grad, or x not requiring
    grad) only the real model runs. purify / classify (for graft=True) do the same at the purified
    images, when the real model is a PurifiedModel. substitute None: nothing to smooth, the model
    is the real one (plain gradient); `description` says so.

    While it runs it keeps, in `logit_distance`, the L-inf distance between the real and the
    substitute logits of every image it differentiated (count, mean, max): how far the stand-in's
    forward strayed along the attack's path.
    """

    def __init__(self, real: nn.Module, substitute: nn.Module | None,
                 description: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(real, nn.Module):
            raise ValueError(f"real must be an nn.Module, got {type(real).__name__}")
        if substitute is not None and not isinstance(substitute, nn.Module):
            raise ValueError(f"substitute must be an nn.Module or None, got "
                             f"{type(substitute).__name__}")
        self.real = real
        self.substitute = substitute
        self.description = dict(description or {})
        self.logit_distance = {"count": 0, "mean": 0.0, "max": 0.0}
        self.batch_distance: dict[str, Any] | None = None

    @property
    def plain(self) -> bool:
        """True when there is no stand-in: the attack differentiates the real model."""
        return self.substitute is None or self.substitute is self.real

    @property
    def n_samples(self) -> int:
        return getattr(self.real, "n_samples", 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        real_out, substitute_out = self._both(self.real, self.substitute, x)
        if substitute_out is None:
            return real_out
        self._note(real_out, substitute_out)
        return real_out + (substitute_out - substitute_out.detach())

    @property
    def purify(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The real purification's value with the substitute's gradient (PurifiedModel only)."""
        real, substitute = self.real, self.substitute
        if not callable(getattr(real, "purify", None)):
            raise AttributeError(f"the real model {type(real).__name__} has no purify")
        if substitute is not None and not callable(getattr(substitute, "purify", None)):
            raise AttributeError(f"the substitute {type(substitute).__name__} has no purify")

        def purify(x: torch.Tensor) -> torch.Tensor:
            real_out, substitute_out = self._both(
                real.purify, None if self.plain else substitute.purify, x)
            if substitute_out is None:
                return real_out
            return real_out + (substitute_out - substitute_out.detach())

        return purify

    @property
    def classify(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The real classifier (it is not replaced)."""
        if not callable(getattr(self.real, "classify", None)):
            raise AttributeError(f"the real model {type(self.real).__name__} has no classify")
        return self.real.classify

    def _both(self, real: Callable, substitute: Callable | None,
              x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(real(x) without a graph, substitute(x) with one) on the same noise; the real value
        alone (with its own graph, if any) when there is nothing to differentiate."""
        if substitute is None or self.plain or not (torch.is_grad_enabled() and x.requires_grad):
            return real(x), None
        with shared_noise(x.device) as replay:
            with torch.no_grad():
                real_out = real(x)
            replay()
            substitute_out = substitute(x)
        return real_out, substitute_out

    @torch.no_grad()
    def _note(self, real_out: torch.Tensor, substitute_out: torch.Tensor) -> None:
        distance = (real_out - substitute_out).flatten(1).abs().amax(1).float()
        stats = self.logit_distance
        count = stats["count"] + len(distance)
        stats["mean"] += (float(distance.sum()) - stats["mean"] * len(distance)) / count
        stats["max"] = max(stats["max"], float(distance.max()))
        stats["count"] = count

    def measure(self, images: torch.Tensor, seed: int) -> dict[str, Any] | None:
        """forward_distance of the substitute on `images` (noise from `seed`), kept as
        batch_distance and logged; None for a plain model. Starts a new batch: logit_distance
        starts again from nothing."""
        self.batch_distance = None
        self.logit_distance = {"count": 0, "mean": 0.0, "max": 0.0}
        if self.plain:
            return None
        self.batch_distance = forward_distance(self.real, self.substitute, images, seed)
        logger.info("smooth substitute (%s): forward distance on %d images: %s",
                    describe(self.description), len(images), self.batch_distance)
        return self.batch_distance

    def record(self) -> dict[str, Any]:
        """What an attack record should say: the substitute, its forward distance on the last
        measured batch, and the logit distance along the attack's path."""
        return {**self.description, "forward_distance": self.batch_distance,
                "logit_distance_during_attack": dict(self.logit_distance)}


@contextmanager
def shared_noise(device: torch.device | str) -> Iterator[Callable[[], None]]:
    """Within the block, replay() puts torch's generators (CPU, and `device`'s if it is an
    accelerator) back to their state at the start; on leaving, they are left where they were at
    the last replay() (where the first pass left them): so a second pass after replay() draws
    the first one's noise, and the stream afterwards is that of one pass."""
    device = torch.device(device)
    accelerator = _accelerator(device)
    start = _rng_state(accelerator, device)
    after: list[tuple] = []

    def replay() -> None:
        after.append(_rng_state(accelerator, device))
        _set_rng_state(accelerator, device, start)

    try:
        yield replay
    finally:
        if after:
            _set_rng_state(accelerator, device, after[-1])


def _accelerator(device: torch.device) -> Any:
    if device.type == "cpu":
        return None
    module = getattr(torch, device.type, None)
    if module is None or not callable(getattr(module, "get_rng_state", None)):
        raise ValueError(f"cannot share the purification noise on a {device.type} device: torch "
                         f"has no get_rng_state for it")
    return module


def _rng_state(accelerator: Any, device: torch.device) -> tuple:
    index = device if device.index is not None else None
    own = None
    if accelerator is not None:
        own = accelerator.get_rng_state(index) if index is not None else accelerator.get_rng_state()
    return torch.get_rng_state(), own


def _set_rng_state(accelerator: Any, device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if accelerator is not None:
        if device.index is not None:
            accelerator.set_rng_state(state[1], device)
        else:
            accelerator.set_rng_state(state[1])


# --- building the stand-in ---------------------------------------------------------------------


def smooth_substitute(
    model: nn.Module, activation: str = "softplus", beta: float = DEFAULT_BETA,
    pool: str = DEFAULT_POOL, *, guidance_network: nn.Module | None = None,
    substitute: nn.Module | None = None,
) -> SmoothSubstituteModel:
    """The attacked model for smooth-substitute gradients: SmoothSubstituteModel(model, stand-in).

    The stand-in, in order: `substitute` (a whole model, e.g. a PurifiedModel of your own);
    `model` with its purifier's guidance network replaced by `guidance_network`; `model` with
    that network replaced by smooth_copy(network, activation, beta, pool). A model without a
    guidance network at work (a bare classifier, an unguided or pixel-guided purifier, guidance
    scale 0) has nothing to smooth: the stand-in is the model itself and the attack is plain
    (description["substitute"] says so).
    """
    check_choice("activation", activation, ACTIVATIONS)
    beta = check_number("beta", beta, positive=True)
    check_choice("pool", pool, POOLS)
    if substitute is not None:
        if not isinstance(substitute, nn.Module):
            raise ValueError(f"substitute must be an nn.Module, got {type(substitute).__name__}")
        return SmoothSubstituteModel(model, substitute, {
            "substitute": f"given model ({type(substitute).__name__})"})
    purifier = getattr(model, "purifier", None)
    network = _guidance_network(purifier)
    if network is None:
        reason = ("none: the model has no purifier" if purifier is None else
                  "none: the purifier has no guidance network at work")
        return SmoothSubstituteModel(model, None, {
            "substitute": reason + ", so the attack is plain (the real gradient)"})
    if not hasattr(model, "with_purifier"):
        raise ValueError(f"a smooth substitute needs a PurifiedModel (with_purifier), got "
                         f"{type(model).__name__}")
    if guidance_network is not None:
        if not isinstance(guidance_network, nn.Module):
            raise ValueError(f"guidance_network must be an nn.Module, got "
                             f"{type(guidance_network).__name__}")
        stand_in = guidance_network
        description = {"substitute": f"given guidance network "
                                     f"({type(guidance_network).__name__})"}
    else:
        stand_in = smooth_copy(network, activation, beta, pool)
        description = {"substitute": "smooth copy of the guidance network",
                       "activation": activation, "beta": beta, "pool": pool,
                       "replaced": len(piecewise_linear_modules(network))}
    return SmoothSubstituteModel(model, model.with_purifier(_with_network(purifier, stand_in)),
                                 description)


def _guidance_network(purifier: nn.Module | None) -> nn.Module | None:
    """The purifier's guidance network if its guidance uses one and is on; None otherwise."""
    if purifier is None:
        return None
    guidance = getattr(purifier, "guidance", None)
    network = getattr(guidance, "network", None)
    guided = getattr(purifier, "_guided", None)
    if network is None or (callable(guided) and not guided()):
        return None
    return network


def _with_network(purifier: nn.Module, network: nn.Module) -> nn.Module:
    """A purifier sharing `purifier`'s denoiser, schedule and settings, with another guidance
    network (as Purifier.with_settings shares its networks)."""
    clone = type(purifier)(purifier.unet, purifier.schedule.scheduler_config, network,
                           purifier.current_config())
    clone._compiled = purifier._compiled
    return clone


def substitute_record(model: nn.Module) -> dict[str, Any] | None:
    """What a batch record should hold about the substitute of an attacked model (None when it
    is not a SmoothSubstituteModel): its description, the forward distance measured on the
    batch and the logit distance along the attack's path (SmoothSubstituteModel.record)."""
    return model.record() if isinstance(model, SmoothSubstituteModel) else None


def describe(description: dict[str, Any]) -> str:
    """One line for a substitute's description."""
    if "activation" in description:
        return (f"{description['activation']}, beta={description['beta']!r}, "
                f"{description['pool']} pool")
    return str(description.get("substitute", "none"))


# --- how far the stand-in's forward is from the real one ---------------------------------------


@torch.no_grad()
def forward_distance(real: nn.Module, substitute: nn.Module, images: torch.Tensor,
                     seed: int = 0) -> dict[str, Any]:
    """How far the substitute's forward is from the real one on `images`, both purifying with the
    noise of `seed` (torch's generators seeded before each; a fixed_noise purifier uses its own
    seed). Per image: the L-inf and L2 distance of the purified images (when both models have
    purify) and the L-inf distance of the logits; returned as mean and max over the images,
    with the share of images whose predicted class agrees. torch's generators are left as
    they were."""
    images = check_images(images)
    check_int("seed", seed)
    devices = [images.device] if images.device.type == "cuda" else []
    result: dict[str, Any] = {"n": len(images), "seed": seed}
    # A PurifiedModel's logits are classify(purify(x)) (one purification per image): one
    # purification each then gives both; anything else is called for its logits.
    split = all(callable(getattr(m, name, None)) and getattr(m, "n_samples", 1) == 1
                for m in (real, substitute) for name in ("purify", "classify"))
    outputs = {}
    with torch.random.fork_rng(devices=devices):
        for which, model in (("real", real), ("substitute", substitute)):
            torch.manual_seed(seed)
            if split:
                purified = model.purify(images)
                outputs["purified", which] = purified.double()
                outputs["logits", which] = model.classify(purified).double()
            else:
                outputs["logits", which] = model(images).double()
    if split:
        difference = (outputs["purified", "real"] - outputs["purified", "substitute"]).flatten(1)
        _summarise(result, "purified_linf", difference.abs().amax(1))
        _summarise(result, "purified_l2", difference.norm(dim=1))
    logits = outputs["logits", "real"], outputs["logits", "substitute"]
    _summarise(result, "logits_linf", (logits[0] - logits[1]).flatten(1).abs().amax(1))
    result["agreement"] = float((logits[0].argmax(-1) == logits[1].argmax(-1)).double().mean())
    return result


def _summarise(result: dict[str, Any], name: str, values: torch.Tensor) -> None:
    result[f"{name}_mean"] = float(values.mean())
    result[f"{name}_max"] = float(values.max())


def _pair(value: Any) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value), int(value))


def _pool_size(size: int, kernel: int, stride: int, padding: int, dilation: int,
               ceil_mode: bool) -> int:
    """The output size of a pooling window, as PyTorch computes it."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out
