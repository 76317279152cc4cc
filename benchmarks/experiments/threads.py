"""Threads: the demo's wall time at --threads 1, auto and torch's own default, on an idle machine
and beside one other CPU-bound process, side by side in one run.

    python benchmarks/experiments/threads.py                      # the demo's defaults
    python benchmarks/experiments/threads.py --demo-args "--n 64 --adaptive-n 4" --repeats 1

Each setting runs `purifyguard demo` in a fresh process (so OpenMP starts as a user's would):
"1 thread" (--threads 1), "auto" (the default: the cores other work leaves idle, OpenMP's idle
threads asleep) and "torch default" (--threads at the machine's core count, OpenMP's own wait
policy, as plain torch runs). "loaded" runs a CPU-bound process beside it (a one-thread matrix
product loop); "idle" runs nothing beside it. It prints seconds and the ratio to one thread under
the same condition. Other work on the machine counts as load too: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time

from purifyguard.option_types import positive_int

LOAD = ("import torch\ntorch.set_num_threads(1)\nx = torch.randn(512, 512)\n"
        "while True:\n    x = (x @ x).tanh()\n")


def run_demo(threads: str, demo_args: list[str], sleeping: bool) -> float:
    """Wall seconds of one demo in a fresh process."""
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    # Plain torch: torch (and OpenMP) loaded before the command line could ask for sleeping
    # threads, so OpenMP keeps its own wait policy.
    start_torch = "import torch\n" if not sleeping else ""
    code = f"{start_torch}import sys\nfrom purifyguard.cli import main\nmain(sys.argv[1:])"
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-c", code, "demo", "--threads", threads,
                   "--no-progress", "--output-dir", folder, *demo_args]
        start = time.perf_counter()
        subprocess.run(command, check=True, env=environment, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-args", default="", help="options passed on to purifyguard demo")
    parser.add_argument("--repeats", type=positive_int, default=1, help="runs of each setting")
    parser.add_argument("--settle", type=positive_int, default=60,
                        help="seconds to wait after starting or stopping the load (the load "
                        "average the auto setting reads is a one-minute average)")
    args = parser.parse_args()
    demo_args = shlex.split(args.demo_args)
    cores = str(os.cpu_count() or 1)
    settings = {"1 thread": ("1", True), "auto": ("auto", True), "torch default": (cores, False)}
    print(f"purifyguard demo {args.demo_args or '(defaults)'}; {cores} cores; "
          f"{args.repeats} run(s) each, best shown")
    print("| condition | setting | seconds | x one thread |\n|---|---|---|---|")
    for condition in ("idle", "loaded"):
        load = None
        if condition == "loaded":
            quiet = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
            load = subprocess.Popen([sys.executable, "-c", LOAD], env=quiet)
        time.sleep(args.settle)
        try:
            seconds = {name: min(run_demo(threads, demo_args, sleeping)
                                 for _ in range(args.repeats))
                       for name, (threads, sleeping) in settings.items()}
        finally:
            if load is not None:
                load.kill()
                load.wait()
        for name, value in seconds.items():
            print(f"| {condition} | {name} | {value:.0f} | {value / seconds['1 thread']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
