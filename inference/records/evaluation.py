"""Accuracy figures from prediction records. Pure: records in, a summary dict out.

Reads both shapes the service writes: `visionstream classify` JSON lines and prediction /
dead-letter events. The latest record per URI wins (replays and retries make duplicates).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from inference.records.results import is_dead_letter

TUTORIAL_TOP1 = 0.67085  # the dask.delayed tutorial's figure on Stanford Dogs (20,580 images)
SCORE_BINS = 10


@dataclass(frozen=True, slots=True)
class Outcome:
    uri: str
    predicted_wnid: str | None
    predicted_label: str | None
    score: float | None
    top_wnids: tuple[str, ...]
    truth_wnid: str | None
    truth_label: str | None
    error: str | None
    latency_ms: float | None
    model: dict[str, Any] | None

    @property
    def judged(self) -> bool:
        return self.error is None and self.truth_wnid is not None and self.predicted_wnid is not None

    @property
    def correct(self) -> bool:
        return self.judged and self.predicted_wnid == self.truth_wnid


def outcome(record: dict[str, Any]) -> Outcome | None:
    """One record of any shape we write, or None when it names no image."""
    uri = record.get("uri")
    if not uri:
        return None
    prediction = record.get("prediction") or {}
    truth = record.get("ground_truth") or {}
    error = record.get("error")
    if is_dead_letter(record):
        error = f"{record.get('stage')}: {record.get('reason')}"
    elif isinstance(error, dict):
        error = f"{error.get('stage')}: {error.get('message')}"
    return Outcome(
        uri=uri,
        predicted_wnid=prediction.get("wnid"),
        predicted_label=prediction.get("label"),
        score=prediction.get("score"),
        top_wnids=tuple(p.get("wnid") for p in record.get("top_k") or ()),
        truth_wnid=truth.get("wnid"),
        truth_label=truth.get("label"),
        error=error,
        latency_ms=record.get("latency_ms"),
        model=record.get("model"),
    )


def latest_per_uri(records: Iterable[dict[str, Any]]) -> dict[str, Outcome]:
    latest: dict[str, Outcome] = {}
    for record in records:
        found = outcome(record)
        if found is not None:
            latest[found.uri] = found
    return latest


def summarize(outcomes: Iterable[Outcome], top_confusions: int = 10) -> dict[str, Any]:
    items = list(outcomes)
    judged = [o for o in items if o.judged]
    correct = [o for o in judged if o.correct]
    top5 = [o for o in judged if o.truth_wnid in o.top_wnids[:5]]
    per_class: dict[str, dict[str, Any]] = {}
    for o in judged:
        entry = per_class.setdefault(o.truth_wnid, {"label": o.truth_label, "images": 0, "correct": 0})  # type: ignore[arg-type]
        entry["images"] += 1
        entry["correct"] += int(o.correct)
    for entry in per_class.values():
        entry["accuracy"] = accuracy(entry["correct"], entry["images"])
    confusions = Counter((o.truth_label or o.truth_wnid, o.predicted_label or o.predicted_wnid) for o in judged if not o.correct)
    latencies = sorted(o.latency_ms for o in items if o.latency_ms is not None)
    models = Counter(f"{o.model.get('name')} ({o.model.get('weights')})" for o in items if o.model)
    by_version: dict[str, dict[str, Any]] = {}
    for o in items:
        version = str((o.model or {}).get("version") or "unknown")
        entry = by_version.setdefault(version, {"images": 0, "with_truth": 0, "correct": 0, "scores": []})
        entry["images"] += 1
        entry["with_truth"] += int(o.judged)
        entry["correct"] += int(o.correct)
        if o.score is not None and o.error is None:
            entry["scores"].append(o.score)
    for entry in by_version.values():
        scores = entry.pop("scores")
        entry["top1_accuracy"] = accuracy(entry["correct"], entry["with_truth"])
        entry["mean_score"] = sum(scores) / len(scores) if scores else None
    return {
        "images": len(items),
        "errors": sum(1 for o in items if o.error is not None),
        "with_truth": len(judged),
        "correct": len(correct),
        "top1_accuracy": accuracy(len(correct), len(judged)),
        "top5_accuracy": accuracy(len(top5), len(judged)),
        "tutorial_top1_accuracy": TUTORIAL_TOP1,
        "per_class": dict(sorted(per_class.items(), key=lambda kv: (kv[1]["accuracy"], kv[0]))),
        "confusions": [{"truth": t, "predicted": p, "count": n} for (t, p), n in confusions.most_common(top_confusions)],
        "scores": {
            "correct": _distribution([o.score for o in correct if o.score is not None]),
            "wrong": _distribution([o.score for o in judged if not o.correct and o.score is not None]),
        },
        "reliability": _reliability(judged),
        "latency_ms": {
            "p50": percentile(latencies, 0.50),
            "p95": percentile(latencies, 0.95),
            "p99": percentile(latencies, 0.99),
            "samples": len(latencies),
        },
        "models": dict(models),
        # the weights actually loaded (``model.version`` in the events): top-1 and confidence apart
        "by_version": dict(sorted(by_version.items())),
    }


def accuracy(correct: int, judged: int) -> float | None:
    """The share of judged images (truth known, no error) that were right; None when none was
    judged. The one place accuracy is computed: the summary here, the classify job's tally and
    the demo's summary all use it."""
    return correct / judged if judged else None


def _distribution(scores: list[float]) -> dict[str, Any]:
    histogram = [0] * SCORE_BINS
    for score in scores:
        histogram[min(SCORE_BINS - 1, int(score * SCORE_BINS))] += 1
    return {"count": len(scores), "mean": sum(scores) / len(scores) if scores else None, "histogram": histogram}


def _reliability(judged: list[Outcome]) -> dict[str, Any]:
    """Confidence bins: mean confidence vs accuracy, and the expected calibration error."""
    bins = [{"count": 0, "confidence_sum": 0.0, "correct": 0} for _ in range(SCORE_BINS)]
    for o in judged:
        if o.score is None:
            continue
        b = bins[min(SCORE_BINS - 1, int(o.score * SCORE_BINS))]
        b["count"] += 1
        b["confidence_sum"] += o.score
        b["correct"] += int(o.correct)
    total = sum(b["count"] for b in bins)
    rows, ece = [], 0.0
    for index, b in enumerate(bins):
        confidence = b["confidence_sum"] / b["count"] if b["count"] else None
        accuracy = b["correct"] / b["count"] if b["count"] else None
        if b["count"]:
            ece += b["count"] / total * abs(accuracy - confidence)  # type: ignore[operator]
        rows.append({"bin": [index / SCORE_BINS, (index + 1) / SCORE_BINS], "count": b["count"], "confidence": confidence, "accuracy": accuracy})
    return {"bins": rows, "expected_calibration_error": ece if total else None}


def percentile(ordered: list[float], q: float) -> float | None:
    """The q-quantile of an already sorted list (nearest rank), None when empty."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
