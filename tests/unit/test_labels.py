import torchvision

from inference.records.labels import ClassTable, Truth, imagenet_wnids, match_truth, parse_truth
from inference.settings import TruthSettings

PATTERN = TruthSettings().pattern


def test_wnid_table_is_imagenet_order_and_agrees_with_torchvision_labels():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000
    assert list(wnids) == sorted(wnids)  # torchvision's class order is the sorted wnids
    categories = torchvision.models.ResNet50_Weights.DEFAULT.meta["categories"]
    assert wnids[151] == "n02085620" and categories[151] == "Chihuahua"
    assert wnids[207] == "n02099601" and categories[207] == "golden retriever"
    assert wnids[0] == "n01440764" and categories[0] == "tench"


def test_truth_from_the_stanford_dogs_layout():
    assert parse_truth("Images/n02085620-Chihuahua/n02085620_10074.jpg", PATTERN) == Truth("n02085620", "Chihuahua")
    assert parse_truth("s3://b/dogs/Images/n02086240-Shih-Tzu/n02086240_1082.jpg", PATTERN) == Truth("n02086240", "Shih-Tzu")
    assert parse_truth("/data/Images/n02099601-golden_retriever/x.jpg", PATTERN) == Truth("n02099601", "golden_retriever")


def test_keys_without_truth_give_none():
    assert parse_truth("uploads/2026/cat.jpg", PATTERN) is None
    assert parse_truth("Images/Chihuahua/n02085620_1.jpg", PATTERN) is None


def test_custom_pattern_without_label_group():
    assert parse_truth("by-wnid/n02085620/photo.png", r"by-wnid/(?P<wnid>n\d{8})/") == Truth("n02085620", None)


def test_match_is_by_wnid_and_null_without_truth():
    truth = Truth("n02086240", "Shih-Tzu")
    assert match_truth("n02086240", truth) is True  # the tutorial's regex on names missed 'Shih-Tzu'
    assert match_truth("n02085620", truth) is False
    assert match_truth("n02085620", None) is None


def test_class_table_pairs_labels_with_wnids():
    table = ClassTable.imagenet(torchvision.models.ResNet50_Weights.DEFAULT.meta["categories"])
    assert len(table) == 1000 and table.labels[151] == "Chihuahua" and table.wnids[151] == "n02085620"
