"""accelerate launch -m purifyguard.train <routine> [options]"""

from __future__ import annotations

import importlib
import sys

ROUTINES = ("diffusion", "guidance", "adapt")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ROUTINES:
        print(f"usage: purifyguard train {{{','.join(ROUTINES)}}} [options]  (--help for each)")
        raise SystemExit(2)
    routine = importlib.import_module(f"purifyguard.train.{argv[0]}")
    routine.main(argv[1:])


if __name__ == "__main__":
    main()
