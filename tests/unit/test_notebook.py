"""The Python API's pure parts: rows, their dtypes, the report from rows, argument errors."""

import pytest

pytest.importorskip("pandas")

from inference import COLUMNS, accuracy_report  # noqa: E402
from inference.client.notebook import _settings, row, to_frame  # noqa: E402
from inference.records.results import Failure, GroundTruth, ImageResult, ModelInfo, Prediction, Timings  # noqa: E402
from streams.service.readback import EVENT_COLUMNS, event_row  # noqa: E402

MODEL = ModelInfo("resnet18", "none", "fp32", "cpu", "random:seed=0")
CHIHUAHUA = Prediction(151, "n02085620", "Chihuahua", 0.9)
TERRIER = Prediction(180, "n02093256", "Staffordshire bullterrier", 0.6)


def results() -> list[ImageResult]:
    truth = GroundTruth("n02085620", "Chihuahua")
    return [
        ImageResult("s3://b/a.jpg", "a.jpg", CHIHUAHUA, (CHIHUAHUA, TERRIER), truth, True, None, MODEL, Timings(1, 2, 3, 4, 2), "w1"),
        ImageResult("s3://b/b.jpg", "b.jpg", TERRIER, (TERRIER, CHIHUAHUA), truth, False, None, MODEL, Timings(1, 2, 3, 4, 2), "w1"),
        ImageResult("s3://b/c.jpg", "c.jpg", None, (), None, None, Failure("decode", "not an image"), MODEL),
    ]


def test_rows_carry_every_column_with_its_dtype_and_a_failure_is_a_row():
    frame = to_frame(row(result) for result in results())
    assert list(frame.columns) == list(COLUMNS)
    assert {name: str(dtype) for name, dtype in frame.dtypes.items() if COLUMNS[name] != "object"} == {
        name: dtype for name, dtype in COLUMNS.items() if dtype != "object"}
    assert frame.loc[2, "error_stage"] == "decode" and frame["score"].isna().tolist() == [False, False, True]
    assert frame.loc[0, "top_k"][1]["label"] == "Staffordshire bullterrier"
    assert frame["model_version"].tolist() == ["random:seed=0"] * 3  # which weights made each row


def test_the_report_from_a_dataframe_equals_the_report_from_records():
    frame = to_frame(row(result) for result in results())
    from_frame = accuracy_report(frame)
    from_records = accuracy_report([result.to_dict() for result in results()])
    assert from_frame.top1 == from_records.top1 == 0.5 and from_frame.top5 == 1.0
    assert from_frame.summary["errors"] == 1 and "top-1 accuracy" in repr(from_frame)
    assert from_frame.summary["by_version"] == from_records.summary["by_version"]
    assert from_frame.summary["by_version"]["random:seed=0"]["top1_accuracy"] == 0.5
    assert from_frame.confusions().to_dict("records") == [{"truth": "Chihuahua", "predicted": "Staffordshire bullterrier", "count": 1}]
    assert set(from_frame.figures()) == {"per_class_accuracy", "score_histogram", "reliability"}


def test_events_become_rows_and_a_dead_letter_names_its_stage():
    prediction = {"schema": "visionstream.prediction/v1", "uri": "s3://b/a.jpg", "name": "a.jpg", "latency_ms": 80.5, "backfill": False, "etag": "e",
                  "prediction": {"class_index": 151, "wnid": "n02085620", "label": "Chihuahua", "score": 0.9}}
    dead = {"schema": "visionstream.dead-letter/v1", "uri": "s3://b/x.jpg", "stage": "fetch", "reason": "superseded: ...", "failed_at": "2026-12-01T00:00:00Z"}
    rows = [event_row(prediction), event_row(dead)]
    assert set(rows[0]) == set(EVENT_COLUMNS)
    assert rows[1]["error_stage"] == "fetch" and rows[1]["name"] == "x.jpg" and rows[1]["published_at"] == "2026-12-01T00:00:00Z"


@pytest.mark.parametrize(("options", "names"), [
    ({"batch_size": 0}, "batch_size"), ({"batch_size": True}, "batch_size"), ({"precision": "fp64"}, "precision"), ({"model": ""}, "model"),
])
def test_a_bad_argument_names_itself(options, names):
    arguments = {"model": "resnet50", "weights": "none", "batch_size": 60, "precision": "auto", "config": None} | options
    with pytest.raises(ValueError, match=names):
        _settings(**arguments)
