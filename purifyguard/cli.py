"""The purifyguard command line: demo, train, evaluate, compare, merge, list.

Building the options imports no model code: torch, timm, diffusers and torchattacks load when a
command runs, so `purifyguard --help`, `purifyguard <command> --help` and `purifyguard list`
answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from purifyguard.threads import add_threads_argument, prefer_sleeping_threads, use_threads
from purifyguard.version import __version__

LIST_DESCRIPTION = """\
The registered purifiers, one a line: name, "(default)" where it is the default for classifiers
of its input shape, channels x height x width, and what it is. Any of these names goes to
--purifier and to PurifiedModel(classifier, purifier=NAME)."""

MERGE_DESCRIPTION = """\
Merge the output folders of one evaluation that ran in parts into one folder: the same images,
seed, batch size and runs, different defences in each part (evaluate_models with some of the
models each, in parallel processes or on several machines). The finished batches, each
defence's headline state, the EOT alignment and the adversarial images are copied; rerunning
the evaluation on the merged folder with every defence then attacks nothing a part finished,
and writes the report, the paired tests and the pictures of the whole.

  purifyguard merge part-ours part-baselines --into whole

Folders run with other settings (their run.json) are refused, and so are two parts holding one
file with different contents (one defence evaluated in both). A part still running is refused:
merge again when it has finished, or stopped; a second merge replaces what the first copied."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (paragraphs, examples), and each option's help ending with its
    default, unless the help says it already ("default: ...") or there is none to show (a flag,
    or an option left out by default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default in (None, argparse.SUPPRESS) or action.nargs == 0
                or "default:" in text or "(default" in text or "%(default)" in text):
            return text
        return f"{text} (default: {_shown(action)})"


def _shown(action: argparse.Action) -> str:
    """The default as it would be typed: "32,64,64" for a comma list, "a b c" for nargs="+"."""
    value = action.default
    if isinstance(value, (list, tuple)):
        separator = " " if action.nargs in ("+", "*") else ","
        value = separator.join(map(str, value))
    return str(value).replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    """The parser of `purifyguard`, with one sub-parser a command (`train`'s routines parse
    their own options: purifyguard.train.__main__)."""
    from purifyguard import demo
    from purifyguard.evaluation import cli as evaluation_cli
    from purifyguard.train.__main__ import ROUTINES, routine_list

    parser = argparse.ArgumentParser(
        prog="purifyguard", formatter_class=HelpFormatter,
        description="Robust diffusion purification with adversarial guidance, in front of any "
                    "image classifier.\n\npurifyguard <command> --help lists a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"purifyguard {__version__}",
                        help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command",
                                     title="commands")
    commands.add_parser(
        "train", formatter_class=HelpFormatter,
        help=f"train a routine: {', '.join(ROUTINES)} (purifyguard train <routine> --help)",
        description="Train a routine (purifyguard train <routine> [options]).\n\nroutines:\n"
                    + routine_list(),
    )
    demo_parser = commands.add_parser(
        "demo", formatter_class=HelpFormatter, description=demo.__doc__,
        help="attack the bundled classifier with and without the bundled purifier")
    demo.add_arguments(demo_parser)
    evaluate_parser = commands.add_parser(
        "evaluate", formatter_class=HelpFormatter,
        description=evaluation_cli.DESCRIPTIONS["evaluate"],
        help="clean and robust accuracy under adaptive attacks")
    evaluation_cli.add_arguments(evaluate_parser, "evaluate")
    compare_parser = commands.add_parser(
        "compare", formatter_class=HelpFormatter,
        description=evaluation_cli.DESCRIPTIONS["compare"],
        help="several defences side by side on the same images and attacks")
    evaluation_cli.add_arguments(compare_parser, "compare")
    for long_command in (demo_parser, evaluate_parser, compare_parser):
        add_threads_argument(long_command)
    merge_parser = commands.add_parser(
        "merge", formatter_class=HelpFormatter, description=MERGE_DESCRIPTION,
        help="merge output folders of one evaluation run in parts (one defence each, say)")
    merge_parser.add_argument("sources", nargs="+", metavar="SOURCE",
                              help="output folders of `evaluate`/`compare` (--output-dir)")
    merge_parser.add_argument("--into", required=True, metavar="FOLDER",
                              help="the folder to merge into (made if missing)")
    commands.add_parser("list", formatter_class=HelpFormatter, description=LIST_DESCRIPTION,
                        help="the registered purifiers")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    prefer_sleeping_threads()  # before torch loads
    if argv and argv[0] == "train":
        # Each routine parses its own options (and --config files).
        from purifyguard.train.__main__ import main as train

        train(argv[1:])
        return

    args = build_parser().parse_args(argv)
    if args.command in ("demo", "evaluate", "compare"):
        use_threads(args.threads)
    if args.command == "demo":
        from purifyguard import demo

        _run_reporting_errors(args, demo.run)
    elif args.command in ("evaluate", "compare"):
        from purifyguard.evaluation import cli as evaluation_cli

        _run_reporting_errors(args, evaluation_cli.run)
    elif args.command == "merge":
        _run_reporting_errors(args, _merge)
    elif args.command == "list":
        _print_purifiers()


def _merge(args: argparse.Namespace) -> None:
    from purifyguard.evaluation.merge import merge_outputs

    result = merge_outputs(args.sources, args.into)
    print(f"merged {len(result['sources'])} folders into {result['into']} ({result['files']} "
          "files); rerun the evaluation there with every defence to write its report")


def _print_purifiers() -> None:
    """Print the registered purifiers (reading the registry loads no purifier)."""
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
