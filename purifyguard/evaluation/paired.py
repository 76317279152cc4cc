"""Two defences compared on the same images: paired tests, not overlapping intervals.

Two robust accuracies measured on the same n images are correlated (an image easy for one is
often easy for the other), so their separate 95% intervals overlap long after the difference is
clear, or the other way round. Paired tests use the per-image outcomes instead:

- McNemar's exact test on a binary outcome per image (here the worst case: right in every one of
  the R runs): only the images where the two defences disagree count, and under "no difference"
  each of them is equally likely to favour either (a two-sided binomial test with p = 1/2);
- a paired bootstrap of the difference in mean accuracy (each image's share of the R runs
  right), resampling images: a 95% interval for the difference and a two-sided p-value.

compare_stored() reads both defences' per-run predictions from an evaluation folder's stored
batches (output_dir/batches-*.jsonl), so any evaluation that ran both on the same images and
attack can be compared after the fact; compare_attacks_stored() compares two attacks on one
defence the same way (which attack is stronger, beyond the noise).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from purifyguard.validation import check_int

CLEAN = "clean"


def mcnemar_exact(first: torch.Tensor, second: torch.Tensor) -> dict[str, Any]:
    """Exact two-sided McNemar test of two boolean per-image outcomes on the same images."""
    first, second = _paired_booleans(first, second)
    only_first = int((first & ~second).sum())
    only_second = int((~first & second).sum())
    discordant = only_first + only_second
    smaller = min(only_first, only_second)
    tail = sum(math.comb(discordant, k) for k in range(smaller + 1)) / 2**discordant
    return {"only_first": only_first, "only_second": only_second,
            "p_value": min(1.0, 2 * tail) if discordant else 1.0}


def paired_bootstrap(
    first: torch.Tensor, second: torch.Tensor, samples: int = 10_000, seed: int = 0
) -> dict[str, Any]:
    """Difference in mean (first - second) of two per-image scores on the same images, with a
    95% percentile interval and a two-sided p-value from `samples` resamplings of the images."""
    samples = check_int("samples", samples, 1)
    if first.shape != second.shape or first.dim() != 1 or len(first) == 0:
        raise ValueError(f"first and second must be non-empty 1-d tensors of one shape, got "
                         f"{tuple(first.shape)} and {tuple(second.shape)}")
    differences = first.double() - second.double()
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(differences), (samples, len(differences)), generator=generator)
    means = differences[rows].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype)).tolist()
    share_below = float((means <= 0).double().mean())
    share_above = float((means >= 0).double().mean())
    return {"difference": float(differences.mean()), "ci95": [low, high],
            "p_value": min(1.0, 2 * min(share_below, share_above)), "samples": samples}


def correct_table(output_dir: str | Path, model: str, attack: str) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """(image indices, (runs, n) boolean table) of `model` under `attack` from an evaluation
    folder's stored batches: run r counts an image when it classifies both the clean and the
    adversarial image right in run r, as the report does. attack "clean" gives clean accuracy."""
    batches: dict[str, dict[int, dict[str, Any]]] = {CLEAN: {}, attack: {}}
    for path in sorted(Path(output_dir).glob("batches-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash, as the harness skips it
            if record.get("model") == model and record.get("attack") in batches:
                batches[record["attack"]][record["batch"]] = record
    if not batches[attack]:
        raise ValueError(f"{output_dir}: no stored batches of model {model!r} under attack "
                         f"{attack!r}")
    indices, tables = [], []
    for number, record in sorted(batches[attack].items()):
        clean = batches[CLEAN].get(number)
        if clean is None:
            raise ValueError(f"{output_dir}: batch {number} of {model!r} has no clean record")
        labels = torch.tensor(record["labels"])
        right = torch.tensor(record["predictions"]) == labels
        tables.append(right & (torch.tensor(clean["predictions"]) == labels))
        start, end = record["indices"]
        indices += range(start, end)
    return torch.tensor(indices), torch.cat(tables, dim=1)


def compare_stored(
    output_dir: str | Path, first: str, second: str, attack: str, samples: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired comparison of two defences evaluated in one folder on the same images and attack:
    mean accuracy (paired bootstrap) and worst case (McNemar)."""
    result = _compare_tables(correct_table(output_dir, first, attack),
                             correct_table(output_dir, second, attack), samples, seed,
                             f"{first!r} and {second!r} were")
    return {"first": first, "second": second, "attack": attack, **result}


def compare_attacks_stored(
    output_dir: str | Path, model: str, first: str, second: str, samples: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired comparison of two attacks on one defence evaluated in one folder on the same images:
    a negative mean difference means the first attack leaves less robust accuracy (is stronger)."""
    result = _compare_tables(correct_table(output_dir, model, first),
                             correct_table(output_dir, model, second), samples, seed,
                             f"{model!r} under {first!r} and {second!r} was")
    return {"model": model, "first": first, "second": second, **result}


def _compare_tables(
    first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor],
    samples: int, seed: int, what: str,
) -> dict[str, Any]:
    (first_indices, first_table), (second_indices, second_table) = first, second
    if not torch.equal(first_indices, second_indices):
        raise ValueError(f"{what} not evaluated on the same images")
    return {
        "n": len(first_indices),
        "mean": paired_bootstrap(first_table.double().mean(0), second_table.double().mean(0),
                                 samples, seed),
        "worst_case": mcnemar_exact(first_table.all(0), second_table.all(0)),
    }


def _paired_booleans(first: Any, second: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)):
        raise ValueError("first and second must be boolean tensors")
    if first.shape != second.shape or first.dim() != 1:
        raise ValueError(f"first and second must be 1-d tensors of one shape, got "
                         f"{tuple(first.shape)} and {tuple(second.shape)}")
    return first.bool(), second.bool()
