"""The README.md model card written next to a saved purifier: what it is, how it was measured."""

from __future__ import annotations

from typing import Any

from huggingface_hub import ModelCardData

from purifyguard.config import PurifierConfig

TAGS = ["purifyguard", "adversarial-purification", "adversarial-robustness", "diffusion",
        "image-classification"]

EVALUATION_PROTOCOL = """\
The protocol of purifyguard's evaluation (the results below name the settings actually run):
the purified model (purifier + classifier) is attacked end to end with
- PGD with EOT and full gradients through purifier and classifier (reference: 200 steps, EOT 20,
  step 0.007 for L-inf 8/255, random start); AutoAttack `rand`, BPDA+EOT, transfer from the
  undefended classifier and Square as further attacks;
- threat models L-inf 8/255 and L2 0.5 (CIFAR-10), L-inf 0.1 and L2 1.5 (Fashion-MNIST);
- R >= 5 independent purifications per adversarial example, reporting the mean accuracy and the
  worst case, on >= 512 test examples with the seeds and a 95% interval."""


def model_card(
    config: PurifierConfig,
    *,
    guidance: tuple[str, dict[str, Any]] | None = None,
    metrics: dict[str, Any] | None = None,
    card_data: dict[str, Any] | None = None,
    repo_id: str | None = None,
    denoiser_parameters: int | None = None,
) -> str:
    """The card's text: YAML front matter (library_name, tags, card_data) and a Markdown body."""
    diffusion_model = config.extra.get("diffusion_model")
    front_matter = {"library_name": "purifyguard", "tags": list(TAGS)}
    if diffusion_model:
        front_matter["base_model"] = diffusion_model
    front_matter.update(card_data or {})
    yaml = ModelCardData(**front_matter).to_yaml()
    where = repo_id or "path/to/this/folder"
    sections = [
        f"---\n{yaml}\n---",
        "# Diffusion purifier (purifyguard)",
        "A diffusion purifier that noises an image to level t* and denoises it"
        + (" with adversarial guidance (AGDM)" if config.guidance == "adversarial" else "")
        + ", put in front of any image classifier to defend it against adversarial examples.",
        _usage(where),
        "## Settings\n\n" + _table(_settings(config)),
        "## Components\n\n" + _table(
            _components(guidance, diffusion_model, denoiser_parameters),
            header=("component", "what"),
        ),
        "## Training data\n\n" + (config.training_data or "Not recorded."),
        training_section(config.extra.get("training")),
        training_section(config.extra.get("adaptation"),
                         "How it was adapted to a classifier (`purifyguard train adapt`)"),
        "## Evaluation protocol\n\n" + EVALUATION_PROTOCOL,
        "## Results\n\n" + (
            _table({name: _format(value) for name, value in metrics.items()},
                   header=("metric", "value")) if metrics
            else "No measured clean or robust accuracy was supplied when this card was written."
        ),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def training_section(training: dict[str, Any] | None, title: str = "How it was trained") -> str:
    """How the weights were trained (command, steps, data, seed), or "" when not recorded."""
    if not training:
        return ""
    rows = {name: f"`{value}`" if name.endswith("command") else _format(value)
            for name, value in training.items()}
    return f"## {title}\n\n" + _table(rows, header=("what", "value"))


def network_card(
    architecture: str, kwargs: dict[str, Any], *, title: str, description: str,
    training: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
) -> str:
    """The card of a saved timm network folder (a classifier or a guidance network)."""
    yaml = ModelCardData(library_name="timm", tags=["purifyguard", "image-classification"]).to_yaml()
    arguments = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
    sections = [
        f"---\n{yaml}\n---",
        f"# {title}",
        description,
        ("```python\nfrom pathlib import Path\n\nfrom purifyguard.hub import load_guidance_network\n\n"
         'network = load_guidance_network(Path("path/to/this/folder"))  # images in [0, 1]\n```'),
        f"## Architecture\n\n`timm.create_model({architecture!r}, {arguments})`",
        training_section(training),
        "## Results\n\n" + (
            _table({name: _format(value) for name, value in metrics.items()},
                   header=("metric", "value")) if metrics else "Not measured."
        ),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def _usage(where: str) -> str:
    return (
        "```python\nfrom purifyguard import PurifiedModel, Purifier\n\n"
        f'purifier = Purifier.from_pretrained("{where}")\n'
        f'model = PurifiedModel(classifier, "{where}")  # logits of images in [0, 1]\n```'
    )


def _settings(config: PurifierConfig) -> dict[str, Any]:
    steps = config.nfe
    settings = {
        "input": f"(N, {config.channels}, {config.resolution}, {config.resolution}) in [0, 1]",
        "t* (purification level)": config.t_star,
        "sampler": config.sampler + (f" (eta {config.eta})" if config.sampler == "ddim" else ""),
        "reverse steps": steps,
        "guidance": config.guidance,
    }
    if config.guidance != "none":
        settings["guidance scale"] = f"{config.guidance_scale:g} ({config.scale_schedule})"
    if config.guidance == "adversarial":
        settings["guidance reads"] = config.guidance_on
        settings["latent distance"] = config.distance
        settings["class term weight"] = config.class_weight
    settings["gradient for attacks"] = config.gradient_mode
    return settings


def _components(
    guidance: tuple[str, dict[str, Any]] | None, diffusion_model: str | None,
    denoiser_parameters: int | None,
) -> dict[str, Any]:
    denoiser = "diffusers UNet2DModel (unet/), DDPM schedule (scheduler/)"
    if denoiser_parameters is not None:
        denoiser += f", {denoiser_parameters / 1e6:.1f} M parameters"
    if diffusion_model:
        denoiser += f", from {diffusion_model}"
    components = {"denoiser": denoiser}
    if guidance is not None:
        name, kwargs = guidance
        arguments = ", ".join(f"{key}={value}" for key, value in kwargs.items())
        components["guidance network"] = f"timm {name} ({arguments}) (guidance/)"
    return components


def _table(rows: dict[str, Any], header: tuple[str, str] = ("setting", "value")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows.items()]
    return "\n".join(lines)


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
