"""Adapt a purifier to a classifier: fine-tune the guidance network and the guidance scale end to
end, so that classifier(purify(x_adv)) is right (docs/method.md, section 5, "Adaptation").

    loss  = w * CE(f(purify(x)), y) + (1 - w) * CE(f(purify(x_adv)), y),   w = --clean-weight
    x_adv = PGD on CE(f(purify(x')), y) inside the L-inf eps-ball, through the same purifier

    accelerate launch -m purifyguard.train adapt --purifier runs/agdm/final \\
        --classifier runs/classifier/final --eps 0.1 --attack-steps 3 --sampler-steps 2

Both the attack and the training forward run a few-step process (--train-sampler, --sampler-steps)
with full gradients: the surrogate of the defended process, whose settings the export keeps.
The denoiser and the classifier stay frozen and in eval mode. The guidance network also stays in
eval mode while its weights train: BatchNorm keeps the running statistics it learnt with TRADES,
since batch statistics of x0_hat change from one reverse step to the next. Its classifier head
trains only when the purifier's class term (class_weight > 0) reads it. The guidance scale is
trained as it is and clamped to >= MIN_SCALE after every step, so that it stays positive.
The export (output_dir/final) is the adapted purifier, written by Purifier.save_pretrained.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from purifyguard.config import SAMPLERS
from purifyguard.data import load_dataset
from purifyguard.train.options import (
    HelpFormatter,
    add_common_arguments,
    non_negative_float,
    non_negative_int,
    parse_with_config,
    positive_float,
    positive_int,
    text,
    unit_interval,
)

MIN_SCALE = 1e-3

if TYPE_CHECKING:  # heavy imports wait for main(): --help stays fast
    from purifyguard.purifier import Purifier


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="purifyguard train adapt", description=__doc__,
                                     formatter_class=HelpFormatter)
    add_common_arguments(parser)
    parser.set_defaults(lr=1e-4, batch_size=32)
    parser.add_argument("--purifier", type=text, required=True, help="purifier folder "
                        "(save_pretrained), registered name or Hub repo id, with adversarial "
                        "guidance")
    parser.add_argument("--classifier", type=text, required=True,
                        help="folder of a timm classifier (as the guidance routine exports it)")
    parser.add_argument("--eps", type=non_negative_float, default=0.1,
                        help="L-inf radius of the attack")
    parser.add_argument("--attack-steps", type=non_negative_int, default=3,
                        help="PGD steps per batch")
    parser.add_argument("--attack-step-size", type=positive_float,
                        help="PGD step size (default: 2.5 * eps / attack_steps)")
    parser.add_argument("--train-sampler", type=text, default="ddim", choices=SAMPLERS,
                        help="sampler of the few-step process used for the attack and training")
    parser.add_argument("--sampler-steps", "--train-steps", dest="train_steps", metavar="N",
                        type=positive_int, default=2,
                        help="reverse steps of that process (ddim; --train-steps is the old name; "
                             "config key: train_steps)")
    parser.add_argument("--clean-weight", type=unit_interval, default=0.5,
                        help="weight of the clean CE; the adversarial CE gets 1 - this")
    parser.add_argument("--scale-lr", type=positive_float, default=0.01,
                        help="Adam learning rate of the guidance scale (absolute units of s)")
    return parser


class AdaptedModel(nn.Module):
    """classifier(purify(x)) through the few-step training purifier.

    Only the trainable parts are registered (guidance network and scale), so checkpoints and
    DistributedDataParallel hold just those; the frozen denoiser and classifier sit in a tuple.
    """

    def __init__(self, purifier: Purifier, classifier: nn.Module) -> None:
        from purifyguard.purified_model import PurifiedModel
        
        super().__init__()
        self.guidance_network = purifier.guidance_network
        self.guidance_scale = purifier.guidance_scale
        self.frozen = (PurifiedModel(classifier, purifier),)

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


def main(argv: list[str] | None = None) -> None:
    args = parse_with_config(build_parser(), argv)
    # Heavy imports after parsing, so that --help answers at once.
    from purifyguard.guidance_network_format import load_guidance_network
    from purifyguard.purifier import Purifier
    from purifyguard.registry import load_purifier
    from purifyguard.train.run import TrainingRun

    run = TrainingRun(args, "adapt", argv)
    step_size = args.attack_step_size or 2.5 * args.eps / max(args.attack_steps, 1)
    defended = load_purifier(args.purifier)
    if defended.config.guidance != "adversarial" or defended.guidance_network is None:
        raise ValueError(f"{args.purifier}: adapt needs a purifier with adversarial guidance, "
                         f"got guidance={defended.config.guidance!r}")
    classifier = load_guidance_network(Path(args.classifier)).requires_grad_(False).eval()
    dataset = run.training_part(load_dataset(args.data, args.data_root, train=True))

    few_steps = {"n_steps": args.train_steps} if args.train_sampler == "ddim" else {}
    purifier = defended.with_settings(
        sampler=args.train_sampler, gradient_mode="full", checkpointing=False,
        fixed_noise=False, **few_steps,
    ).to(run.device)
    classifier.to(run.device)
    network = purifier.guidance_network.requires_grad_(True).eval()
    if purifier.config.class_weight == 0:  # the head never reaches the loss: leave it be
        network.get_classifier().requires_grad_(False)
    purifier.guidance_scale.requires_grad_(True)

    model = AdaptedModel(purifier, classifier)
    optimizer = torch.optim.Adam([
        {"params": [p for p in network.parameters() if p.requires_grad], "lr": args.lr},
        {"params": [purifier.guidance_scale], "lr": args.scale_lr},
    ])
    model, optimizer, loader = run.prepare(model, optimizer, run.loader(dataset))
    start = run.resume()
    batches = run.batches(loader)
    attacked = run.accelerator.unwrap_model(model)  # the attack's backward skips DDP's hooks

    bar = run.progress(start)
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
            run.log(bar, step + 1, {**metrics, "guidance_scale": purifier.guidance_scale.item()})
        if run.should(args.checkpoint_every, step):
            run.save_checkpoint(step + 1)

    if run.is_main:
        config = defended.config
        adaptation = run.training_record(**{
            "classifier": str(args.classifier), "eps": args.eps,
            "attack steps": args.attack_steps, "clean weight": args.clean_weight,
            "training process": f"{args.train_sampler}, {args.train_steps} steps",
        })
        adapted = Purifier(
            defended.unet, defended.schedule.scheduler_config, network,
            config.replace(
                guidance_scale=float(purifier.guidance_scale.detach()),
                training_data=config.training_data or args.data,
                extra={**config.extra, "adaptation": adaptation},
            ),
        )
        adapted.save_pretrained(run.output_dir / "final")
        print(f"guidance scale {config.guidance_scale:.4g} -> {adapted.config.guidance_scale:.4g}; "
              f"exported the adapted purifier to {run.output_dir / 'final'}")
    run.finish()
