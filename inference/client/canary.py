"""A canary's share of the images (pure): which images of a batch go to the candidate model.

An image is the candidate's when the digest of its identity (URI and pin), read as a number in
[0, 1), falls under the canary's share: the same image (and every replay of it) always goes the
same way, whatever batch it lands in, and about that share of all images goes to the candidate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from inference.records.objects import identity


def canary_point(uri: str) -> float:
    """Where an image falls in [0, 1): the first 8 bytes of its identity's SHA-256."""
    digest = hashlib.sha256(identity(uri).encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class Canary:
    """A candidate model (its plugin) taking ``share`` of the images beside the serving one."""

    plugin: Any  # ResidentModel
    share: float
    version: str  # what the workers loaded

    def split(self, uris: list[str]) -> tuple[list[int], list[int]]:
        """Indices of ``uris`` for the serving model and for the candidate, each in order."""
        candidate = [index for index, uri in enumerate(uris) if canary_point(uri) < self.share]
        chosen = set(candidate)
        return [index for index in range(len(uris)) if index not in chosen], candidate
