"""How many CPU threads torch uses: the --threads option of the long commands, and its default.

torch starts one intra-op thread per core. On a machine whose cores are busy with other work that
is a trap: each parallel region waits for its slowest thread, and a thread that shares its core
with another process runs at a fraction of its speed, so two threads on a loaded 2-core machine
run several times slower than one (docs/performance.md, "Threads"). The default here counts the
cores the other work leaves idle (os.cpu_count() minus the one-minute load average, at least one)
and uses no more threads than that, nor more than torch would. OpenMP's idle threads are told to
sleep rather than spin (OMP_WAIT_POLICY=PASSIVE) when the command line sets this up before torch
loads; a value the user set in the environment wins.
"""

from __future__ import annotations

import argparse
import math
import os

THREADS_HELP = ("torch CPU threads; 'auto' uses the cores that other work leaves idle (the "
                "one-minute load average), at least 1 (docs/performance.md, \"Threads\")")


def threads_option(text: str | int) -> int | None:
    """argparse type of --threads: a positive integer, or 'auto' (None)."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if value < 1 or str(value) != str(text).strip():
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def add_threads_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--threads", type=threads_option, default=None, metavar="N|auto",
                        help=f"{THREADS_HELP} (default: auto)")


def prefer_sleeping_threads() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless set: OpenMP reads it once, when torch first loads."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def idle_cores(cpu_count: int | None = None, load: float | None = None) -> int:
    """Cores that other work leaves idle: cpu_count minus the one-minute load average, >= 1."""
    if cpu_count is None:
        cpu_count = os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # not on this platform
            load = 0.0
    return max(1, min(cpu_count, math.floor(cpu_count - load + 0.5)))


_torch_default: int | None = None  # torch's own thread count, before this module set one


def use_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: `threads`, or with None the default above. Returns it."""
    import torch

    global _torch_default
    if _torch_default is None:
        _torch_default = torch.get_num_threads()
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"threads must be a positive integer or None (auto), got {threads!r}")
    chosen = threads if threads is not None else min(_torch_default, idle_cores())
    torch.set_num_threads(chosen)
    return chosen
