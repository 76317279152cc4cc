"""Adapt a purifier to a classifier: fine-tune the guidance network and the guidance scale end to
end, so that classifier(purify(x_adv)) is right (docs/method.md, section 5, "Adaptation").

    loss  = w * CE(f(purify(x)), y) + (1 - w) * CE(f(purify(x_adv)), y),   w = --clean-weight
    x_adv = PGD on CE(f(purify(x')), y) inside the L-inf eps-ball, through the same purifier

f(purify(x)) is the deployed pipeline, PurifiedModel(classifier, purifier): the classifier's own
normalisation, resolution and channels, as PurifiedModel gives them. From Python, for any
nn.Module classifier (timm, torchvision, your own), in memory:

    from purifyguard.train.adapt import adapt_purifier
    adapted = adapt_purifier(classifier, "fashion-mnist-agdm", data="fashion-mnist",
                             optimizer_steps=300, batch_size=16, output_dir="runs/adapted")
    model = PurifiedModel(classifier, adapted)   # with the same mean=, std=, input_size=

From the command line, for a classifier folder, a bundled classifier or a timm / torchvision name
with weights (--classifier-checkpoint, --classifier-pretrained):

    accelerate launch -m purifyguard.train adapt --purifier runs/agdm/final \\
        --classifier runs/classifier/final --eps 0.1 --attack-steps 3 --sampler-steps 2 \\
        --optimizer-steps 500

Both run the same code (adapt_purifier and main both call run_adaptation). Both the attack and
the training forward run a few-step process (--train-sampler, --sampler-steps) with full
gradients: the surrogate of the defended process, whose settings the export keeps. The denoiser
and the classifier stay frozen and in eval mode. The guidance network also stays in eval mode
while its weights train: BatchNorm keeps the running statistics it learnt with TRADES, since
batch statistics of x0_hat change from one reverse step to the next. Its classifier head trains
only when the purifier's class term (class_weight > 0) reads it. The guidance scale is trained
as it is (Adam at --scale-lr, by default 1 % of its starting value, with an epsilon below its
tiny gradient: SCALE_ADAM_EPS) and clamped to >= MIN_SCALE after every step, so that it stays
positive. The export (output_dir/final) is the adapted purifier, written by
Purifier.save_pretrained.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from purifyguard.config import SAMPLERS
from purifyguard.provenance import is_absolute_path
from purifyguard.train.inputs import (
    add_classifier_arguments,
    check_pipeline,
    classifier_from_options,
    flags_of,
    in_memory_label,
    keywords_of,
    load_training_data,
)
from purifyguard.train.options import (
    HelpFormatter,
    RenamedOption,
    add_common_arguments,
    non_negative_float,
    non_negative_int,
    options_from_keywords,
    parse_with_config,
    positive_float,
    positive_int,
    text,
    unit_interval,
)

MIN_SCALE = 1e-3
# The guidance scale's default learning rate, as a share of its starting value (at least 1).
SCALE_LR_SHARE = 0.01
# Adam's epsilon for the guidance scale. The loss's gradient with respect to the scale is tiny
# (about 1e-9 for a scale of 400: the scale multiplies a guidance gradient damped by
# 1 - abar_t / abar_prev), below Adam's default epsilon of 1e-8, which then swallows the update:
# the scale moved by less than a tenth of its learning rate a step (400 -> 399.8 in 300 steps at
# 0.01). With this epsilon Adam's step is about the learning rate, as Adam intends.
SCALE_ADAM_EPS = 1e-20

if TYPE_CHECKING:  # heavy imports wait for main(): --help stays fast
    from torch.utils.data import Dataset

    from purifyguard.purified_model import PurifiedModel
    from purifyguard.purifier import Purifier

# adapt_purifier's arguments that are not options of its own keyword (**options may not set them).
_ARGUMENTS = {
    "purifier": "purifier", "classifier": "model", "data": "data", "data_root": "data_root",
    "output_dir": "output_dir", "resume": "resume", "config": "(none: pass keywords)",
    "no_progress": "progress", "classifier_checkpoint": "model",
    "classifier_pretrained": "model", "classifier_mean": "mean", "classifier_std": "std",
    "classifier_input_size": "input_size",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="purifyguard train adapt", description=__doc__,
                                     formatter_class=HelpFormatter)
    add_common_arguments(parser)
    parser.set_defaults(lr=1e-4, batch_size=32)
    parser.add_argument("--purifier", type=text, required=True, help="purifier folder "
                        "(save_pretrained), registered name or Hub repo id, with adversarial "
                        "guidance")
    add_classifier_arguments(parser, "classifier", "the classifier to adapt the purifier to",
                             required=True)
    parser.add_argument("--eps", type=non_negative_float, default=0.1,
                        help="L-inf radius of the attack")
    parser.add_argument("--attack-steps", type=non_negative_int, default=3,
                        help="PGD steps per batch")
    parser.add_argument("--attack-step-size", type=positive_float,
                        help="PGD step size (default: 2.5 * eps / attack_steps)")
    parser.add_argument("--train-sampler", type=text, default="ddim", choices=SAMPLERS,
                        help="sampler of the few-step process used for the attack and training")
    parser.add_argument("--sampler-steps", "--train-steps", dest="train_steps", metavar="N",
                        type=positive_int, default=2, action=RenamedOption,
                        old_name_note=": the reverse steps of the few-step training purifier, "
                                      "not the length of the run (that is --optimizer-steps)",
                        help="reverse steps of that process (ddim), per purification; not the "
                             "length of the run, which is --optimizer-steps (--train-steps is "
                             "the old name; config key: train_steps)")
    parser.add_argument("--clean-weight", type=unit_interval, default=0.5,
                        help="weight of the clean CE; the adversarial CE gets 1 - this")
    parser.add_argument("--scale-lr", type=positive_float,
                        help="Adam learning rate of the guidance scale, in units of the scale "
                             f"(default: {SCALE_LR_SHARE:g} x the purifier's starting scale, at "
                             f"least {SCALE_LR_SHARE:g}: 4 for a scale of 400, so that the scale "
                             "moves by up to about 1 %% a step; the old fixed 0.01 left a scale "
                             "of 400 where it was)")
    return parser


def scale_learning_rate(scale_lr: float | None, scale: float) -> float:
    """--scale-lr, or by default SCALE_LR_SHARE of the starting scale (at least SCALE_LR_SHARE):
    Adam moves a parameter by about its learning rate a step, whatever the gradient's size."""
    return scale_lr if scale_lr is not None else SCALE_LR_SHARE * max(abs(scale), 1.0)


class AdaptedModel(nn.Module):
    """classifier(purify(x)) through the few-step training purifier: the deployed pipeline (a
    PurifiedModel), or PurifiedModel(classifier, purifier) when given the two.

    Only the trainable parts are registered (guidance network and scale), so checkpoints and
    DistributedDataParallel hold just those; the frozen denoiser and classifier sit in a tuple.
    """

    def __init__(self, purifier: Purifier | PurifiedModel, classifier: nn.Module | None = None
                 ) -> None:
        from purifyguard.purified_model import PurifiedModel

        super().__init__()
        pipeline = purifier if isinstance(purifier, PurifiedModel) else PurifiedModel(
            classifier, purifier)
        self.guidance_network = pipeline.purifier.guidance_network
        self.guidance_scale = pipeline.purifier.guidance_scale
        self.frozen = (pipeline,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen[0](x)


def pgd_through_purifier(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, step_size: float
) -> torch.Tensor:
    """L-inf PGD with a random start on CE(model(x'), y), within [0, 1]; gradients reach x' only."""
    if steps == 0 or eps == 0:
        return x
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        gradient, = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step_size * gradient.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def adapt_purifier(
    model: nn.Module,
    purifier: Purifier | str | Path | None = None,
    data: Dataset | str = "fashion-mnist",
    *,
    data_root: str | Path | None = None,
    mean: Any = None,
    std: Any = None,
    weights: object | None = None,
    input_size: int | None = None,
    optimizer_steps: int = 1000,
    sampler_steps: int = 2,
    batch_size: int = 32,
    lr: float = 1e-4,
    scale_lr: float | None = None,
    eps: float = 0.1,
    attack_steps: int = 3,
    clean_weight: float = 0.5,
    seed: int = 0,
    output_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    **options: Any,
) -> Purifier:
    """Adapt a purifier to a classifier in memory; returns the adapted Purifier.

    model: the classifier, any nn.Module (timm, torchvision, your own) taking images of the data's
    channels, or a PurifiedModel, whose input handling and purifier are then used as deployed.
    A bare classifier is put behind PurifiedModel(model, purifier, mean=, std=, weights=,
    input_size=): give those as you will deploy it (a torchvision model needs weights= or
    mean/std). purifier: a Purifier, registered name, folder or Hub id with adversarial guidance
    (None: the PurifiedModel's, or the registered default for the classifier's input).
    data: a data set name (fashion-mnist, cifar10, cifar100, imagefolder; data_root= is its
    folder) or a Dataset of (image (C, H, W) in [0, 1], label) pairs; its images must be at the
    classifier's input size (a size recorded by the classifier that differs is refused, a
    different input_size= given is warned about).

    The options are those of `purifyguard train adapt` (optimizer_steps: optimizer steps in all;
    sampler_steps: reverse steps of the few-step training purifier; scale_lr None: 1 % of the
    starting scale); **options takes the others by their config keys (grad_accum, log_every,
    checkpoint_every, keep_checkpoints, validation_size, validation_seed, mixed_precision,
    attack_step_size, train_sampler, num_workers), checked as the command line checks them.
    With output_dir, the run writes checkpoints, metrics.jsonl and output_dir/final as the
    command does, and resume=True continues it; without, nothing is written. The run is an
    accelerate run: launched with `accelerate launch script.py` it uses every process.

    The given purifier and classifier are left as they were: the guidance network is copied, the
    classifier borrowed (frozen and moved to the run's device, then given back as it was). The
    adapted purifier keeps the given purifier's settings and shares its denoiser.
    """
    from purifyguard.purified_model import PurifiedModel

    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module classifier or a PurifiedModel, got "
                         f"{type(model).__name__}")
    clashing = sorted(key for key in options if key.replace("-", "_") in _ARGUMENTS)
    if clashing:
        raise ValueError(f"adapt_purifier: pass {clashing} as the argument "
                         f"{[_ARGUMENTS[key.replace('-', '_')] for key in clashing]}")
    if resume and output_dir is None:
        raise ValueError("adapt_purifier: resume=True needs the output_dir of the run to resume")
    values = {
        "optimizer_steps": optimizer_steps, "sampler_steps": sampler_steps,
        "batch_size": batch_size, "lr": lr, "scale_lr": scale_lr, "eps": eps,
        "attack_steps": attack_steps, "clean_weight": clean_weight, "seed": seed,
        "resume": resume, "no_progress": not progress, **options,
    }
    args = options_from_keywords(build_parser(), values, "adapt_purifier")
    # Checked before any work: the data, then the classifier and its input handling.
    if isinstance(data, str):
        dataset = load_training_data(data, data_root, option="data_root=")
        args.data, args.data_root = data, None if data_root is None else str(data_root)
    else:
        if data_root is not None:
            raise ValueError("adapt_purifier: data_root= goes with a data set name, not a Dataset")
        if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")) or len(data) == 0:
            raise ValueError(f"data must be a data set name or a non-empty Dataset of (image, "
                             f"label) pairs, got {type(data).__name__}")
        dataset = data
        args.data = f"{type(data).__name__} (in memory, {len(data)} images)"
    if isinstance(model, PurifiedModel):
        given = {"mean": mean, "std": std, "weights": weights, "input_size": input_size}
        if any(value is not None for value in given.values()):
            raise ValueError(
                f"model is a PurifiedModel, which brings its own input handling: build it with "
                f"{sorted(k for k, v in given.items() if v is not None)} or pass the classifier")
        pipeline = model if purifier is None else model.with_purifier(_load_purifier(purifier))
        if pipeline.purifier is None:
            raise ValueError("model is an undefended PurifiedModel: pass purifier= to adapt")
    else:
        pipeline = PurifiedModel(model, purifier, mean=mean, std=std, weights=weights,
                                 input_size=input_size)
    args.purifier = (str(purifier) if isinstance(purifier, (str, Path))
                     else in_memory_label(pipeline.purifier))
    args.classifier = in_memory_label(pipeline.classifier)
    args.classifier_mean, args.classifier_std = _statistics(pipeline)
    args.classifier_input_size = pipeline.input_size
    args.output_dir = None if output_dir is None else str(output_dir)
    named = "<purifier folder>" if is_absolute_path(args.purifier) else args.purifier
    call = (f"adapt_purifier({args.classifier}, {named}, data={args.data!r}, "
            f"optimizer_steps={args.steps}, sampler_steps={args.train_steps}, "
            f"batch_size={args.batch_size}, ...)")
    explicit_size = input_size is not None or isinstance(model, PurifiedModel)

    with contextlib.ExitStack() as stack:
        if output_dir is None:  # a run of its own files, removed when it ends
            args.output_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="adapt-"))
        return run_adaptation(args, pipeline, dataset, argv=[], command=call,
                              option=keywords_of("model"),
                              explicit_size=explicit_size, keep_files=output_dir is not None)


def main(argv: list[str] | None = None) -> None:
    """`purifyguard train adapt`: the options, the data (checked first), the classifier behind
    its deployed input handling, the purifier; then run_adaptation, as adapt_purifier does."""
    args = parse_with_config(build_parser(), argv)
    dataset = load_training_data(args.data, args.data_root)
    pipeline = classifier_from_options(args, "classifier", dataset)
    pipeline = pipeline.with_purifier(_load_purifier(args.purifier))
    run_adaptation(args, pipeline, dataset, argv=argv, option=flags_of("classifier"),
                   explicit_size=args.classifier_input_size is not None)


def run_adaptation(
    args: argparse.Namespace, pipeline: PurifiedModel, dataset: Dataset, *,
    argv: list[str] | None = None, command: str | None = None,
    option: Callable[[str], str] | None = None,
    explicit_size: bool = False, keep_files: bool = True,
) -> Purifier:
    """The adaptation loop, for main and adapt_purifier: the pipeline's classifier and purifier,
    trained on the data set with the options in args (build_parser's dests). Returns the adapted
    purifier (on the device the given purifier was on); the main process exports it to
    args.output_dir/final when keep_files."""
    from purifyguard.purifier import Purifier
    from purifyguard.train.run import TrainingRun

    defended = pipeline.purifier
    if defended.config.guidance != "adversarial" or defended.guidance_network is None:
        raise ValueError(f"{args.purifier}: adapt needs a purifier with adversarial guidance, "
                         f"got guidance={defended.config.guidance!r}")
    check_pipeline(pipeline, dataset, option or flags_of("classifier"), explicit_size)
    run = TrainingRun(args, "adapt", argv)
    step_size = args.attack_step_size or 2.5 * args.eps / max(args.attack_steps, 1)
    dataset = run.training_part(dataset)
    home = next(defended.unet.parameters()).device

    # A copy of the guidance network trains; the given purifier keeps its own.
    network = copy.deepcopy(defended.guidance_network)
    start = Purifier(defended.unet, defended.schedule.scheduler_config, network,
                     defended.current_config())
    few_steps = {"n_steps": args.train_steps} if args.train_sampler == "ddim" else {}
    purifier = start.with_settings(
        sampler=args.train_sampler, gradient_mode="full", checkpointing=False,
        fixed_noise=False, **few_steps,
    )
    with _borrowed(pipeline):
        pipeline.classifier.requires_grad_(False).eval()
        training = pipeline.with_purifier(purifier).to(run.device)
        network.requires_grad_(True).eval()
        head = getattr(network, "get_classifier", None)
        if purifier.config.class_weight == 0 and callable(head):  # the head never reaches the loss
            head().requires_grad_(False)
        purifier.guidance_scale.requires_grad_(True)
        scale_lr = scale_learning_rate(args.scale_lr, defended.current_config().guidance_scale)

        model = AdaptedModel(training)
        optimizer = torch.optim.Adam([
            {"params": [p for p in network.parameters() if p.requires_grad], "lr": args.lr},
            {"params": [purifier.guidance_scale], "lr": scale_lr, "eps": SCALE_ADAM_EPS},
        ])
        model, optimizer, loader = run.prepare(model, optimizer, run.loader(dataset))
        start_step = run.resume()
        batches = run.batches(loader)
        attacked = run.accelerator.unwrap_model(model)  # the attack's backward skips DDP's hooks

        bar = run.progress(start_step)
        for step in bar:
            for _ in range(args.grad_accum):
                images, labels = next(batches)
                with run.accelerator.autocast():
                    adversarial = pgd_through_purifier(
                        attacked, images, labels, args.eps, args.attack_steps, step_size
                    )
                with run.accelerator.accumulate(model):
                    clean, adv = model(torch.cat([images, adversarial])).float().chunk(2)
                    loss = (args.clean_weight * F.cross_entropy(clean, labels)
                            + (1 - args.clean_weight) * F.cross_entropy(adv, labels))
                    run.accelerator.backward(loss)
                    if run.accelerator.sync_gradients:
                        run.accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad()
                    with torch.no_grad():
                        purifier.guidance_scale.clamp_(min=MIN_SCALE)
                run.count_images(images.shape[0])
            if run.should(args.log_every, step):
                metrics = {"loss": loss.detach(),
                           "clean_accuracy": (clean.argmax(1) == labels).float().mean(),
                           "adversarial_accuracy": (adv.argmax(1) == labels).float().mean()}
                metrics = {name: run.accelerator.reduce(value, "mean").item()
                           for name, value in metrics.items()}
                run.log(bar, step + 1, {**metrics,
                                        "guidance_scale": purifier.guidance_scale.item()})
            if keep_files and run.should(args.checkpoint_every, step):
                run.save_checkpoint(step + 1)

    config = defended.config
    adaptation = run.training_record(**{
        "classifier": str(args.classifier),
        "classifier input": f"{pipeline.normalize.extra_repr()} ({pipeline.normalization_source})"
                            f", input size {pipeline.input_size or 'not recorded'}",
        "eps": args.eps, "attack steps": args.attack_steps, "clean weight": args.clean_weight,
        "training process": f"{args.train_sampler}, {args.train_steps} steps",
        "scale learning rate": scale_lr,
    })
    if command is not None:
        adaptation["command"] = command
    network = run.accelerator.unwrap_model(model).guidance_network.requires_grad_(False)
    adapted = Purifier(
        defended.unet, defended.schedule.scheduler_config, network,
        config.replace(
            guidance_scale=float(purifier.guidance_scale.detach()),
            training_data=config.training_data or args.data,
            extra={**config.extra, "adaptation": adaptation},
        ),
    ).to(home)
    if run.is_main and keep_files:
        adapted.save_pretrained(run.output_dir / "final")
        print(f"guidance scale {config.guidance_scale:.4g} -> {adapted.config.guidance_scale:.4g}; "
              f"exported the adapted purifier to {run.output_dir / 'final'}")
    run.finish()
    return adapted


def _load_purifier(spec: Purifier | str | Path) -> Purifier:
    from purifyguard.registry import load_purifier

    return load_purifier(spec)


def _statistics(pipeline: PurifiedModel) -> tuple[tuple[float, ...] | None, ...]:
    normalize = pipeline.normalize
    if not normalize.enabled:
        return None, None
    return (tuple(normalize.mean.flatten().tolist()), tuple(normalize.std.flatten().tolist()))


@contextlib.contextmanager
def _borrowed(pipeline: PurifiedModel) -> Iterator[None]:
    """Give the pipeline's classifier, normalisation and purifier back as they were: their
    devices, train/eval modes and requires_grad flags."""
    modules = [pipeline.classifier, pipeline.normalize, pipeline.purifier]
    devices = [next((t.device for t in (*m.parameters(), *m.buffers())), None) for m in modules]
    modes = {m: m.training for module in modules for m in module.modules()}
    flags = {p: p.requires_grad for module in modules for p in module.parameters()}
    try:
        yield
    finally:
        for module, device in zip(modules, devices):
            if device is not None:
                module.to(device)
        for module, training in modes.items():
            module.training = training
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
