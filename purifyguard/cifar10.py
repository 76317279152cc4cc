"""Adversarially guided purification on CIFAR-10 from published weights (cifar10-agdm).

The denoiser is google/ddpm-cifar10-32 from the Hugging Face Hub (Purifier.from_diffusers); the
guidance network is a TRADES-trained network of RobustBench's model zoo, built and downloaded by
robustbench's own loader (purifyguard.adapters.robustbench.load_robustbench_model). Both are
fetched on first use; offline, FileNotFoundError says what would be downloaded and how to
pre-fetch it. The settings and where each comes from: docs/cifar10.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from purifyguard.validation import check_choice

if TYPE_CHECKING:
    from torch import nn

    from purifyguard.purifier import Purifier

DENOISER = "google/ddpm-cifar10-32"
# What from_diffusers fetches of the flat repository (purifyguard.diffusers_layout.DIFFUSERS_FILES).
DENOISER_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json",
                  "model_index.json")
TRAINING_DATA = "CIFAR-10 (training split)"

# The reverse process of every CIFAR-10 recipe: few deterministic DDIM steps, cosine distance
# between the guidance network's pooled features of x0_hat(x_t) and of the input.
SHARED_SETTINGS: dict[str, Any] = {
    "sampler": "ddim", "n_steps": 10, "eta": 0.0, "guidance": "adversarial",
    "scale_schedule": "variance", "guidance_on": "x0_hat", "distance": "cosine",
    "class_weight": 0.0,
}


@dataclass(frozen=True)
class Recipe:
    """A registered CIFAR-10 purifier: its guidance network, t* and guidance scale."""

    name: str
    threat_model: str
    guidance_network: str  # robustbench:<dataset>/<threat model>/<model>
    guidance_description: str
    t_star: int
    guidance_scale: float
    t_star_source: str

    def settings(self) -> dict[str, Any]:
        """Every Purifier setting of the recipe (guidance scale not yet swept: docs/cifar10.md)."""
        return {
            **SHARED_SETTINGS, "t_star": self.t_star, "guidance_scale": self.guidance_scale,
            "training_data": TRAINING_DATA,
            "extra": {"guidance_network": self.guidance_network,
                      "guidance_scale_status": "not yet swept",
                      "t_star_source": self.t_star_source},
        }


RECIPES = {
    "cifar10-agdm": Recipe(
        name="cifar10-agdm", threat_model="Linf",
        guidance_network="robustbench:cifar10/Linf/Zhang2019Theoretically",
        guidance_description="WideResNet-34-10 trained with TRADES (Zhang et al. 2019), "
                             "L-inf 8/255",
        t_star=100, guidance_scale=3200.0,
        t_star_source="DiffPure (Nie et al. 2022), t* = 0.1 for CIFAR-10 L-inf",
    ),
    "cifar10-agdm-l2": Recipe(
        name="cifar10-agdm-l2", threat_model="L2",
        guidance_network="robustbench:cifar10/L2/Rebuffi2021Fixing_28_10_cutmix_ddpm",
        guidance_description="WideResNet-28-10 trained with TRADES by Rebuffi et al. 2021 "
                             "(CIFAR-10 and DDPM-generated images), L2 128/255",
        t_star=75, guidance_scale=5500.0,
        t_star_source="DiffPure (Nie et al. 2022), t* = 0.075 for CIFAR-10 L2",
    ),
}


def load_cifar10_purifier(name: str = "cifar10-agdm", *, model_dir: str | Path | None = None,
                          **settings: Any) -> Purifier:
    """The registered CIFAR-10 purifier `name` ("cifar10-agdm" or "cifar10-agdm-l2"), its
    weights downloaded on first use: google/ddpm-cifar10-32 through the Hub cache, the guidance
    network through robustbench's loader into model_dir (None: its default,
    $PURIFYGUARD_CACHE/robustbench). settings override the recipe's (e.g. n_steps=5).
    FileNotFoundError, naming both downloads and how to pre-fetch them, when either is
    missing and cannot be downloaded."""
    recipe = RECIPES[check_choice("name", name, tuple(RECIPES))]
    if model_dir is not None and (not isinstance(model_dir, (str, Path)) or not str(model_dir)):
        raise ValueError(f"model_dir must be a folder path or None, got {model_dir!r}")
    network = _guidance_network(recipe, model_dir)
    from purifyguard.purifier import Purifier

    chosen = {**recipe.settings(), **settings}
    t_star = chosen.pop("t_star")
    try:
        return Purifier.from_diffusers(DENOISER, t_star, guidance_network=network, **chosen)
    except FileNotFoundError as error:
        raise FileNotFoundError(prefetch_message(recipe, model_dir, error)) from None


def _guidance_network(recipe: Recipe, model_dir: str | Path | None) -> nn.Module:
    from purifyguard.adapters.robustbench_zoo import load_robustbench_model

    try:
        return load_robustbench_model(recipe.guidance_network, model_dir=model_dir)
    except FileNotFoundError as error:
        raise FileNotFoundError(prefetch_message(recipe, model_dir, error)) from None


def prefetch_message(recipe: Recipe, model_dir: str | Path | None, error: Exception) -> str:
    """What `recipe` downloads on first use, whether each part is here, and how to pre-fetch."""
    from purifyguard.adapters.robustbench_zoo import default_model_dir, parse_robustbench_name

    reference = parse_robustbench_name(recipe.guidance_network)
    root = default_model_dir() if model_dir is None else Path(model_dir)
    folder = root / reference.dataset / reference.threat_model
    checkpoints = [folder / f"{reference.model}.pt", folder / f"{reference.model}.safetensors"]
    hub_cache = os.environ.get("HF_HUB_CACHE") or "the Hub cache (~/.cache/huggingface/hub)"
    present = "here" if any(path.is_file() for path in checkpoints) else "missing"
    files = " ".join(DENOISER_FILES)
    denoiser = (f"  - the denoiser {DENOISER} from the Hugging Face Hub ({files}; about 143 MB) "
                f"into {hub_cache}: {'here' if _denoiser_cached() else 'missing'}")
    guidance = (f"  - the guidance network {reference} ({recipe.guidance_description}) from "
                "RobustBench's Google Drive, by robustbench's loader, into "
                f"{checkpoints[0]}: {present}")
    fetch_guidance = ("  python -c \"from purifyguard.adapters.robustbench import "
                      f"load_robustbench_model; load_robustbench_model('{reference}')\"")
    copy = ("and copy the Hub cache folder (or point HF_HUB_CACHE at it) and robustbench's model "
            f"folder {root} (or point PURIFYGUARD_CACHE at its parent) to this machine.")
    return "\n".join([
        f"{recipe.name} needs two sets of published weights, downloaded on first use:",
        denoiser, guidance,
        "To pre-fetch them on a machine with internet access, run",
        f"  hf download {DENOISER} {files}",
        "  (huggingface_hub < 1.0: huggingface-cli download with the same arguments)",
        fetch_guidance, copy,
        f"The error was: {error}",
    ])


def _denoiser_cached() -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(DENOISER, "diffusion_pytorch_model.safetensors")
    return isinstance(found, str)
