"""The purifyguard command line: demo, train, evaluate, compare, list."""

from __future__ import annotations

import argparse
import os
import sys

from purifyguard import __version__


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        # Each routine parses its own options (and --config files).
        from purifyguard.train.__main__ import main as train

        train(argv[1:])
        return

    parser = argparse.ArgumentParser(
        prog="purifyguard",
        description="Robust diffusion purification with adversarial guidance.",
    )
    parser.add_argument("--version", action="version", version=f"purifyguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    commands.add_parser("train", help="train a routine: diffusion, guidance or adapt "
                        "(purifyguard train <routine> --help)")

    from purifyguard import demo
    from purifyguard.evaluation import cli as evaluation_cli

    demo.add_arguments(commands.add_parser(
        "demo", help="attack the bundled classifier with and without the bundled purifier"))
    evaluation_cli.add_arguments(commands.add_parser(
        "evaluate", help="clean and robust accuracy under adaptive attacks"), "evaluate")
    evaluation_cli.add_arguments(commands.add_parser(
        "compare", help="several defences side by side on the same images and attacks"),
        "compare")
    commands.add_parser("list", help="the registered purifiers")

    args = parser.parse_args(argv)
    if args.command in ("demo", "evaluate", "compare"):
        _run_reporting_errors(args, demo.run if args.command == "demo" else evaluation_cli.run)
    elif args.command == "list":
        from purifyguard.registry import list_purifiers, registered

        for name in list_purifiers():
            entry = registered(name)
            default = " (default)" if entry.default else ""
            print(f"{name}{default}: {entry.channels}x{entry.resolution}x{entry.resolution}, "
                  f"{entry.description}")


def _run_reporting_errors(args: argparse.Namespace, command) -> None:
    """Run a command; a problem with its options, files or data (ValueError, a missing file, an
    output folder in use) ends it with the message alone and exit status 1, not a traceback.
    PURIFYGUARD_DEBUG=1 shows the traceback."""
    from purifyguard.evaluation.harness import OutputFolderInUse

    try:
        command(args)
    except (ValueError, OSError, OutputFolderInUse) as error:
        if os.environ.get("PURIFYGUARD_DEBUG"):
            raise
        print(f"purifyguard {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
