"""The README.md model card written next to a saved purifier: what it is, how it was measured.

Cards are huggingface_hub ModelCard objects: YAML front matter from ModelCardData (library_name,
pipeline_tag, tags, and model-index results from EvalResult entries, which the Hub indexes),
then a Markdown body with purifyguard's tables.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from purifyguard.config import PurifierConfig

TAGS = ["purifyguard", "adversarial-purification", "diffusion-purification",
        "adversarial-robustness", "diffusion", "image-classification"]
NETWORK_TAGS = ["purifyguard", "image-classification"]
PIPELINE_TAG = "image-classification"
# Hub ids and names of the data sets purifyguard trains on (its --data names), for model-index.
HUB_DATASETS = {
    "fashion-mnist": ("zalando-datasets/fashion_mnist", "Fashion-MNIST"),
    "cifar10": ("uoft-cs/cifar10", "CIFAR-10"),
    "cifar100": ("uoft-cs/cifar100", "CIFAR-100"),
}
# The metrics keys that become model-index results (every key also goes into the Results table).
ACCURACY_KEYS = ("clean_accuracy", "robust_accuracy")
TEXT_KEYS = ("attack", "threat_model", "dataset", "dataset_split")

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
    model_name: str | None = None,
) -> str:
    """The card's text: YAML front matter (library_name, pipeline_tag, tags, model-index results
    of the metrics, card_data) and a Markdown body.

    The model-index needs a data set: metrics["dataset"], else card_data["datasets"][0], else
    the config's training_data; without one the metrics go into the Results table only.
    """
    diffusion_model = config.extra.get("diffusion_model")
    card_data = dict(card_data or {})
    datasets = card_data.get("datasets")
    dataset = (datasets if isinstance(datasets, str) else (datasets or [None])[0]) \
        or config.training_data
    front_matter = {"library_name": "purifyguard", "pipeline_tag": PIPELINE_TAG,
                    "tags": list(TAGS)}
    if diffusion_model:
        front_matter["base_model"] = diffusion_model
    results = eval_results(metrics, dataset)
    if results:
        front_matter.update(
            model_name=model_name or (repo_id or "").split("/")[-1] or "purifyguard-purifier",
            eval_results=results,
        )
    front_matter.update(card_data)
    where = repo_id or "path/to/this/folder"
    sections = [
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
    return _card(front_matter, sections)


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
    dataset: str | None = None, model_name: str | None = None, sections: list[str] | None = None,
) -> str:
    """The card of a saved timm network folder (a classifier or a guidance network), which timm
    loads itself (library_name: timm). metrics' clean_accuracy / robust_accuracy on `dataset`
    (or metrics["dataset"]) become model-index results; `sections` (Markdown, e.g. a learning
    curve) follow the results."""
    front_matter = {"library_name": "timm", "pipeline_tag": PIPELINE_TAG,
                    "tags": list(NETWORK_TAGS)}
    results = eval_results(metrics, dataset)
    if results:
        front_matter.update(model_name=model_name or title, eval_results=results)
    arguments = ", ".join(f"{key}={value!r}" for key, value in _shown(kwargs).items())
    card_sections = [
        f"# {title}",
        description,
        ("```python\nimport timm\n\n# timm's own loader (the folder is in timm's Hub format; "
         '"hf-hub:user/name" once uploaded)\n'
         'network = timm.create_model("local-dir:path/to/this/folder", pretrained=True)\n\n'
         "# purifyguard's loader: safetensors only, nothing fetched or followed\n"
         "from purifyguard.hub import load_guidance_network\n\n"
         'network = load_guidance_network("path/to/this/folder")  # images in [0, 1]\n```'),
        f"## Architecture\n\n`timm.create_model({architecture!r}, {arguments})`",
        training_section(training),
        "## Results\n\n" + (
            _table({name: _format(value) for name, value in metrics.items()},
                   header=("metric", "value")) if metrics else "Not measured."
        ),
        *(sections or []),
    ]
    return _card(front_matter, card_sections)


def defended_model_card(
    *,
    classifier: dict[str, Any],
    purifier: PurifierConfig | None,
    input_handling: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    card_data: dict[str, Any] | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
) -> str:
    """The card of a saved PurifiedModel (a defended model): its classifier (`classifier`:
    format, class, and architecture for a timm one), its purifier (None: undefended), how it
    handles its input (`input_handling`: the saved purified_model.json's "input" entries and
    n_samples) and how to load it. metrics and card_data as for a purifier's card."""
    card_data = dict(card_data or {})
    datasets = card_data.get("datasets")
    dataset = (datasets if isinstance(datasets, str) else (datasets or [None])[0]) or (
        purifier.training_data if purifier is not None else None)
    front_matter = {"library_name": "purifyguard", "pipeline_tag": PIPELINE_TAG,
                    "tags": list(TAGS if purifier is not None else NETWORK_TAGS)}
    results = eval_results(metrics, dataset)
    if results:
        front_matter.update(
            model_name=model_name or (repo_id or "").split("/")[-1] or "purifyguard-model",
            eval_results=results,
        )
    front_matter.update(card_data)
    where = repo_id or "path/to/this/folder"
    state_dict = classifier.get("format") == "state_dict"
    class_name = str(classifier.get("class", "nn.Module")).rpartition(".")[2]
    loading = (
        f"# the classifier is saved as a state dict: build a {class_name} as it was saved and\n"
        "# pass it in; its weights are loaded into it (nothing is imported from the folder)\n"
        f'model = PurifiedModel.from_pretrained("{where}", classifier=classifier)'
        if state_dict else
        f'model = PurifiedModel.from_pretrained("{where}")   # the timm classifier is rebuilt'
    )
    if classifier.get("format") == "timm":
        described = f"timm `{classifier.get('architecture')}`, in timm's own format (classifier/)"
    else:
        described = (f"`{classifier.get('class')}`, its state dict in safetensors "
                     "(classifier/model.safetensors)")
    components = {"classifier": described}
    if purifier is None:
        components["purifier"] = "none: the bare classifier behind the same interface"
    else:
        steps = f"{purifier.nfe} reverse steps" + (
            f", guidance {purifier.guidance}" if purifier.guidance != "none" else "")
        components["purifier"] = (
            f"diffusion purifier, {purifier.channels}x{purifier.resolution}x{purifier.resolution}"
            f", t* {purifier.t_star}, {purifier.sampler}, {steps} (purifier/, with its own card)"
        )
    sections = [
        "# Defended classifier (purifyguard)" if purifier is not None
        else "# Classifier (purifyguard, undefended)",
        ("An image classifier behind a diffusion purifier, saved as one model from [0, 1] "
         "images to logits: the input is purified, then normalised as the classifier wants it, "
         "then classified." if purifier is not None else
         "An image classifier saved as one model from [0, 1] images to logits (no purifier: "
         "the undefended baseline), normalising its input as the classifier wants it."),
        ("```python\nfrom purifyguard import PurifiedModel\n\n" + loading
         + "\nlogits = model(images)   # images in [0, 1], shape (N, C, H, W)\n```"),
        "## Components\n\n" + _table(components, header=("component", "what")),
        "## Input handling\n\n" + _table(
            {name: _format(value) for name, value in input_handling.items()},
            header=("setting", "value")),
        "## Results\n\n" + (
            _table({name: _format(value) for name, value in metrics.items()},
                   header=("metric", "value")) if metrics
            else "No measured clean or robust accuracy was supplied when this card was written."
        ),
    ]
    return _card(front_matter, sections)


def eval_results(metrics: dict[str, Any] | None, dataset: str | None = None) -> list[EvalResult]:
    """model-index entries for the Hub: clean accuracy (metric type accuracy) and robust
    accuracy (type robust_accuracy, the attack in its name and args) on an image-classification
    task. dataset: a purifyguard data set name (mapped to its Hub id) or any Hub dataset id;
    metrics["dataset"] wins. [] when there is no accuracy or no data set to name."""
    check_metrics(metrics)
    metrics = metrics or {}
    dataset = metrics.get("dataset") or dataset
    if not dataset or all(metrics.get(key) is None for key in ACCURACY_KEYS):
        return []
    names = {hub_id: name for hub_id, name in HUB_DATASETS.values()}
    dataset_type, dataset_name = HUB_DATASETS.get(dataset, (dataset, names.get(dataset, dataset)))
    task = {"task_type": PIPELINE_TAG, "task_name": "Image Classification",
            "dataset_type": dataset_type, "dataset_name": dataset_name,
            "dataset_split": metrics.get("dataset_split", "test")}
    n_examples = metrics.get("n_examples")
    results = []
    if metrics.get("clean_accuracy") is not None:
        results.append(EvalResult(
            **task, metric_type="accuracy", metric_name="clean accuracy",
            metric_value=float(metrics["clean_accuracy"]),
            metric_args={"n_examples": n_examples} if n_examples is not None else None,
        ))
    if metrics.get("robust_accuracy") is not None:
        attack = metrics.get("attack")
        args = {"attack": attack, "threat_model": metrics.get("threat_model"),
                "n_examples": n_examples}
        results.append(EvalResult(
            **task, metric_type="robust_accuracy",
            metric_name="robust accuracy" + (f" ({attack})" if attack else ""),
            metric_value=float(metrics["robust_accuracy"]),
            metric_args={key: value for key, value in args.items() if value is not None} or None,
        ))
    return results


def check_metrics(metrics: dict[str, Any] | None) -> None:
    """ValueError naming a metrics entry that cannot become a model-index result: accuracies
    must be finite numbers, n_examples an integer, attack, threat_model, dataset and
    dataset_split strings. Other keys are free (they go into the Results table only)."""
    if not metrics:
        return
    for key in ACCURACY_KEYS:
        value = metrics.get(key)
        if value is not None and (not isinstance(value, numbers.Real) or isinstance(value, bool)
                                  or not math.isfinite(value)):
            raise ValueError(f"metrics[{key!r}] must be a finite number, got {value!r}")
    n_examples = metrics.get("n_examples")
    if n_examples is not None and (not isinstance(n_examples, int) or isinstance(n_examples, bool)
                                   or n_examples < 1):
        raise ValueError(f"metrics['n_examples'] must be an integer >= 1, got {n_examples!r}")
    for key in TEXT_KEYS:
        value = metrics.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"metrics[{key!r}] must be a string, got {value!r}")


def _card(front_matter: dict[str, Any], sections: list[str]) -> str:
    """A huggingface_hub ModelCard of the front matter and the non-empty sections, as text."""
    yaml = ModelCardData(**front_matter).to_yaml()
    body = "\n\n".join(section for section in sections if section)
    return str(ModelCard(f"---\n{yaml}\n---\n\n{body}\n"))


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
        if config.guidance_layer is not None:
            settings["guidance features"] = f"layer {config.guidance_layer}"
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
        arguments = ", ".join(f"{key}={value}" for key, value in _shown(kwargs).items())
        components["guidance network"] = f"timm {name} ({arguments}) (guidance/)"
    return components


def _shown(kwargs: dict[str, Any]) -> dict[str, Any]:
    """create_model kwargs as a card shows them: of the input settings, mean, std, input_size."""
    overlay = kwargs.get("pretrained_cfg_overlay")
    if not isinstance(overlay, dict):
        return kwargs
    shown = {key: overlay[key] for key in ("mean", "std", "input_size") if key in overlay}
    rest = {key: value for key, value in kwargs.items() if key != "pretrained_cfg_overlay"}
    return {**rest, "pretrained_cfg_overlay": shown} if shown else rest


def _table(rows: dict[str, Any], header: tuple[str, str] = ("setting", "value")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows.items()]
    return "\n".join(lines)


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
