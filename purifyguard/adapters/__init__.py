"""Adapters to tools people already use: ART (art.py) and a RobustBench-style benchmark
(robustbench.py). Import the submodule you need; ART is optional and only art.py imports it."""
