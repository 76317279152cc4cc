"""Several output folders of one evaluation, merged into one: a long benchmark split across
processes or machines (one defence each, say) and then read as a single run.

An output folder holds, besides what is recomputed from it, what took the time: the finished
batches (batches-*.jsonl, read from every file of that name), the per-defence headline state
(headline-<name>/: the chosen examples and their verdict, which a rerun reuses rather than
judge again), the EOT alignment measured per attacked model (eot-alignment.json), the
first batch's adversarial images and any other stored state. merge_outputs copies all of it
into one folder, so that rerunning the evaluation there with every defence runs nothing that a
source finished. Folders can only merge when their run.json (seed, n, batch size, runs, the
data's fingerprint) agree. Reports, tables and pictures are left out: the rerun writes them
anew from the merged batches.
"""

from __future__ import annotations

import filecmp
import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from purifyguard.evaluation.gradient_alignment import ALIGNMENT_FILE
from purifyguard.evaluation.harness import LOCK_FILE, _folder_lock
from purifyguard.evaluation.store import RUN_FILE
from purifyguard.files import read_json, write_json

REWRITTEN = ("report.json", "report.md", "benchmark.json", "headline.md",
             LOCK_FILE)  # and every *.png


def merge_outputs(sources: Sequence[str | Path], into: str | Path) -> dict[str, Any]:
    """Copy the stored state of the output folders `sources` into the folder `into`.

    Each source's batches-<k>.jsonl (at any depth) becomes batches-<source folder name>-<k>.jsonl
    beside it (so merging
    again after the sources went on replaces, never doubles, what an earlier merge copied);
    eot-alignment.json files are united; every other file is copied to the same relative path,
    and two sources holding one path with different contents are refused. Sources and `into`
    are locked while they merge (a source an evaluation is still writing is refused).
    ValueError, before anything is copied, for: fewer than one source, a source that is not an
    evaluation folder (no run.json), two source folders of one name, `into` among the sources,
    run.json files that disagree (also with one already in `into`) and conflicting files.
    Returns {"into", "sources", "files"} (files: how many were copied or rewritten)."""
    sources, into = _checked_folders(sources, into)
    with ExitStack() as locks:
        for folder in _locked_folders(sources, into):
            locks.enter_context(_folder_lock(folder, True))
        settings = _common_settings(sources, into)
        plan = _copy_plan(sources, into)
        alignment = _united_alignment(sources, into)
        for source_file, target in plan:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source_file, target)
        if alignment:
            write_json(into / ALIGNMENT_FILE, alignment)
        write_json(into / RUN_FILE, settings)
    return {"into": str(into), "sources": [str(folder) for folder in sources],
            "files": len(plan) + bool(alignment)}


def _checked_folders(sources: Sequence[str | Path], into: str | Path) -> tuple[list[Path], Path]:
    if isinstance(sources, (str, Path)) or not sources:
        raise ValueError(f"sources must be a list of one or more output folders, got {sources!r}")
    folders = [Path(source) for source in sources]
    for folder in folders:
        if not (folder / RUN_FILE).is_file():
            raise ValueError(f"source {folder} is not an evaluation output folder (it has no "
                             f"{RUN_FILE})")
    names = [folder.name for folder in folders]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"sources must have different folder names (their batch files are "
                         f"named after them), got {repeated} more than once")
    into = Path(into)
    if into.exists() and not into.is_dir():
        raise ValueError(f"into must be a folder, got the file {into}")
    if any(into.resolve() == folder.resolve() for folder in folders):
        raise ValueError(f"into ({into}) must not be one of the sources")
    return folders, into


def _locked_folders(sources: list[Path], into: Path) -> list[Path]:
    """The folders to hold while merging: each source and every folder in it that an evaluation
    or a headline locks when it runs (the headline's run after the evaluation's lock is gone),
    and `into`."""
    nested = [lock.parent for folder in sources for lock in sorted(folder.rglob(LOCK_FILE))
              if lock.parent != folder]
    return [*sources, *nested, into]


def _common_settings(sources: list[Path], into: Path) -> dict[str, Any]:
    """The run.json all folders share (ValueError naming the first that differs)."""
    first = read_json(sources[0] / RUN_FILE, "the evaluation settings file")
    others = [*sources[1:], *([into] if (into / RUN_FILE).is_file() else [])]
    for folder in others:
        settings = read_json(folder / RUN_FILE, "the evaluation settings file")
        if settings != first:
            differing = sorted(key for key in {*settings, *first}
                               if settings.get(key) != first.get(key))
            raise ValueError(f"{folder} was run with other settings than {sources[0]} (they "
                             f"differ in {', '.join(differing)}): only one evaluation's folders "
                             "merge")
    return first


def _copy_plan(sources: list[Path], into: Path) -> list[tuple[Path, Path]]:
    """(source file, target) for every file to copy; ValueError on two sources' conflict."""
    plan, claimed = [], {}
    for folder in sources:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if not path.is_file() or _rewritten(relative):
                continue
            if path.name.startswith("batches-") and path.suffix == ".jsonl":
                relative = relative.with_name(f"batches-{folder.name}-{path.name[8:]}")
            elif relative in claimed and not filecmp.cmp(claimed[relative], path, shallow=False):
                raise ValueError(f"{claimed[relative]} and {path} differ: two sources hold "
                                 f"{relative} (did both evaluate the same defence?)")
            claimed[relative] = path
            plan.append((path, into / relative))
    return plan


def _rewritten(relative: Path) -> bool:
    """Files the rerun over the merged folder writes anew (at any depth: a nested evaluation
    folder has its own), and the top folder's settings and alignment (merged apart)."""
    if relative.suffix == ".png" or relative.name in REWRITTEN:
        return True
    return len(relative.parts) == 1 and relative.name in (RUN_FILE, ALIGNMENT_FILE)


def _united_alignment(sources: list[Path], into: Path) -> dict[str, Any]:
    """Every folder's eot-alignment.json in one (ValueError when two measured one key
    differently)."""
    united, origin = {}, {}
    for folder in (into, *sources):
        path = folder / ALIGNMENT_FILE
        if not path.is_file():
            continue
        for key, value in read_json(path, "the EOT alignment file").items():
            if key in united and united[key] != value and origin[key] != into:
                raise ValueError(f"{origin[key]} and {folder} both measured the EOT alignment "
                                 f"of {key} and differ (did both evaluate the same defence?)")
            united[key], origin[key] = value, folder
    return united
