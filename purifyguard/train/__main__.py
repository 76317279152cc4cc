"""accelerate launch -m purifyguard.train <routine> [options]"""

from __future__ import annotations

import importlib
import os
import sys

from purifyguard.threads import prefer_sleeping_threads

ROUTINES = {
    "diffusion": "train the denoiser (a diffusers UNet2DModel, with EMA weights)",
    "guidance": "train the guidance network / classifier (TRADES or standard)",
    "adapt": "fine-tune a purifier's guidance to a classifier",
}


def routine_list() -> str:
    """The routines, one a line: name and what it trains."""
    width = max(map(len, ROUTINES))
    return "\n".join(f"  {name:<{width}}  {what}" for name, what in ROUTINES.items())


def usage() -> str:
    return (
        f"usage: purifyguard train {{{','.join(ROUTINES)}}} [options]\n\n"
        "routines:\n" + routine_list() + "\n\n"
        "purifyguard train <routine> --help lists a routine's options.\n"
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    prefer_sleeping_threads()  # before torch loads (accelerate launch -m purifyguard.train)
    if argv and argv[0] in ("-h", "--help"):
        print(usage(), end="")
        raise SystemExit(0)
    if not argv or argv[0] not in ROUTINES:
        problem = "a routine is needed" if not argv else f"unknown routine {argv[0]!r}"
        print(usage() + f"purifyguard train: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    routine = importlib.import_module(f"purifyguard.train.{argv[0]}")
    try:
        routine.main(argv[1:])
    except (ValueError, OSError) as error:
        # A problem with the options, files, data or checkpoints: the message alone, exit 1
        # (PURIFYGUARD_DEBUG=1 shows the traceback).
        if os.environ.get("PURIFYGUARD_DEBUG"):
            raise
        print(f"purifyguard train {argv[0]}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
