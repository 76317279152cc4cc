"""Stage a purifier guided by another guidance network, to evaluate it before anything is bundled.

    python scripts/stage_purifier.py --guidance-network <trained network folder> \
        --output <staging folder> [--purifier fashion-mnist-agdm] [--setting guidance_scale=400]

The purifier (registered name, folder or Hub id; default the bundled fashion-mnist-agdm) keeps its
denoiser and settings and is guided by the network in --guidance-network (a classifier folder as
`purifyguard train guidance` exports it: config.json + model.safetensors). --setting changes a
setting (repeatable). The result is saved in the Hub layout, so benchmarks/choose_settings.py,
benchmarks/fashion_mnist.py and `purifyguard evaluate` take the folder as --purifier.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from purifyguard.evaluation.cli import parse_settings
from purifyguard.guidance_network_format import load_guidance_network
from purifyguard.registry import load_purifier


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guidance-network", type=Path, required=True,
                        help="folder of the guidance network (config.json + model.safetensors)")
    parser.add_argument("--purifier", default="fashion-mnist-agdm",
                        help="registered name, folder or Hub id whose denoiser and settings stay")
    parser.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting, e.g. guidance_scale=800 (repeatable)")
    parser.add_argument("--output", type=Path, required=True, help="the staging folder to write")
    args = parser.parse_args(argv)
    if not (args.guidance_network / "config.json").is_file():
        parser.error(f"--guidance-network {args.guidance_network}: expected a folder with "
                     "config.json and model.safetensors")
    try:
        changes = parse_settings(args.setting, "--setting")
        network = load_guidance_network(args.guidance_network)
        staged = load_purifier(args.purifier).with_guidance_network(network, **changes)
    except ValueError as error:
        parser.error(str(error))
    staged.save_pretrained(args.output)
    print(f"wrote {args.output}: {args.purifier} guided by {args.guidance_network.name} "
          f"({staged.current_config().guidance_scale:g} guidance scale)")


if __name__ == "__main__":
    main()
