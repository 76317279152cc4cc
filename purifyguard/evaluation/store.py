"""Finished batches on disk: one JSON line per batch, written the moment the batch finishes.

Each process appends to its own file (batches-<process>.jsonl) so processes never interleave
writes; a line cut short by a crash is ignored on reading and its batch simply runs again.
`run.json` holds the settings the stored batches were computed with: a rerun with other
settings refuses to mix them. run.json is written atomically (complete or absent), and a
stored line that is JSON but not a batch record stops the run with an error naming the file.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

from purifyguard.evaluation.attacks import AttackSpec
from purifyguard.files import read_json, write_json

RUN_FILE = "run.json"
CLEAN = "clean"


def batch_key(model_name: str, spec: AttackSpec | None, batch: int, model_version: str = "") -> str:
    """Identifies a batch result: the model's name and version (a checksum of its weights and
    settings), the attack's full settings and the batch index."""
    model = f"{model_name}@{model_version}" if model_version else model_name
    if spec is None:
        return f"{model}|{CLEAN}|{batch}"
    settings = zlib.crc32(json.dumps(spec.identity(), sort_keys=True).encode())
    return f"{model}|{spec.label}#{settings:08x}|{batch}"


class BatchStore:
    """Finished batch records by key; in memory only when `folder` is None."""

    def __init__(self, folder: str | Path | None, process_index: int = 0) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.process_index = process_index
        self.records: dict[str, dict[str, Any]] = {}
        self.settings: dict[str, Any] | None = None

    def start(self, settings: dict[str, Any], resume: bool, is_main: bool) -> None:
        """Check (or write) the run's settings; without resume, forget earlier batches."""
        self.settings = settings
        if self.folder is None:
            return
        run_file = self.folder / RUN_FILE
        if is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not resume:
                for old in self.folder.glob("batches-*.jsonl"):
                    old.unlink()
            elif run_file.exists():
                try:
                    stored = read_json(run_file, "the evaluation settings file")
                except ValueError as error:
                    raise ValueError(
                        f"{error}; it cannot tell which settings the stored batches were computed "
                        "with: rerun with resume=False (--no-resume) to start over, or use "
                        "another output folder"
                    ) from None
                if stored != settings:
                    raise ValueError(
                        f"{self.folder} holds batches computed with other settings "
                        f"({_difference(stored, settings)}); use another output folder or "
                        "resume=False (--no-resume) to start over"
                    )
            elif any(self.folder.glob("batches-*.jsonl")):
                raise ValueError(
                    f"{self.folder} holds stored batches but no {RUN_FILE} saying which settings "
                    "they were computed with; rerun with resume=False (--no-resume) to start "
                    "over, or use another output folder"
                )
            write_json(run_file, settings)

    def load(self) -> None:
        """Read every process's finished batches (a shared folder shows all of them).

        A line that is not JSON was cut short by an interruption: it is skipped and its batch
        runs again. A line that is JSON but not a batch record was written by something else:
        ValueError naming the file and line."""
        if self.folder is None:
            return
        for path in sorted(self.folder.glob("batches-*.jsonl")):
            text = path.read_text(encoding="utf-8", errors="replace")
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interruption
                problem = _record_problem(record, self.settings)
                if problem:
                    raise ValueError(
                        f"{path}, line {number}: not a stored evaluation batch ({problem}); "
                        "remove the line or the file, or rerun with resume=False (--no-resume)"
                    )
                self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, record: dict[str, Any]) -> None:
        """Keep a finished batch, and append it to this process's file at once."""
        self.records[record["key"]] = record
        if self.folder is None:
            return
        path = self.folder / f"batches-{self.process_index}.jsonl"
        with open(path, "a") as file:
            if file.tell() and _last_byte(path) != b"\n":
                file.write("\n")  # end a line an interruption cut short
            file.write(json.dumps(record) + "\n")
            file.flush()
            os.fsync(file.fileno())


def _record_problem(record: Any, settings: dict[str, Any] | None) -> str | None:
    """What makes a parsed line not a batch record of this run, or None if it is one."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    for key, kind in _RECORD_FIELDS.items():
        if key not in record:
            return f"no {key!r}"
        if not _is(record[key], kind):
            return f"{key!r} is {record[key]!r}"
    labels = record["labels"]
    if not labels or not all(_is(y, int) for y in labels):
        return "'labels' must be a non-empty list of integers"
    indices = record["indices"]
    if len(indices) != 2 or not all(_is(i, int) for i in indices) \
            or indices[1] - indices[0] != len(labels):
        return f"'indices' {indices!r} do not span its {len(labels)} labels"
    runs = settings.get("runs") if settings else None
    predictions = record["predictions"]
    shape_ok = (
        isinstance(predictions, list) and predictions
        and (runs is None or len(predictions) == runs)
        and all(isinstance(row, list) and len(row) == len(labels) and all(_is(p, int) for p in row)
                for row in predictions)
    )
    if not shape_ok:
        wanted = f"{runs if runs is not None else 'R'} x {len(labels)}"
        return f"'predictions' must be a {wanted} list of lists of class indices"
    if record["attack"] != CLEAN:
        sizes = record.get("perturbation")
        if not isinstance(sizes, list) or len(sizes) != len(labels) or not all(
            _is(s, float) for s in sizes
        ):
            return f"'perturbation' must be a list of {len(labels)} numbers"
    return None


_RECORD_FIELDS = {"key": str, "model": str, "attack": str, "batch": int, "indices": list,
                  "labels": list, "predictions": list, "seconds": float}


def _is(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1)


def _difference(stored: dict[str, Any], wanted: dict[str, Any]) -> str:
    keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    return ", ".join(f"{k}: stored {stored.get(k)!r}, now {wanted.get(k)!r}" for k in keys)
