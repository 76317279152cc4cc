"""The diffusion purifier: noise the input to level t*, then denoise it with guidance."""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from purifyguard.config import PurifierConfig
from purifyguard.guidance import build_guidance
from purifyguard.hub import PurifierHubMixin
from purifyguard.samplers import get_sampler
from purifyguard.schedule import NoiseSchedule
from purifyguard.validation import check_images, check_int

# Input values per denoiser call when purifying without a graph (see Purifier.default_chunk_size).
CHUNK_ELEMENTS = 2**17


class Purifier(PurifierHubMixin, nn.Module):
    """Diffusion purification with optional guidance (docs/method.md, sections 1-3).

    purify(x): x in [0, 1], shape (N, C, H, W) at the denoiser's resolution -> purified x in [0, 1].
    The denoiser is any diffusers UNet2DModel predicting epsilon; the schedule comes from a
    diffusers DDPM scheduler config. The denoiser and the guidance network are frozen: the
    purifier never trains them, and an attacker's backward reaches them only through the input.
    """

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler_config: dict[str, Any] | DDPMScheduler | None = None,
        guidance_network: nn.Module | None = None,
        config: PurifierConfig | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        if not isinstance(unet, UNet2DModel):
            raise ValueError(f"unet must be a diffusers UNet2DModel, got {type(unet).__name__}")
        if guidance_network is not None and not isinstance(guidance_network, nn.Module):
            raise ValueError(
                f"guidance_network must be an nn.Module or None, got {type(guidance_network).__name__}"
            )
        if config is not None and not isinstance(config, PurifierConfig):
            raise ValueError(f"config must be a PurifierConfig or None, got {type(config).__name__}")
        if config is not None:
            _check_config_fits(config, unet)
        self.unet = unet.requires_grad_(False)
        self.schedule = NoiseSchedule(scheduler_config)
        if guidance_network is not None:
            guidance_network.requires_grad_(False)
        self.guidance_network = guidance_network
        config = (config or PurifierConfig()).replace(
            resolution=_sample_size(unet), channels=unet.config.in_channels, **settings
        )
        config.validate(self.schedule.num_train_timesteps)
        self.config = config
        self.guidance = build_guidance(config, guidance_network)
        self.guidance_scale = nn.Parameter(
            torch.tensor(float(config.guidance_scale)), requires_grad=False
        )
        self.last_nfe = 0
        # The compiled denoiser, if compile_denoiser() was called; kept out of the module tree
        # so that it adds nothing to state_dict() or save_pretrained().
        self._compiled: dict[str, Any] = {}
        self.eval()

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def channels(self) -> int:
        return self.config.channels

    def with_settings(self, **changes: Any) -> Purifier:
        """A purifier sharing this one's networks (compiled or not), with some settings changed."""
        return self._sharing_denoiser(self.guidance_network, changes)

    def with_guidance_network(self, guidance_network: nn.Module, **changes: Any) -> Purifier:
        """A purifier sharing this one's denoiser and settings, guided by another network (a
        guidance network you trained yourself, e.g. a smoother TRADES network); `changes` as in
        with_settings (a new network usually wants its own guidance_scale)."""
        if not isinstance(guidance_network, nn.Module):
            raise ValueError(f"guidance_network must be an nn.Module, got "
                             f"{type(guidance_network).__name__}")
        return self._sharing_denoiser(guidance_network, changes)

    def with_denoiser(self, unet: UNet2DModel, **changes: Any) -> Purifier:
        """A purifier with another denoiser (a longer-trained one, e.g. from `purifyguard train
        diffusion --init-from`) and this one's noise schedule, guidance network and settings;
        `changes` as in with_settings. The denoiser must read this purifier's resolution and
        channels (ValueError otherwise) and have been trained on its noise schedule."""
        if not isinstance(unet, UNet2DModel):
            raise ValueError(f"unet must be a diffusers UNet2DModel, got {type(unet).__name__}")
        return Purifier(unet, self.schedule.scheduler_config, self.guidance_network,
                        self.current_config().replace(**changes))

    def _sharing_denoiser(self, guidance_network: nn.Module | None,
                          changes: dict[str, Any]) -> Purifier:
        """This purifier's denoiser (compiled or not) and settings, with `changes` and the given
        guidance network."""
        settings = self.current_config().replace(**changes)
        purifier = Purifier(self.unet, self.schedule.scheduler_config, guidance_network, settings)
        purifier._compiled = self._compiled
        return purifier

    def compile_denoiser(self, **compile_options: Any) -> Purifier:
        """Run the denoiser through torch.compile where no double backward is needed (opt-in).

        Purification without a graph, guided or not, and attacks on unguided or pixel-guided
        purifiers use the compiled denoiser; the full-gradient path of latent guidance on x0_hat
        differentiates the guidance gradient itself (a double backward), which compiled graphs
        do not support, so it stays eager. The first calls compile (a C++ compiler is needed on
        a CPU; expect a minute or more) and every new batch shape may compile again. If
        compiling fails, a warning says why and the eager denoiser is used from then on.
        compile_options go to torch.compile (e.g. mode="max-autotune"); a backend that this torch
        does not have (torch._dynamo.list_backends()) or options torch.compile refuses give the
        same warning at once, and the eager denoiser. An option torch.compile does not take is a
        ValueError. Returns self."""
        backend = compile_options.get("backend", "inductor")
        known = _compile_backends()
        if isinstance(backend, str) and known is not None and backend not in known:
            return self._eager_denoiser(
                f"backend={backend!r} is not a torch.compile backend of this torch "
                f"{torch.__version__} (torch._dynamo.list_backends(): {sorted(known)})")
        if not isinstance(backend, str) and not callable(backend):
            raise ValueError(f"compile_denoiser: backend must be a backend name or a callable, "
                             f"got {backend!r}")
        try:
            compiled = torch.compile(self.unet, **compile_options)
        except TypeError as error:
            raise ValueError(f"compile_denoiser: torch.compile refuses the options "
                             f"{compile_options}: {error}") from None
        except Exception as error:  # noqa: BLE001 (as a failure at the first call: fall back)
            return self._eager_denoiser(
                f"torch.compile(**{compile_options}) fails ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''})")
        self._compiled["denoiser"] = compiled
        return self

    def _eager_denoiser(self, reason: str) -> Purifier:
        """compile_denoiser's fallback: warn why, and keep (or go back to) the eager denoiser."""
        self._compiled.pop("denoiser", None)
        warnings.warn(f"compile_denoiser: {reason}; using the eager denoiser", RuntimeWarning,
                      stacklevel=3)
        return self

    def current_config(self) -> PurifierConfig:
        """The config with the guidance scale as it is now (it may have been fine-tuned)."""
        return self.config.replace(guidance_scale=float(self.guidance_scale.detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.purify(x)

    def purify(
        self, x: torch.Tensor, *, generator: torch.Generator | None = None,
        seed: int | None = None, chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Purify images in [0, 1]; a seed or generator makes the noise reproducible.

        Images of any floating dtype are accepted and returned in that dtype; the sampler runs in
        float32 (float64 for float64 images) and each network in its own dtype. Without a graph
        (no gradient wanted) the denoiser and guidance calls of each step run on chunks of
        chunk_size images (default: default_chunk_size()), so memory stays bounded for any batch,
        and the noise, drawn for the whole batch, is the same as unchunked.
        """
        x = self._check_input(x)
        chunk_size = self.default_chunk_size() if chunk_size is None else check_int(
            "chunk_size", chunk_size, minimum=1)
        config = self.config
        self.last_nfe = 0
        if config.t_star == 0:
            return x
        generator = self._generator(x, generator, seed)
        dtype = x.dtype
        x = x.to(torch.float64 if dtype == torch.float64 else torch.float32)
        builds_graph = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if not builds_graph:
            # A caller's torch.inference_mode() would forbid the autograd that each guided step
            # takes its guidance gradient with: leave it for this call, on an ordinary copy.
            with torch.inference_mode(False), torch.no_grad():
                x = x.clone() if x.is_inference() else x
                return self._reverse_process(x, config, generator, chunk_size).to(dtype)
        if config.gradient_mode == "full":
            return self._reverse_process(x, config, generator, graph=True).to(dtype)
        with torch.no_grad():
            purified = self._reverse_process(x, config, generator, chunk_size)
        if config.gradient_mode == "bpda":
            # Backward Pass Differentiable Approximation: forward purifies, backward is identity.
            return (x + (purified - x).detach()).to(dtype)
        surrogate_config = config.replace(
            sampler=config.surrogate_sampler, n_steps=config.surrogate_steps
        )
        surrogate = self._reverse_process(x, surrogate_config, generator, graph=True)
        # The value of the defended process with the gradient of the cheaper one.
        return (purified + (surrogate - surrogate.detach())).to(dtype)

    def default_chunk_size(self) -> int:
        """Images per denoiser call when no graph is kept: CHUNK_ELEMENTS input values, e.g.
        167 images of 1x28x28 or 42 of 3x32x32."""
        return max(1, CHUNK_ELEMENTS // (self.channels * self.resolution**2))

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        x = check_images(x)
        expected = (self.channels, self.resolution, self.resolution)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"this purifier takes images of shape (N, {expected[0]}, {expected[1]}, "
                f"{expected[2]}), got {tuple(x.shape)}; PurifiedModel resizes and converts "
                "channels for you"
            )
        return x

    def _generator(
        self, x: torch.Tensor, generator: torch.Generator | None, seed: int | None
    ) -> torch.Generator | None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if seed is not None and not 0 <= check_int("seed", seed) < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")
        if generator is not None and seed is not None:
            raise ValueError("give a seed or a generator, not both")
        if generator is not None:
            return generator
        if seed is None and self.config.fixed_noise:
            seed = self.config.noise_seed
        if seed is None:
            return None
        return torch.Generator(device=x.device).manual_seed(seed)

    def _reverse_process(
        self, x: torch.Tensor, config: PurifierConfig, generator: torch.Generator | None,
        chunk_size: int | None = None, *, graph: bool = False,
    ) -> torch.Tensor:
        """Forward-diffuse to t*, then run the sampler's reverse steps down to clean data.
        Without a graph, each step runs chunk by chunk (the noise is drawn for the whole batch)."""
        chunks = [slice(0, len(x))] if graph or chunk_size is None else [
            slice(start, start + chunk_size) for start in range(0, len(x), chunk_size)
        ]
        target = None
        if self._guided():
            parts = [self.guidance.prepare(x[rows]) for rows in chunks]
            target = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        sampler = get_sampler(config.sampler)
        steps = sampler.indices(config.t_star, config.ddim_steps)
        x_t = self.schedule.add_noise(2 * x - 1, _randn(x, generator), steps[0][0])
        stochastic = sampler.stochastic(config.eta)
        for index, prev in steps:
            noise = _randn(x, generator) if stochastic and prev >= 0 else None
            if graph and config.checkpointing:
                x_t = checkpoint(
                    self._reverse_step, x_t, noise, target, index, prev, config, graph,
                    use_reentrant=False,
                )
            elif len(chunks) == 1:
                x_t = self._reverse_step(x_t, noise, target, index, prev, config, graph)
            else:
                x_t = torch.cat([
                    self._reverse_step(
                        x_t[rows], None if noise is None else noise[rows],
                        None if target is None else {k: v[rows] for k, v in target.items()},
                        index, prev, config, graph,
                    )
                    for rows in chunks
                ])
            self.last_nfe += 1
        return ((x_t + 1) / 2).clamp(0, 1)

    def _guided(self) -> bool:
        scale = self.guidance_scale
        return self.guidance is not None and (float(scale.detach()) > 0 or scale.requires_grad)

    def _reverse_step(
        self, x_t: torch.Tensor, noise: torch.Tensor | None, target: dict | None, index: int,
        prev: int, config: PurifierConfig, graph: bool,
    ) -> torch.Tensor:
        """One reverse step: mean <- mean - s_t * grad_{x_t} L(x_t, x_in), then add noise."""
        guided = target is not None
        reads_x0_hat = guided and self.guidance.reads_x0_hat
        if not graph and guided:
            x_t = x_t.detach().requires_grad_()
        elif graph and guided and not x_t.requires_grad:
            x_t = x_t.requires_grad_()
        with torch.enable_grad() if reads_x0_hat or graph else torch.no_grad():
            eps_hat = self._denoise(x_t, index, double_backward=graph and reads_x0_hat)
        if guided:
            with torch.enable_grad():
                x0_hat = self.schedule.predict_x0(x_t, eps_hat, index) if reads_x0_hat else None
                loss = self.guidance.loss(x_t, x0_hat, index, self.schedule, target).sum()
                gradient = torch.autograd.grad(loss, x_t, create_graph=graph)[0]
            if not graph:
                x_t, eps_hat = x_t.detach(), eps_hat.detach()
        mean, std = get_sampler(config.sampler).step(
            self.schedule, x_t, eps_hat, index, prev, config.eta)
        if guided:
            mean = mean - self._step_scale(x_t, index, prev, config) * gradient
        return mean if noise is None else mean + std * noise

    def _step_scale(
        self, like: torch.Tensor, index: int, prev: int, config: PurifierConfig
    ) -> torch.Tensor:
        """s_t = s (1 - abar_t / abar_prev) ("variance", beta_t for a DDPM step) or s ("constant")."""
        scale = self.guidance_scale.to(like.dtype)
        if config.scale_schedule == "constant":
            return scale
        return scale * (1 - self.schedule.abar(index, like) / self.schedule.abar(prev, like))

    def _denoise(self, x_t: torch.Tensor, index: int, double_backward: bool) -> torch.Tensor:
        """eps_theta(x_t, t). A graph of the guidance gradient needs the math attention kernel:
        the fused CPU kernel has no double backward."""
        timesteps = torch.full((x_t.shape[0],), index, device=x_t.device, dtype=torch.long)
        compiled = self._compiled.get("denoiser")
        if compiled is not None and not double_backward:
            try:
                return compiled(x_t.to(self.unet.dtype), timesteps).sample.to(x_t.dtype)
            except Exception as error:  # noqa: BLE001 (any compiler failure: fall back to eager)
                warnings.warn(f"the compiled denoiser failed ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); using the "
                              "eager denoiser from now on", RuntimeWarning, stacklevel=2)
                self._compiled.pop("denoiser", None)
        kernel = sdpa_kernel(SDPBackend.MATH) if double_backward else nullcontext()
        with kernel:
            return self.unet(x_t.to(self.unet.dtype), timesteps).sample.to(x_t.dtype)


def _compile_backends() -> frozenset[str] | None:
    """The torch.compile backend names this torch knows (debug and experimental ones too, such as
    "eager"), or None where torch._dynamo does not list them."""
    try:
        import torch._dynamo

        return frozenset(torch._dynamo.list_backends(exclude_tags=()))
    except Exception:  # noqa: BLE001 (no listing in this torch: torch.compile decides)
        return None


def _randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def _check_config_fits(config: PurifierConfig, unet: UNet2DModel) -> None:
    """ValueError when a config's resolution or channels contradict the denoiser's (they are read
    off the denoiser; a config stating others was written for another network)."""
    for name, actual, key in (("resolution", _sample_size(unet), "sample_size"),
                              ("channels", int(unet.config.in_channels), "in_channels")):
        stated = getattr(config, name)
        if stated is not None and stated != actual:
            raise ValueError(
                f"config.{name}={stated} contradicts the denoiser, whose {key} is {actual}; the "
                f"config was written for another denoiser (leave {name} as None: it is read off "
                "the denoiser)"
            )


def _sample_size(unet: UNet2DModel) -> int:
    size = unet.config.sample_size
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"only square denoisers are supported, got sample_size={size}")
        size = size[0]
    return int(size)
