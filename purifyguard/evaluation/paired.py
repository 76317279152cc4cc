"""Two defences compared on the same images: paired tests, not overlapping intervals.

Two robust accuracies measured on the same n images are correlated (an image easy for one is
often easy for the other), so their separate 95% intervals overlap long after the difference is
clear, or the other way round. Paired tests use the per-image outcomes instead:

- McNemar's exact test on a binary outcome per image (here the worst case: right in every one of
  the R runs): only the images where the two defences disagree count, and under "no difference"
  each of them is equally likely to favour either (a two-sided binomial test with p = 1/2);
- a paired bootstrap of the difference in mean accuracy (each image's share of the R runs
  right), resampling images: a 95% interval for the difference and a two-sided p-value;
- paired_margin_test(): the same bootstrap against a margin instead of 0, one-sided ("ours leads
  by more than 5 points": margin 0.05; "ours is at most 3 points worse": margin -0.03), so that
  a target of X points is judged against X, not against "no difference".

format_p_value() prints a p-value without claiming more than the test resolves: a bootstrap of
`samples` resamplings cannot tell p below 1 / samples, so such a p prints as "p < 0.0001", never
as "p = 0"; otherwise two significant digits (an exact test's tiny p, e.g. McNemar's, too).

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

from purifyguard.validation import check_int, check_number

CLEAN = "clean"
ALTERNATIVES = ("greater", "less")


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
    differences = _differences(first, second)
    means = _resampled_means(differences, samples, seed)
    share_below = float((means <= 0).double().mean())
    share_above = float((means >= 0).double().mean())
    return {"difference": float(differences.mean()), "ci95": _two_sided_interval(means),
            "p_value": min(1.0, 2 * min(share_below, share_above)), "samples": samples}


def paired_margin_test(
    first: torch.Tensor, second: torch.Tensor, margin: float, samples: int = 10_000,
    seed: int = 0, alternative: str = "greater",
) -> dict[str, Any]:
    """One-sided paired bootstrap test of the mean difference d = mean(first - second) against
    `margin` (in the scores' units: 0.05 is 5 points of accuracy).

    alternative "greater": H0 d <= margin against H1 d > margin ("first leads by more than
    margin"; non-inferiority "first is at most 3 points worse" is margin -0.03). alternative
    "less": H0 d >= margin against H1 d < margin.

    The images are resampled as paired_bootstrap() does (the same seed gives the same
    resamplings). p_value is the share of the `samples` bootstrap means on the H0 side of the
    margin (<= margin for "greater", >= for "less"): a percentile bootstrap test, whose
    resolution is 1 / samples (p = 0 means p < 1 / samples). ci["one_sided95"] is the matching
    95% bound, the k-th smallest bootstrap mean for "greater" (a lower bound) and the k-th
    largest for "less" (an upper bound), k = ceil(0.05 samples): the test rejects at 0.05
    (p_value < 0.05) exactly when that bound lies beyond the margin. ci["two_sided95"] is
    paired_bootstrap()'s 95% interval.
    """
    margin = check_number("margin", margin)
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {', '.join(ALTERNATIVES)}, got "
                         f"{alternative!r}")
    samples = check_int("samples", samples, 1)
    differences = _differences(first, second)
    means = _resampled_means(differences, samples, seed)
    ordered = means.sort().values
    k = -(-samples // 20)  # ceil(0.05 samples): reject at 0.05 <=> fewer than k on the H0 side
    if alternative == "greater":
        bound, on_null_side = float(ordered[k - 1]), means <= margin
    else:
        bound, on_null_side = float(ordered[samples - k]), means >= margin
    return {"difference": float(differences.mean()), "margin": margin,
            "alternative": alternative,
            "ci": {"one_sided95": bound, "two_sided95": _two_sided_interval(means)},
            "p_value": float(on_null_side.double().mean()), "samples": samples}


def format_p_value(p_value: float, samples: int | None = None, name: str = "p") -> str:
    """A p-value as text, never "p = 0": "p < 0.0001" when a bootstrap of `samples`
    resamplings puts it below its resolution 1 / samples, otherwise two significant digits
    ("p = 0.014", "p = 3.7e-40" for an exact test). An exact p that underflowed to 0 prints as
    "p < 1e-300". name "" gives the bare value for a table's p column ("< 0.0001", "0.014")."""
    p_value = check_number("p_value", p_value)
    if not 0 <= p_value <= 1:
        raise ValueError(f"p_value must lie in [0, 1], got {p_value!r}")
    prefix = f"{name} " if name else ""
    if samples is not None and p_value < 1 / check_int("samples", samples, 1):
        return f"{prefix}< {1 / samples:.2g}"
    if p_value == 0:
        return f"{prefix}< 1e-300"
    return f"{prefix}= {p_value:.2g}" if name else f"{p_value:.2g}"


def _differences(first: Any, second: Any) -> torch.Tensor:
    if not (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)):
        raise ValueError("first and second must be tensors of per-image scores")
    if first.shape != second.shape or first.dim() != 1 or len(first) == 0:
        raise ValueError(f"first and second must be non-empty 1-d tensors of one shape, got "
                         f"{tuple(first.shape)} and {tuple(second.shape)}")
    return first.double() - second.double()


def _resampled_means(differences: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    """The mean difference over each of `samples` resamplings of the images (with replacement)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(differences), (samples, len(differences)), generator=generator)
    return differences[rows].mean(1)


def _two_sided_interval(means: torch.Tensor) -> list[float]:
    return torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype)).tolist()


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
    seed: int = 0, margin: float | None = None, second_dir: str | Path | None = None,
    images: int | None = None,
) -> dict[str, Any]:
    """Paired comparison of two defences evaluated in one folder on the same images and attack:
    mean accuracy (paired bootstrap) and worst case (McNemar); with a margin (0.05: 5 points),
    also "margin_test", paired_margin_test() of the mean accuracy against it ("greater").
    second_dir: the second defence's folder, when two runs evaluated them apart; their run.json
    must agree on the images (data fingerprint, n) and the seed, or a ValueError says which.
    images: compare on the first `images` images only, for a defence evaluated on fewer images
    than the other (evaluate_models' n_per_model); both must have all of them."""
    if second_dir is not None:
        _check_same_run(output_dir, second_dir)
    if images is not None and (isinstance(images, bool) or not isinstance(images, int)
                               or images < 1):
        raise ValueError(f"images must be a positive int or None, got {images!r}")
    tables = [_first_images(correct_table(folder, model, attack), images, model)
              for folder, model in ((output_dir, first), (second_dir or output_dir, second))]
    result = _compare_tables(*tables, samples, seed, f"{first!r} and {second!r} were", margin)
    return {"first": first, "second": second, "attack": attack, **result}


def _first_images(table: tuple[torch.Tensor, torch.Tensor], images: int | None,
                  model: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (indices, table) of correct_table restricted to the images numbered below `images`."""
    indices, correct = table
    if images is None:
        return table
    kept = indices < images
    if int(kept.sum()) < images:
        raise ValueError(f"images={images}, but {model!r} has only {int(kept.sum())} of the "
                         f"first {images} images stored")
    return indices[kept], correct[:, kept]


def _check_same_run(first_dir: str | Path, second_dir: str | Path) -> None:
    """Two evaluation folders' settings agree on what makes a paired comparison valid."""
    settings = []
    for folder in (first_dir, second_dir):
        path = Path(folder) / "run.json"
        if not path.is_file():
            raise ValueError(f"{folder}: no run.json (not an evaluation folder)")
        settings.append(json.loads(path.read_text(encoding="utf-8")))
    differing = [key for key in ("data_fingerprint", "n", "seed")
                 if settings[0].get(key) != settings[1].get(key)]
    if differing:
        raise ValueError(f"{first_dir} and {second_dir} differ in {', '.join(differing)} "
                         f"({[settings[0].get(k) for k in differing]} vs "
                         f"{[settings[1].get(k) for k in differing]}): not a paired comparison")


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
    samples: int, seed: int, what: str, margin: float | None = None,
) -> dict[str, Any]:
    (first_indices, first_table), (second_indices, second_table) = first, second
    if not torch.equal(first_indices, second_indices):
        raise ValueError(f"{what} not evaluated on the same images")
    first_scores, second_scores = first_table.double().mean(0), second_table.double().mean(0)
    result = {
        "n": len(first_indices),
        "mean": paired_bootstrap(first_scores, second_scores, samples, seed),
        "worst_case": mcnemar_exact(first_table.all(0), second_table.all(0)),
    }
    if margin is not None:
        result["margin_test"] = paired_margin_test(first_scores, second_scores, margin, samples,
                                                   seed)
    return result


def _paired_booleans(first: Any, second: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)):
        raise ValueError("first and second must be boolean tensors")
    if first.shape != second.shape or first.dim() != 1:
        raise ValueError(f"first and second must be 1-d tensors of one shape, got "
                         f"{tuple(first.shape)} and {tuple(second.shape)}")
    return first.bool(), second.bool()
