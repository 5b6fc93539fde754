"""Class index <-> WordNet id <-> label; ground truth from object keys; matching. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources


@dataclass(frozen=True, slots=True)
class Truth:
    wnid: str
    label: str | None


@dataclass(frozen=True, slots=True)
class ClassTable:
    """The classes a model predicts: index -> (wnid, label)."""

    wnids: tuple[str, ...]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.wnids) != len(self.labels):
            raise ValueError(f"{len(self.wnids)} wnids but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def imagenet(cls, labels: tuple[str, ...] | list[str] | None = None) -> ClassTable:
        """ImageNet-1k in torchvision's class order; labels from the weights' metadata."""
        wnids = imagenet_wnids()
        return cls(wnids=wnids, labels=tuple(labels) if labels is not None else wnids)


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids, index i = torchvision class i (data file)."""
    text = resources.files("inference").joinpath("data/imagenet_wnids.txt").read_text("ascii")
    wnids = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(wnids) != 1000:
        raise RuntimeError(f"imagenet_wnids.txt has {len(wnids)} entries, expected 1000")
    return wnids


@lru_cache(maxsize=32)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def parse_truth(key: str, pattern: str) -> Truth | None:
    """Ground truth from an object key, or None when the key carries none.

    >>> parse_truth("Images/n02085620-Chihuahua/n02085620_10074.jpg", r"(?P<wnid>n\\d{8})-(?P<label>[^/]+)/[^/]+$")
    Truth(wnid='n02085620', label='Chihuahua')
    """
    found = _compiled(pattern).search(key)
    if found is None or not found.group("wnid"):
        return None
    groups = found.groupdict()
    return Truth(wnid=groups["wnid"], label=groups.get("label"))


def match_truth(predicted_wnid: str | None, truth: Truth | None) -> bool | None:
    """True/False when the truth is known, None when the key carries none."""
    if truth is None:
        return None
    return predicted_wnid == truth.wnid
