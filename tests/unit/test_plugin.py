"""The model plugin crosses to the scheduler and every worker: it carries no credentials."""

import pickle

import cloudpickle
from pydantic import SecretStr

from inference.settings import ImageSettings, ModelSettings, StorageSettings
from inference.worker.plugin import ResidentModel

SECRET = "s3cr3t-that-must-not-travel"
# compile off: many short-lived in-process plugins; the compiled path has tests of its own
MODEL = ModelSettings(name="resnet18", weights="none", device="cpu", precision="fp32", compile=False)


def storage(secret: str = SECRET, key_id: str = "AKIAEXAMPLE") -> StorageSettings:
    return StorageSettings(endpoint_url="http://minio:9000", access_key_id=key_id, secret_access_key=SecretStr(secret))


def test_the_pickled_plugin_holds_no_secret_and_no_key_id():
    plugin = ResidentModel(MODEL, ImageSettings(), storage())
    for dumped in (pickle.dumps(plugin), cloudpickle.dumps(plugin)):  # Dask sends plugins with cloudpickle
        assert SECRET.encode() not in dumped and b"AKIAEXAMPLE" not in dumped
    restored = pickle.loads(pickle.dumps(plugin))
    assert restored.storage_settings.secret_access_key is None and restored.storage_settings.endpoint_url == "http://minio:9000"


def test_a_rotated_secret_keeps_the_same_resident_model():
    before = ResidentModel(MODEL, ImageSettings(), storage("old-secret", "KEY1"))
    after = ResidentModel(MODEL, ImageSettings(), storage("new-secret", "KEY2"))
    assert before.name == after.name
    assert "old-secret" not in before.name and "new-secret" not in after.name


def test_another_model_configuration_is_another_plugin():
    other = ModelSettings(name="resnet50", weights="none", device="cpu", precision="fp32", compile=False)
    assert ResidentModel(MODEL, ImageSettings(), storage()).name != ResidentModel(other, ImageSettings(), storage()).name
