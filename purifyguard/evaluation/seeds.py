"""Seeds derived from the run's seed, so every batch is reproducible on its own.

A batch's attack and purification noise depend only on (seed, stream, batch index), never on
what ran before: a resumed or sharded run gives the same numbers as one uninterrupted run.
"""

from __future__ import annotations

import zlib

import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed from the run's seed and a path of names and indices."""
    text = "/".join(str(part) for part in (seed, *parts))
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed torch's global generators (the purifier draws its noise from them by default)."""
    torch.manual_seed(seed)
