"""Train a diffusers UNet2DModel denoiser: epsilon-prediction MSE with EMA weights.

    accelerate launch -m purifyguard.train diffusion --data fashion-mnist --optimizer-steps 4000 \\
        --t-max 300

Purification only visits t <= t*, so --t-max trains the steps [1, t_max] alone (cheaper).
The export (output_dir/final) is an unguided purifier in the Hub layout. --init-from continues
a purifier's denoiser (a registered name such as fashion-mnist-ddpm, a folder or a Hub id): its
architecture and weights start the run, the EMA starts from them too, and its noise schedule is
kept (the optimizer starts afresh: an export keeps no optimizer state).
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from purifyguard.data import load_dataset
from purifyguard.files import read_json
from purifyguard.train.options import (
    HelpFormatter,
    add_common_arguments,
    decay_rate,
    int_list,
    parse_with_config,
    positive_int,
    positive_int_list,
    text,
)

if TYPE_CHECKING:  # heavy imports wait for main(): --help stays fast
    from diffusers import UNet2DModel


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="purifyguard train diffusion", description=__doc__,
                                     formatter_class=HelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--unet-config", type=text,
                        help="JSON file of UNet2DModel settings, used instead of --channels, "
                             "--block-out-channels, --layers-per-block and --attention-levels "
                             "(default: none)")
    parser.add_argument("--image-size", type=positive_int, default=28,
                        help="side of the images the denoiser is trained on")
    parser.add_argument("--channels", type=positive_int, default=1, help="image channels")
    parser.add_argument("--block-out-channels", type=positive_int_list, default=(32, 64, 64),
                        help="channels of each resolution level, comma-separated")
    parser.add_argument("--layers-per-block", type=positive_int, default=1,
                        help="ResNet layers per level")
    parser.add_argument("--attention-levels", type=int_list, default=(1,),
                        help="which resolution levels (0 = full) carry self-attention")
    parser.add_argument("--num-train-timesteps", type=positive_int, default=1000,
                        help="T, the diffusion steps of the noise schedule")
    parser.add_argument("--beta-schedule", type=text, default="linear",
                        help="the DDPMScheduler's beta schedule")
    parser.add_argument("--t-max", type=positive_int,
                        help="train only t in [1, t_max] (default: all of [1, T])")
    parser.add_argument("--ema-decay", type=decay_rate, default=0.999,
                        help="decay of the exported EMA weights")
    parser.add_argument("--export-t-star", type=positive_int, default=100,
                        help="t* of the exported purifier")
    parser.add_argument("--init-from", type=text,
                        help="a purifier whose denoiser the run continues (registered name, "
                             "folder or Hub id): its UNet and noise schedule replace the "
                             "architecture and schedule options (default: a new UNet)")
    return parser


# What --init-from takes from the purifier instead of the options that would describe it.
ARCHITECTURE_OPTIONS = ("unet_config", "block_out_channels", "layers_per_block",
                        "attention_levels")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, checked (argparse's exit status 2 for a bad one)."""
    parser = build_parser()
    args = parse_with_config(parser, argv)
    if args.t_max is not None and args.t_max > args.num_train_timesteps:
        parser.error(f"argument --t-max: expected an integer in [1, {args.num_train_timesteps}] "
                     f"(--num-train-timesteps), got {args.t_max}")
    if args.init_from is not None:
        given = [f"--{dest.replace('_', '-')}" for dest in ARCHITECTURE_OPTIONS
                 if getattr(args, dest) != parser.get_default(dest)]
        if given:
            parser.error(f"argument --init-from: the denoiser's architecture comes from the "
                         f"purifier {args.init_from!r}; drop {', '.join(given)}")
    return args


def initial_denoiser(args: argparse.Namespace) -> tuple[UNet2DModel, dict]:
    """(a trainable copy of --init-from's denoiser, its scheduler config); ValueError naming
    --init-from when the purifier cannot be loaded or does not fit --image-size, --channels,
    --num-train-timesteps and --beta-schedule."""
    from purifyguard.registry import load_purifier

    try:
        purifier = load_purifier(args.init_from)
    except (OSError, ValueError) as error:
        raise ValueError(f"--init-from: cannot load {args.init_from!r}: {error}") from None
    unet, schedule = purifier.unet, purifier.schedule.scheduler_config
    expected = {
        "--image-size": (args.image_size, unet.config.sample_size),
        "--channels": (args.channels, unet.config.in_channels),
        "--num-train-timesteps": (args.num_train_timesteps, schedule["num_train_timesteps"]),
        "--beta-schedule": (args.beta_schedule, schedule["beta_schedule"]),
    }
    for option, (given, theirs) in expected.items():
        if given != theirs:
            raise ValueError(f"--init-from: {args.init_from!r} has {option} {theirs!r}, the run "
                             f"{given!r}; give {option} {theirs}")
    trainable = type(unet).from_config(unet.config)
    trainable.load_state_dict(unet.state_dict())
    return trainable.requires_grad_(True), schedule


def build_unet(args: argparse.Namespace) -> UNet2DModel:
    from diffusers import UNet2DModel

    if args.unet_config:
        return UNet2DModel(**read_json(args.unet_config, "UNet config"))
    levels = range(len(args.block_out_channels))
    return UNet2DModel(
        sample_size=args.image_size,
        in_channels=args.channels,
        out_channels=args.channels,
        block_out_channels=args.block_out_channels,
        layers_per_block=args.layers_per_block,
        down_block_types=tuple(
            "AttnDownBlock2D" if i in args.attention_levels else "DownBlock2D" for i in levels
        ),
        up_block_types=tuple(
            "AttnUpBlock2D" if i in args.attention_levels else "UpBlock2D" for i in reversed(levels)
        ),
        norm_num_groups=math.gcd(32, *args.block_out_channels),
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Heavy imports after parsing, so that --help answers at once.
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    from purifyguard.purifier import Purifier
    from purifyguard.train.run import TrainingRun

    if args.init_from is None:
        unet = build_unet(args)
        scheduler = DDPMScheduler(
            num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule
        )
    else:
        try:
            unet, schedule = initial_denoiser(args)
        except ValueError as error:
            raise SystemExit(f"purifyguard train diffusion: error: {error}") from None
        scheduler = DDPMScheduler.from_config(schedule)
    run = TrainingRun(args, "diffusion", argv)
    t_max = args.num_train_timesteps if args.t_max is None else args.t_max
    dataset = run.training_part(
        load_dataset(args.data, args.data_root, train=True, image_size=args.image_size))

    ema = EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=UNet2DModel,
                   model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    unet, optimizer, loader = run.prepare(unet, optimizer, run.loader(dataset))
    ema.to(run.device)
    run.register("ema", ema)
    start = run.resume()
    batches = run.batches(loader)

    unet.train()
    bar = run.progress(start)
    for step in bar:
        for _ in range(args.grad_accum):
            images, _ = next(batches)
            x0 = _fit_size(images, args.image_size) * 2 - 1
            noise = torch.randn_like(x0)
            t = torch.randint(0, t_max, (x0.shape[0],), device=x0.device)
            with run.accelerator.accumulate(unet):
                predicted = unet(scheduler.add_noise(x0, noise, t), t).sample
                loss = F.mse_loss(predicted.float(), noise.float())
                run.accelerator.backward(loss)
                if run.accelerator.sync_gradients:
                    run.accelerator.clip_grad_norm_(unet.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
            run.count_images(x0.shape[0])
        ema.step(unet.parameters())
        if run.should(args.log_every, step):
            run.log(bar, step + 1, {"loss": run.accelerator.reduce(loss.detach(), "mean").item()})
        if run.should(args.checkpoint_every, step):
            run.save_checkpoint(step + 1)

    if run.is_main:
        export = run.accelerator.unwrap_model(unet)
        ema.copy_to(export.parameters())
        t_star = min(args.export_t_star, t_max)
        training = run.training_record(**{"t range": f"[1, {t_max}]", "ema decay": args.ema_decay})
        purifier = Purifier(export.eval(), scheduler, t_star=t_star, training_data=args.data,
                            extra={"training": training})
        purifier.save_pretrained(run.output_dir / "final")
        print(f"exported the EMA denoiser as an unguided purifier to {run.output_dir / 'final'}")
    run.finish()


def _fit_size(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
