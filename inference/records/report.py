"""The accuracy report folder: report.md, summary.json and PNG charts."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any


def plural(count: int, noun: str) -> str:
    """``1 image``, ``2 images``: a count with its noun. Pure."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3%}"


def headline(summary: dict[str, Any]) -> str:
    rows = [
        ("images", str(summary["images"])),
        ("errors", str(summary["errors"])),
        ("with ground truth", str(summary["with_truth"])),
        ("top-1 accuracy", _pct(summary["top1_accuracy"])),
        ("top-5 accuracy", _pct(summary["top5_accuracy"])),
        ("tutorial's top-1 (Stanford Dogs)", _pct(summary["tutorial_top1_accuracy"])),
    ]
    latency = summary["latency_ms"]
    if latency["samples"]:
        rows.append(("latency p50 / p95 / p99", f"{latency['p50']:.0f} / {latency['p95']:.0f} / {latency['p99']:.0f} ms"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def write_report(summary: dict[str, Any], folder: str | Path, source: str) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary | {"source": source}, indent=2))
    charts = _charts(summary, folder)
    (folder / "report.md").write_text(_markdown(summary, source, charts))
    return [folder / "report.md", folder / "summary.json", *charts]


def _markdown(summary: dict[str, Any], source: str, charts: list[Path]) -> str:
    models = ", ".join(f"{name}: {count}" for name, count in summary["models"].items()) or "unknown"
    lines = [
        "# visionstream accuracy report",
        "",
        f"- source: {_cell(source)}",  # a file name or a weights URI is text, never Markdown or HTML
        f"- model (weights): {_cell(models)}",
        "",
        "| figure | value |",
        "| --- | --- |",
    ]
    lines += [f"| {name.strip()} | {value.strip()} |" for name, value in (line.split("  ", 1) for line in headline(summary).splitlines())]
    lines += [
        "",
        "The tutorial's 67.085 % came from a regex on breed names, no ImageNet normalisation and the",
        "first image's softmax for every image; here a match is the predicted class's WordNet id equal",
        "to the one in the key, with each image's own score.",
        "",
        "## Per class",
        "",
        "| wnid | label | images | correct | accuracy |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {_cell(wnid)} | {_cell(c['label'] or '')} | {c['images']} | {c['correct']} | {c['accuracy']:.1%} |"
        for wnid, c in summary["per_class"].items()
    ]
    versions = summary.get("by_version") or {}
    if versions:
        lines += ["", "## By model version", "", "| version | images | with truth | correct | top-1 | mean score |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [
            f"| {_cell(version)} | {v['images']} | {v['with_truth']} | {v['correct']} | "
            f"{'n/a' if v['top1_accuracy'] is None else format(v['top1_accuracy'], '.1%')} | {_fmt(v['mean_score'])} |"
            for version, v in versions.items()
        ]
    lines += ["", "## Most confused (truth -> predicted)", "", "| truth | predicted | count |", "| --- | --- | ---: |"]
    lines += [f"| {_cell(c['truth'])} | {_cell(c['predicted'])} | {c['count']} |" for c in summary["confusions"]]
    scores = summary["scores"]
    lines += [
        "",
        "## Scores",
        "",
        f"- mean score of correct predictions: {_fmt(scores['correct']['mean'])} ({scores['correct']['count']})",
        f"- mean score of wrong predictions: {_fmt(scores['wrong']['mean'])} ({scores['wrong']['count']})",
        f"- expected calibration error: {_fmt(summary['reliability']['expected_calibration_error'])}",
        "",
    ]
    lines += [f"![{chart.stem}]({chart.name})" for chart in charts]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _cell(text: Any) -> str:
    """A Markdown table cell that shows ``text`` as it is: no column break, no HTML, no markup."""
    escaped = re.sub(r"[\r\n]+", " ", html.escape(str(text), quote=False))
    return re.sub(r"([\\`*_\[\]|#!~$])", r"\\\1", escaped)


def _plain_text(text: str) -> str:
    """A chart label as it is: matplotlib reads ``$...$`` as mathtext (and fails on bad TeX)."""
    return text.replace("$", "\\$")


def _charts(summary: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    return [_save(fig, folder / f"{name}.png") for name, fig in figures(summary).items()]


def figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The report's charts as matplotlib figures, by name: ``per_class_accuracy``,
    ``score_histogram``, ``reliability``. Not pyplot's: nothing shows them unless asked (a
    notebook displays one that a cell returns)."""
    from matplotlib.figure import Figure

    def subplots(figsize: tuple[float, float]) -> tuple[Any, Any]:
        fig = Figure(figsize=figsize)
        return fig, fig.subplots()

    made: dict[str, Any] = {}
    classes = summary["per_class"]
    fig, ax = subplots(figsize=(8, max(2.5, 0.25 * len(classes) + 1)))
    labels = [_plain_text(c["label"] or wnid) for wnid, c in classes.items()]
    ax.barh(labels, [c["accuracy"] for c in classes.values()], color="#4c72b0")
    ax.set_xlim(0, 1)
    ax.set_xlabel("top-1 accuracy")
    ax.set_title("Per-class accuracy")
    made["per_class_accuracy"] = fig

    fig, ax = subplots(figsize=(7, 4))
    edges = [i / 10 for i in range(10)]
    ax.bar(edges, summary["scores"]["correct"]["histogram"], width=0.1, align="edge", alpha=0.7, label="correct")
    ax.bar(edges, summary["scores"]["wrong"]["histogram"], width=0.1, align="edge", alpha=0.7, label="wrong")
    ax.set_xlabel("score of the predicted class")
    ax.set_ylabel("images")
    ax.set_title("Scores: correct vs wrong")
    ax.legend()
    made["score_histogram"] = fig

    fig, ax = subplots(figsize=(5, 5))
    bins = [b for b in summary["reliability"]["bins"] if b["count"]]
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", label="model")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability")
    ax.legend()
    made["reliability"] = fig
    return made


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
