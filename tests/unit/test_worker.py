from inference.model import load_model
from inference.results import Failure, ImageResult, Timings
from inference.settings import ModelSettings, TruthSettings
from inference.worker import build_result

MODEL = load_model(ModelSettings(name="resnet18", weights="none", device="cpu", precision="fp32"))
PATTERN = TruthSettings().pattern


def test_a_prediction_record_with_truth_and_match():
    uri = "s3://b/Images/n02085620-Chihuahua/n02085620_1.jpg"
    result = build_result(uri, ([0.9, 0.05], [151, 207]), MODEL, PATTERN, Timings(batch_size=2))
    assert result.name == "n02085620_1.jpg"
    assert result.prediction.label == "Chihuahua" and result.prediction.wnid == "n02085620"
    assert result.prediction.score == 0.9
    assert [p.class_index for p in result.top_k] == [151, 207]
    assert result.ground_truth.wnid == "n02085620" and result.match is True and result.error is None


def test_a_miss_and_a_key_without_truth():
    miss = build_result("Images/n02085620-Chihuahua/a.jpg", ([0.7], [207]), MODEL, PATTERN, Timings())
    assert miss.match is False
    unknown = build_result("uploads/cat.jpg", ([0.7], [207]), MODEL, PATTERN, Timings())
    assert unknown.ground_truth is None and unknown.match is None


def test_a_failure_record_keeps_truth_and_says_where_it_failed():
    result = build_result("Images/n02085620-Chihuahua/x.jpg", Failure("decode", "not an image"), MODEL, PATTERN, Timings())
    assert result.prediction is None and result.top_k == () and result.match is None
    assert result.error == Failure("decode", "not an image")


def test_records_round_trip_through_plain_json_dicts():
    import json

    result = build_result("Images/n02085620-Chihuahua/a.jpg", ([0.7, 0.2], [151, 3]), MODEL, PATTERN, Timings(1.0, 2.0, 0.0, 3.0, 2))
    assert ImageResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
