import json
from pathlib import Path

import pytest
from PIL import Image

from inference.records.evaluation import latest_per_uri, summarize
from inference.records.report import write_report
from inference.records.results import DEAD_LETTER_SCHEMA, PREDICTION_SCHEMA

CHI, GOLD, PUG = ("n02085620", "Chihuahua"), ("n02099601", "golden_retriever"), ("n02110958", "pug")


def event(uri, truth, predicted, score, top=(), latency=None):
    return {
        "schema": PREDICTION_SCHEMA, "uri": uri,
        "prediction": {"wnid": predicted[0], "label": predicted[1], "score": score, "class_index": 0},
        "top_k": [{"wnid": predicted[0]}] + [{"wnid": w} for w in top],
        "ground_truth": {"wnid": truth[0], "label": truth[1]} if truth else None,
        "match": (truth[0] == predicted[0]) if truth else None, "latency_ms": latency,
        "model": {"name": "resnet50", "weights": "IMAGENET1K_V2"},
    }


RECORDS = [
    event("s3://b/1", CHI, CHI, 0.95, latency=100),
    event("s3://b/2", CHI, PUG, 0.40, top=(CHI[0],), latency=200),
    event("s3://b/3", GOLD, GOLD, 0.85, latency=300),
    event("s3://b/4", GOLD, PUG, 0.55, latency=400),  # superseded below
    event("s3://b/4", GOLD, GOLD, 0.75, latency=400),  # the retry's event wins
    event("s3://b/5", GOLD, PUG, 0.15, latency=500),
    event("s3://b/6", None, PUG, 0.65),  # no truth: counted, not judged
    {"schema": DEAD_LETTER_SCHEMA, "uri": "s3://b/7", "stage": "decode", "reason": "not an image"},
    {"schema": DEAD_LETTER_SCHEMA, "uri": None, "stage": "parse", "reason": "not JSON"},  # no image
]


def test_every_figure_against_hand_computed_values():
    summary = summarize(latest_per_uri(RECORDS).values())
    assert summary["images"] == 7 and summary["errors"] == 1 and summary["with_truth"] == 5
    assert summary["correct"] == 3
    assert summary["top1_accuracy"] == pytest.approx(3 / 5)
    assert summary["top5_accuracy"] == pytest.approx(4 / 5)  # image 2 has Chihuahua second
    assert summary["per_class"][CHI[0]] == {"label": "Chihuahua", "images": 2, "correct": 1, "accuracy": 0.5}
    assert summary["per_class"][GOLD[0]] == {"label": "golden_retriever", "images": 3, "correct": 2, "accuracy": pytest.approx(2 / 3)}
    assert summary["confusions"] == [
        {"truth": "Chihuahua", "predicted": "pug", "count": 1},
        {"truth": "golden_retriever", "predicted": "pug", "count": 1},
    ]
    assert summary["scores"]["correct"]["count"] == 3
    assert summary["scores"]["correct"]["mean"] == pytest.approx((0.95 + 0.85 + 0.75) / 3)
    assert summary["scores"]["correct"]["histogram"][9] == 1 and summary["scores"]["correct"]["histogram"][8] == 1 and summary["scores"]["correct"]["histogram"][7] == 1
    assert summary["scores"]["wrong"]["mean"] == pytest.approx((0.40 + 0.15) / 2)
    bins = summary["reliability"]["bins"]
    assert bins[4] == {"bin": [0.4, 0.5], "count": 1, "confidence": 0.40, "accuracy": 0.0}
    ece = (1 * 0.95 * 0 + 1 * abs(0 - 0.40) + 1 * abs(1 - 0.85) + 1 * abs(1 - 0.75) + 1 * abs(0 - 0.15) + 1 * abs(1 - 0.95)) / 5
    assert summary["reliability"]["expected_calibration_error"] == pytest.approx(ece)
    assert summary["latency_ms"] == {"p50": 300, "p95": 500, "p99": 500, "samples": 5}


def test_classify_jsonl_records_are_read_too():
    record = {"uri": "/d/Images/n02085620-Chihuahua/x.jpg", "prediction": {"wnid": CHI[0], "label": "Chihuahua", "score": 0.9},
              "top_k": [{"wnid": CHI[0]}], "ground_truth": {"wnid": CHI[0], "label": "Chihuahua"}, "match": True, "error": None,
              "model": {"name": "resnet50", "weights": "none"}}
    failed = dict(record, uri="/d/y.jpg", prediction=None, top_k=[], error={"stage": "decode", "message": "bad"})
    summary = summarize(latest_per_uri([record, failed]).values())
    assert (summary["images"], summary["errors"], summary["top1_accuracy"]) == (2, 1, 1.0)


def test_report_folder_has_markdown_json_and_valid_pngs(tmp_path: Path):
    summary = summarize(latest_per_uri(RECORDS).values())
    written = write_report(summary, tmp_path / "report", "s3://b/")
    names = {p.name for p in written}
    assert names == {"report.md", "summary.json", "per_class_accuracy.png", "score_histogram.png", "reliability.png"}
    for png in (p for p in written if p.suffix == ".png"):
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG"
    text = (tmp_path / "report" / "report.md").read_text()
    assert "67.085%" in text and "60.000%" in text and r"resnet50 (IMAGENET1K\_V2)" in text
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["top1_accuracy"] == pytest.approx(0.6)


def test_accuracy_is_none_when_nothing_was_judged_and_the_classify_tally_uses_it():
    from inference.records.evaluation import accuracy
    from inference.client.job import Tally
    from inference.records.results import Failure, ImageResult, ModelInfo, Prediction

    assert accuracy(3, 5) == pytest.approx(0.6) and accuracy(0, 0) is None
    model, best = ModelInfo("resnet18", "none", "fp32", "cpu"), Prediction(0, CHI[0], CHI[1], 0.9)
    tally = Tally()
    for match in (True, False, True, None):  # None: no truth, counted but not judged
        tally.add(ImageResult("s3://b/x", "x", best, (best,), None, match, None, model))
    tally.add(ImageResult("s3://b/y", "y", None, (), None, None, Failure("decode", "bad"), model))
    assert (tally.matches, tally.with_truth, tally.accuracy) == (2, 3, accuracy(2, 3))
    assert "66.67% top-1 (2/3 with truth)" in tally.summary()
    assert "no ground truth" in Tally().summary()


def test_labels_from_keys_cannot_break_the_report(tmp_path: Path):
    """Ground truth comes from object keys: TeX for matplotlib, pipes and HTML for Markdown."""
    odd = ("n09999999", "$\\frac{1}{0$ <script>x</script> | a|b")
    records = [event("s3://b/odd1", odd, odd, 0.9), event("s3://b/odd2", odd, CHI, 0.3)]
    summary = summarize(latest_per_uri(records).values())
    written = write_report(summary, tmp_path / "report", "s3://b/")
    assert len([p for p in written if p.suffix == ".png"]) == 3
    text = (tmp_path / "report" / "report.md").read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text
    row = next(line for line in text.splitlines() if line.startswith("| n09999999"))
    assert row.count("|") - row.count("\\|") == 6  # five columns, the label's pipes escaped


def test_a_model_or_source_name_is_text_in_the_report_not_markup(tmp_path: Path):
    hostile = dict(RECORDS[0], model={"name": "resnet50", "weights": "<img src=x onerror=alert(1)>|[x](http://e)`"})
    summary = summarize(latest_per_uri([hostile]).values())
    write_report(summary, tmp_path / "report", "s3://b/`code`<b>")
    text = (tmp_path / "report" / "report.md").read_text()
    source, model = (line for line in text.splitlines() if line.startswith(("- source:", "- model")))
    assert source == r"- source: s3://b/\`code\`&lt;b&gt;"
    assert r"&lt;img src=x onerror=alert(1)&gt;\|\[x\](http://e)\`" in model and "<img" not in model


def test_accuracy_is_split_by_the_model_version_that_made_each_prediction(tmp_path: Path):
    """Two versions of the weights at one path: top-1 and mean score apart, in the summary and
    in the report; records of a worker that named no version count as unknown."""
    def versioned(uri, truth, predicted, score, version):
        record = event(uri, truth, predicted, score)
        record["model"] = {"name": "resnet50", "weights": "/models/m.pt", "version": version}
        return record

    records = [
        versioned("s3://b/1", CHI, CHI, 0.9, "sha256:aaa"), versioned("s3://b/2", CHI, PUG, 0.5, "sha256:aaa"),
        versioned("s3://b/3", GOLD, GOLD, 0.8, "sha256:bbb"), versioned("s3://b/4", GOLD, GOLD, 0.6, "sha256:bbb"),
        event("s3://b/5", GOLD, PUG, 0.3),
    ]
    summary = summarize(latest_per_uri(records).values())
    assert summary["by_version"]["sha256:aaa"] == {"images": 2, "with_truth": 2, "correct": 1, "top1_accuracy": 0.5, "mean_score": pytest.approx(0.7)}
    assert summary["by_version"]["sha256:bbb"]["top1_accuracy"] == 1.0
    assert summary["by_version"]["unknown"]["images"] == 1
    markdown = write_report(summary, tmp_path / "report", "test")[0].read_text()
    assert "## By model version" in markdown and "| sha256:aaa | 2 | 2 | 1 | 50.0% | 0.700 |" in markdown
