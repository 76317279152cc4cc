"""What an iterative attack saw on its way: for each gradient iteration, how many of the
crafting draws (the EOT samples the gradient was computed on) still classify each example
correctly. The harness stores it with the batch; convergence.py turns it into the curve of
robust accuracy against iterations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttackTrace:
    """Per iteration, the count of correct crafting draws of every example (draws per iteration:
    `draws`); restart_starts: the iterations (0-based) where a restart began."""

    draws: int = 0
    correct: list[list[int]] = field(default_factory=list)
    restart_starts: list[int] = field(default_factory=list)

    def record(self, correct: torch.Tensor) -> None:
        """One iteration's (draws, N) table of right (True) and wrong answers."""
        self.draws = int(correct.shape[0])
        self.correct.append(correct.sum(0).tolist())

    def start_restart(self) -> None:
        self.restart_starts.append(len(self.correct))

    def to_record(self) -> dict[str, Any]:
        return {"draws": self.draws, "correct": self.correct,
                "restart_starts": self.restart_starts or [0]}
