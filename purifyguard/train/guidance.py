"""Train the auxiliary guidance network (any timm model) with TRADES (Zhang et al., 2019).

    loss = CE(h(x), y) + beta * KL(h(x) || h(x')),  x' = PGD on the KL inside the eps-ball

    accelerate launch -m purifyguard.train guidance --model resnet18 \\
        --model-kwargs '{"channels": [16, 32, 64, 128]}' --eps 0.1 --beta 6 --pgd-steps 10

--teacher makes the targets y a given classifier's own clean predictions, so the robust latent
space follows that classifier's semantics: any classifier `purifyguard train adapt --classifier`
takes (a classifier folder, a timm or torchvision name with --teacher-checkpoint or
--teacher-pretrained), read through the input handling of a deployed PurifiedModel
(--teacher-mean, --teacher-std, --teacher-input-size; a torchvision model needs them, or
--teacher-pretrained, whose weights' transforms give them). --beta 0 --pgd-steps 0 is plain
training, which is how the standard classifier of the demo is trained. The export (output_dir/final) is
the network as safetensors with its timm architecture and kwargs.

With --validation-size N the run holds N training images out, measures clean and PGD accuracy
on them every --validate-every steps (default: once an epoch), logs the learning curve, keeps
the best network in output_dir/best (robust accuracy decides when the run is adversarial,
clean accuracy otherwise) and exports it (--export best), since robust training overfits.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from purifyguard.data import load_dataset
from purifyguard.files import write_atomic, write_json
from purifyguard.train.inputs import (
    add_classifier_arguments,
    check_pipeline,
    classifier_from_options,
    flags_of,
)
from purifyguard.train.options import (
    HelpFormatter,
    add_common_arguments,
    json_object,
    non_negative_float,
    non_negative_int,
    parse_with_config,
    positive_float,
    positive_int,
    text,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="purifyguard train guidance", description=__doc__,
                                     formatter_class=HelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--model", type=text, default="resnet18", help="timm architecture name")
    parser.add_argument("--model-kwargs", type=json_object, default={},
                        help='JSON of extra timm.create_model kwargs, e.g. {"channels": [16, 32, 64, 128]}')
    parser.add_argument("--num-classes", type=positive_int, default=10,
                        help="classes of the data set")
    parser.add_argument("--in-chans", type=positive_int, default=1, help="image channels")
    parser.add_argument("--eps", type=non_negative_float, default=0.1,
                        help="L-inf radius of the threat model")
    parser.add_argument("--beta", type=non_negative_float, default=6.0,
                        help="weight of the TRADES KL term (0: plain training)")
    parser.add_argument("--pgd-steps", type=non_negative_int, default=10,
                        help="PGD steps of the TRADES adversary (0: plain training)")
    parser.add_argument("--pgd-step-size", type=positive_float,
                        help="PGD step size (default: eps / 4)")
    add_classifier_arguments(parser, "teacher", "a classifier whose clean predictions become "
                             "the targets", required=False, absent="none: the data set's labels")
    parser.add_argument("--weight-decay", type=non_negative_float, default=5e-4,
                        help="SGD weight decay")
    parser.add_argument("--augment", action="store_true",
                        help="random crops (2-pixel padding) and horizontal flips")
    parser.add_argument("--eval-images", type=positive_int, default=10000,
                        help="test images for the final clean accuracy")
    validation = parser.add_argument_group("validation (with --validation-size)")
    validation.add_argument("--validate-every", type=positive_int,
                            help="optimizer steps between validations (default: one epoch)")
    validation.add_argument("--validation-images", type=positive_int, default=1000,
                            help="held-out images measured at each validation")
    validation.add_argument("--validation-attack-steps", type=non_negative_int, default=10,
                            help="PGD steps (L-inf --eps, step eps / 4, random start) of the "
                            "robust validation; 0 measures clean accuracy only")
    validation.add_argument("--export", choices=("best", "last"), default="best",
                            help="network exported to output_dir/final: the best validated one "
                            "or the last one")
    return parser


def raw_input_config(image_shape: torch.Size) -> dict:
    """The network reads images in [0, 1] as they are: say so in its timm pretrained config,
    so that PurifiedModel applies no ImageNet normalisation to it."""
    channels, height, width = image_shape
    return {"mean": [0.0] * channels, "std": [1.0] * channels,
            "input_size": [channels, height, width]}


def augment(images: torch.Tensor, padding: int = 2) -> torch.Tensor:
    """A random crop of each zero-padded image, flipped left-right half of the time."""
    n, _, height, width = images.shape
    padded = F.pad(images, [padding] * 4)
    rows = torch.randint(0, 2 * padding + 1, (n,)).tolist()
    cols = torch.randint(0, 2 * padding + 1, (n,)).tolist()
    crops = torch.stack([padded[i, :, r:r + height, c:c + width]
                         for i, (r, c) in enumerate(zip(rows, cols))])
    flip = torch.rand(n, device=images.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), crops.flip(-1), crops)


def trades_adversary(
    model: nn.Module, x: torch.Tensor, eps: float, steps: int, step_size: float
) -> torch.Tensor:
    """x' maximising KL(h(x) || h(x')) by L-inf PGD inside the eps-ball, within [0, 1]."""
    if steps == 0 or eps == 0:
        return x
    was_training = model.training
    model.eval()
    with torch.no_grad():
        clean = F.softmax(model(x), dim=1)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), clean, reduction="sum")
        gradient, = torch.autograd.grad(kl, x_adv)
        x_adv = x_adv.detach() + step_size * gradient.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    model.train(was_training)
    return x_adv.detach()


def trades_loss(
    logits: torch.Tensor, logits_adv: torch.Tensor, targets: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, KL term): CE on clean images plus beta times the batch-mean KL."""
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1),
                  reduction="batchmean")
    return F.cross_entropy(logits, targets) + beta * kl, kl


def main(argv: list[str] | None = None) -> None:
    args = parse_with_config(build_parser(), argv)
    # Heavy imports after parsing, so that --help answers at once.
    from purifyguard.guidance_network_format import (
        create_guidance_network,
        load_guidance_network,
        save_guidance_network,
    )
    from purifyguard.model_card import network_card
    from purifyguard.train.run import TrainingRun
    from purifyguard.train.validation import Validator

    # The one-cycle schedule is built for --steps: a resumed run must keep it.
    run = TrainingRun(args, "guidance", argv, extendable=False)
    step_size = args.pgd_step_size or args.eps / 4
    full_training_set = load_dataset(args.data, args.data_root, train=True)
    dataset = run.training_part(full_training_set)
    validator = Validator(args, run, run.validation_part(full_training_set), len(dataset))
    model = create_guidance_network(
        args.model, num_classes=args.num_classes, in_chans=args.in_chans,
        pretrained_cfg_overlay=raw_input_config(dataset[0][0].shape), **args.model_kwargs,
    )
    teacher = None
    if args.teacher:  # behind its deployed input handling (normalisation, size), checked
        teacher = classifier_from_options(args, "teacher", full_training_set)
        check_pipeline(teacher, full_training_set, flags_of("teacher"),
                       explicit_size=args.teacher_input_size is not None)
        teacher = teacher.requires_grad_(False).to(run.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                                weight_decay=args.weight_decay, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr,
                                                   total_steps=args.steps, pct_start=0.15)
    model, optimizer, loader, schedule = run.prepare(
        model, optimizer, run.loader(dataset), schedule
    )
    start = run.resume()
    validator.restore()
    batches = run.batches(loader)

    model.train()
    bar = run.progress(start)
    for step in bar:
        for _ in range(args.grad_accum):
            images, labels = next(batches)
            if args.augment:
                images = augment(images)
            if teacher is not None:
                with torch.no_grad():
                    labels = teacher(images).argmax(1)
            robust = args.beta > 0 and args.pgd_steps > 0
            if robust:
                adversarial = trades_adversary(model, images, args.eps, args.pgd_steps, step_size)
            with run.accelerator.accumulate(model):
                if robust:
                    clean, adv = model(torch.cat([images, adversarial])).chunk(2)
                    loss, kl = trades_loss(clean, adv, labels, args.beta)
                else:
                    clean = model(images)
                    loss, kl = F.cross_entropy(clean, labels), torch.zeros((), device=run.device)
                run.accelerator.backward(loss)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
            run.count_images(images.shape[0])
        if run.should(args.log_every, step):
            accuracy = (clean.argmax(1) == labels).float().mean()
            metrics = {"loss": loss.detach(), "kl": kl.detach(), "train_accuracy": accuracy}
            run.log(bar, step + 1, {
                name: run.accelerator.reduce(value, "mean").item() for name, value in metrics.items()
            })
        if validator.should(step):
            validator.validate(run.accelerator.unwrap_model(model), step + 1, bar)
        if run.should(args.checkpoint_every, step):
            run.save_checkpoint(step + 1)

    model = run.accelerator.unwrap_model(model).eval()
    if validator.active and args.export == "best" and validator.best.best is not None:
        model = load_guidance_network(validator.best.folder).to(run.device).eval()
    accuracy = clean_accuracy(model, args, run.device)
    if run.is_main:
        final = run.output_dir / "final"
        # timm's Hub format (timm.models.save_for_hf, safetensors only): timm.create_model(
        # "local-dir:<final>", pretrained=True) loads it, and so does load_guidance_network.
        architecture, kwargs = save_guidance_network(model, final)
        metrics = {"clean_accuracy": accuracy, "n_examples": args.eval_images,
                   "dataset_split": "test"}
        training = run.training_record(**_objective(args, step_size), **validator.record())
        write_json(final / "metrics.json", metrics)
        write_atomic(final / "README.md", network_card(
            architecture, kwargs, title=f"{architecture} trained by purifyguard",
            description=_objective(args, step_size)["objective"], training=training,
            metrics=metrics, dataset=args.data if args.data != "imagefolder" else None,
            sections=validator.card_sections(final),
        ))
        print(f"clean test accuracy {accuracy:.4f} on {args.eval_images} images; "
              f"exported to {final}")
    run.finish()


def _objective(args: argparse.Namespace, step_size: float) -> dict[str, str]:
    if args.beta == 0 or args.pgd_steps == 0:
        objective = "Standard training (cross-entropy on clean images)."
    else:
        objective = (f"TRADES adversarial training, L-inf eps = {args.eps}, beta = {args.beta}, "
                     f"{args.pgd_steps} PGD steps of {step_size:g} on the KL term.")
    if args.teacher:
        objective += f" Targets: the clean predictions of {args.teacher}."
    return {"objective": objective}


@torch.no_grad()
def clean_accuracy(model: nn.Module, args: argparse.Namespace, device: torch.device) -> float:
    """Clean accuracy on the first eval_images test images (main process)."""
    test = load_dataset(args.data, args.data_root, train=False)
    count = min(args.eval_images, len(test))
    correct = 0
    for begin in range(0, count, 500):
        batch = [test[i] for i in range(begin, min(begin + 500, count))]
        images = torch.stack([image for image, _ in batch]).to(device)
        labels = torch.tensor([label for _, label in batch], device=device)
        correct += (model(images).argmax(1) == labels).sum().item()
    return correct / count
