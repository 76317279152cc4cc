"""--threads on the long commands, and the default that leaves busy cores alone."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from purifyguard import cli
from purifyguard.threads import idle_cores, threads_option, use_threads


@pytest.mark.parametrize("cpu_count, load, expected", [
    (2, 0.0, 2),   # idle: every core
    (2, 1.0, 1),   # one other CPU-bound process: the core it leaves
    (2, 3.7, 1),   # overloaded: still one thread
    (16, 4.2, 12),
    (1, 0.0, 1),
])
def test_idle_cores_counts_what_other_work_leaves(cpu_count, load, expected):
    assert idle_cores(cpu_count, load) == expected


def test_threads_option_takes_a_positive_integer_or_auto():
    assert threads_option("3") == 3
    assert threads_option("auto") is None
    for bad in ("0", "-1", "1.5", "two", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer or 'auto'"):
            threads_option(bad)


def test_use_threads_sets_torch_and_refuses_bad_values():
    before = torch.get_num_threads()
    try:
        assert use_threads(1) == 1 and torch.get_num_threads() == 1
        automatic = use_threads(None)
        assert 1 <= automatic <= (os.cpu_count() or 1)
        for bad in (0, -2, 1.5, True, "2"):
            with pytest.raises(ValueError, match="threads must be a positive integer"):
                use_threads(bad)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command", [
    ["demo"], ["evaluate", "--classifier", "c", "--output-dir", "o"], ["compare", "--classifier", "c", "--output-dir", "o"],
])
def test_the_long_commands_take_threads(command):
    args = cli.build_parser().parse_args([*command, "--threads", "1"])
    assert args.threads == 1
    assert cli.build_parser().parse_args(command).threads is None  # auto


def test_main_sets_the_threads_before_the_command_runs(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "use_threads", lambda threads: seen.setdefault("threads", threads))
    monkeypatch.setattr(cli, "_run_reporting_errors", lambda args, command: None)
    cli.main(["demo", "--threads", "1"])
    assert seen == {"threads": 1}


def test_the_command_line_asks_openmp_to_sleep_not_spin():
    code = ("import os\nfrom purifyguard.cli import main\nmain(['list'])\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True, env={"PATH": ""})
    assert done.stdout.strip().splitlines()[-1] == "PASSIVE"


def test_training_routines_take_threads_and_a_resumed_run_may_change_them():
    from purifyguard.train import guidance
    from purifyguard.train.options import option_differences, parse_with_config

    args = parse_with_config(guidance.build_parser(), ["--threads", "1"])
    assert args.threads == 1
    assert parse_with_config(guidance.build_parser(), []).threads is None
    assert option_differences({**vars(args), "threads": 2}, vars(args)) == []
