"""Judging a canary on labelled accuracy (pure): per model version the stream keeps top-1 on
labelled images, mean confidence and latency (``Tally``); ``verdict`` compares the candidate's
with the serving model's over the same period.

The rule, one-sided at about 95 % (z = 1.645), on top-1 over labelled images (a key that carries
a ground truth), once the candidate has at least ``min_labelled`` of them:

- **promote** when the candidate is not worse than the serving model by more than ``max_drop``:
  the lower bound of (candidate - serving) is at least -max_drop;
- **roll back** when it is worse by more than that: the upper bound is below -max_drop;
- otherwise keep counting, and roll back once the candidate has ``INCONCLUSIVE_FACTOR`` times
  ``min_labelled`` without an answer (a canary never runs forever).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z = 1.645  # one-sided, about 95 %
INCONCLUSIVE_FACTOR = 10
PROMOTE, ROLL_BACK = "promote", "roll back"


@dataclass(frozen=True, slots=True)
class Tally:
    """What one model version did: predictions, labelled and matched images, their top-1 scores
    and latencies summed."""

    predicted: int = 0
    labelled: int = 0
    matched: int = 0
    confidence_sum: float = 0.0
    latency_sum_ms: float = 0.0
    latency_count: int = 0

    def minus(self, earlier: Tally) -> Tally:
        """What happened since ``earlier`` (a snapshot of the same counts)."""
        return Tally(
            self.predicted - earlier.predicted, self.labelled - earlier.labelled, self.matched - earlier.matched,
            self.confidence_sum - earlier.confidence_sum, self.latency_sum_ms - earlier.latency_sum_ms, self.latency_count - earlier.latency_count,
        )

    @property
    def top1(self) -> float | None:
        return self.matched / self.labelled if self.labelled else None

    def summary(self) -> dict[str, float | int | None]:
        return {
            "predicted": self.predicted, "labelled": self.labelled, "matched": self.matched,
            "top1": None if self.top1 is None else round(self.top1, 4),
            "mean_confidence": round(self.confidence_sum / self.predicted, 4) if self.predicted else None,
            "mean_latency_ms": round(self.latency_sum_ms / self.latency_count, 1) if self.latency_count else None,
        }


@dataclass(frozen=True, slots=True)
class CanaryRule:
    min_labelled: int = 200
    max_drop: float = 0.02  # how much worse than the serving model's top-1 a promoted candidate may be


def verdict(serving: Tally, candidate: Tally, rule: CanaryRule) -> tuple[str | None, str]:
    """``PROMOTE``, ``ROLL_BACK`` or None (keep counting), and why, in words."""
    if candidate.labelled < rule.min_labelled:
        return None, f"{candidate.labelled} of {rule.min_labelled} labelled images on the candidate"
    if not serving.labelled:
        if candidate.labelled >= INCONCLUSIVE_FACTOR * rule.min_labelled:
            return ROLL_BACK, "no labelled image reached the serving model to compare with"
        return None, "no labelled image on the serving model yet"
    p_c, p_s = candidate.matched / candidate.labelled, serving.matched / serving.labelled
    spread = Z * math.sqrt(p_c * (1 - p_c) / candidate.labelled + p_s * (1 - p_s) / serving.labelled)
    difference = p_c - p_s
    said = (f"top-1 {p_c:.4f} on {candidate.labelled} labelled images against the serving model's {p_s:.4f} on "
            f"{serving.labelled}: {difference:+.4f} (95 % one-sided bounds {difference - spread:+.4f}, {difference + spread:+.4f}; "
            f"at most {rule.max_drop:g} worse allowed)")
    if difference - spread >= -rule.max_drop:
        return PROMOTE, said
    if difference + spread < -rule.max_drop:
        return ROLL_BACK, said
    if candidate.labelled >= INCONCLUSIVE_FACTOR * rule.min_labelled:
        return ROLL_BACK, f"inconclusive after {candidate.labelled} labelled images: {said}"
    return None, said
