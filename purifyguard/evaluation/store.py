"""Finished batches on disk: one JSON line per batch, written the moment the batch finishes.

Each process appends to its own file (batches-<process>.jsonl) so processes never interleave
writes; a line cut short by a crash is ignored on reading and its batch simply runs again.
`run.json` holds the settings the stored batches were computed with: a rerun with other
settings refuses to mix them.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

from purifyguard.evaluation.attacks import AttackSpec

RUN_FILE = "run.json"
CLEAN = "clean"


def batch_key(model_name: str, spec: AttackSpec | None, batch: int, model_version: str = "") -> str:
    """Identifies a batch result: the model's name and version (a checksum of its weights and
    settings), the attack's full settings and the batch index."""
    model = f"{model_name}@{model_version}" if model_version else model_name
    if spec is None:
        return f"{model}|{CLEAN}|{batch}"
    settings = zlib.crc32(json.dumps(spec.to_dict(), sort_keys=True).encode())
    return f"{model}|{spec.label}#{settings:08x}|{batch}"


class BatchStore:
    """Finished batch records by key; in memory only when `folder` is None."""

    def __init__(self, folder: str | Path | None, process_index: int = 0) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.process_index = process_index
        self.records: dict[str, dict[str, Any]] = {}

    def start(self, settings: dict[str, Any], resume: bool, is_main: bool) -> None:
        """Check (or write) the run's settings; without resume, forget earlier batches."""
        if self.folder is None:
            return
        run_file = self.folder / RUN_FILE
        if is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not resume:
                for old in self.folder.glob("batches-*.jsonl"):
                    old.unlink()
            elif run_file.exists():
                stored = json.loads(run_file.read_text())
                if stored != settings:
                    raise ValueError(
                        f"{self.folder} holds batches computed with other settings "
                        f"({_difference(stored, settings)}); use another output folder or "
                        "resume=False (--no-resume) to start over"
                    )
            run_file.write_text(json.dumps(settings, indent=2) + "\n")

    def load(self) -> None:
        """Read every process's finished batches (a shared folder shows all of them)."""
        if self.folder is None:
            return
        for path in sorted(self.folder.glob("batches-*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interruption
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


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1)


def _difference(stored: dict[str, Any], wanted: dict[str, Any]) -> str:
    keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    return ", ".join(f"{k}: stored {stored.get(k)!r}, now {wanted.get(k)!r}" for k in keys)
