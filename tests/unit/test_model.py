import io
from pathlib import Path

import pytest
import torch

from inference.errors import ConfigError, WeightsUnavailable
from inference.settings import WeightsSpec
from inference.worker.model import load_model, resolve_precision, top_k
from inference.settings import ModelSettings

# compile off: in-process models of the model module's own tests (load_model alone never compiles)
SMALL = ModelSettings(name="resnet18", weights="none", device="cpu", precision="fp32", compile=False)


def test_softmax_is_per_image_not_the_first_images_for_all():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 9.0], [1.0, 1.0, 1.0]])
    scores, indices = top_k(logits, 2)
    assert indices[:, 0].tolist() == [0, 2, 0]
    assert scores[0, 0].item() == pytest.approx(torch.softmax(logits[0], 0)[0].item())
    assert scores[1, 0].item() == pytest.approx(torch.softmax(logits[1], 0)[2].item())
    assert scores[2, 0].item() == pytest.approx(1 / 3)
    assert torch.all(scores[:, 0] >= scores[:, 1])


def test_top_k_never_asks_for_more_classes_than_exist():
    scores, _ = top_k(torch.zeros(2, 3), 5)
    assert scores.shape == (2, 3)


@pytest.mark.parametrize(
    ("spec", "kind"),
    [("DEFAULT", "torchvision"), ("IMAGENET1K_V1", "torchvision"), ("none", "none"), ("None", "none"),
     ("/ckpt/model.pt", "checkpoint"), ("s3://bucket/m.pt", "checkpoint"), ("model.pth", "checkpoint")],
)
def test_weights_spec(spec: str, kind: str):
    assert WeightsSpec.parse(spec).kind == kind


def test_random_init_is_seeded_and_in_eval_mode():
    first, second = load_model(SMALL), load_model(SMALL)
    assert not first.module.training
    for a, b in zip(first.module.state_dict().values(), second.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert first.classes.labels[151] == "Chihuahua"
    assert first.info.weights == "none" and first.info.precision == "fp32"


def test_predict_returns_float_logits_per_image():
    model = load_model(SMALL)
    logits = model.predict(torch.randn(3, 3, 224, 224))
    assert logits.shape == (3, 1000) and logits.dtype == torch.float32


def test_bf16_autocast_runs_on_cpu_and_gives_float_logits():
    fp32 = load_model(SMALL)
    bf16 = load_model(SMALL.model_copy(update={"precision": "bf16"}))
    batch = torch.randn(4, 3, 224, 224)
    out = bf16.predict(batch)
    assert out.dtype == torch.float32 and out.shape == fp32.predict(batch).shape


def test_checkpoint_round_trip(tmp_path: Path):
    torch.manual_seed(123)
    source = load_model(SMALL.model_copy(update={"seed": 123}))
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in source.module.state_dict().items()}
    path = tmp_path / "tuned.pt"
    torch.save({"state_dict": state}, path)
    loaded = load_model(SMALL.model_copy(update={"weights": str(path)}))
    for name, value in loaded.module.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert loaded.info.weights == str(path)


def test_missing_checkpoint_names_the_alternatives(tmp_path: Path):
    with pytest.raises(WeightsUnavailable, match="not found.*--weights none"):
        load_model(SMALL.model_copy(update={"weights": str(tmp_path / "missing.pt")}))


def test_checkpoint_that_is_not_a_state_dict(tmp_path: Path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(WeightsUnavailable, match="not a torch state_dict"):
        load_model(SMALL.model_copy(update={"weights": str(path)}))


def test_checkpoint_for_another_architecture(tmp_path: Path):
    path = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(WeightsUnavailable, match="does not fit the model"):
        load_model(SMALL.model_copy(update={"weights": str(path)}))


def test_pretrained_weights_that_cannot_be_had_fail_with_one_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache; this machine has no network
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    with pytest.raises(WeightsUnavailable, match="IMAGENET1K_V1.*not in the torch cache.*--weights none"):
        load_model(SMALL.model_copy(update={"weights": "IMAGENET1K_V1"}))


def _no_network(*args, **kwargs):
    raise OSError("network unreachable")


def test_unknown_model_and_weights_names():
    with pytest.raises(ConfigError, match="not a torchvision classification model"):
        load_model(SMALL.model_copy(update={"name": "resnet51"}))
    with pytest.raises(ConfigError, match="not one of DEFAULT"):
        load_model(SMALL.model_copy(update={"weights": "IMAGENET9K"}))


@pytest.mark.parametrize(("native_bf16", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision(monkeypatch: pytest.MonkeyPatch, native_bf16: bool, expected: str):
    import inference.worker.model

    monkeypatch.setattr(inference.worker.model, "cpu_has_native_bf16", lambda: native_bf16)  # the CPU-flag seam
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"  # whatever the CPU has
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"  # an explicit choice is kept


def test_a_uint8_batch_is_normalised_on_the_device_like_the_float_path():
    from inference.worker.images import normalization, normalize

    model = load_model(SMALL)
    crops = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    expected = model.predict(normalize(crops, *normalization(model.preprocessing)))
    torch.testing.assert_close(model.predict(crops), expected, atol=1e-4, rtol=1e-4)


def test_cuda_graphs_need_a_cuda_device():
    from inference.worker.model import GraphedModel

    with pytest.raises(ValueError, match="CUDA device"):
        GraphedModel.capture(load_model(SMALL), 4)


class PlantedPickle:
    """What an attacker plants in a shared torch cache: unpickling it runs code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pretrained_weights_are_loaded_without_unpickling_and_checked_against_their_digest(monkeypatch: pytest.MonkeyPatch, tmp_path):
    import hashlib
    import pickle

    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    cached.write_bytes(pickle.dumps({"fc.weight": PlantedPickle(str(marker))}))
    with pytest.raises(WeightsUnavailable, match="does not match its published digest"):
        load_model(ModelSettings(name="resnet18", weights="IMAGENET1K_V1", device="cpu", precision="fp32", compile=False))
    assert not marker.exists()

    # a file that does match its name's digest (made here, as no network is at hand) loads
    # through weights_only: a pickle that would run code is refused, a plain state_dict loads
    from inference.worker.model import _load_pretrained

    class Named:
        def __init__(self, url: str) -> None:
            self.url, self.meta = url, weights.meta

    def plant(payload: bytes) -> Named:
        name = f"resnet18-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
        (cached.parent / name).write_bytes(payload)
        return Named(f"https://example.invalid/models/{name}")

    with pytest.raises(WeightsUnavailable, match="cannot be loaded as a state_dict"):
        _load_pretrained("resnet18", plant(pickle.dumps({"fc.weight": PlantedPickle(str(marker))})), "IMAGENET1K_V1")
    assert not marker.exists()
    buffer = io.BytesIO()
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, buffer)
    module, digest = _load_pretrained("resnet18", plant(buffer.getvalue()), "IMAGENET1K_V1")
    assert torch.equal(module.state_dict()["fc.weight"], state["fc.weight"])
    assert digest == hashlib.sha256(buffer.getvalue()).hexdigest()  # the version events carry
    # the whole digest, where the operator pins it: a file that matches the 8-digit prefix alone is refused
    whole = hashlib.sha256(buffer.getvalue()).hexdigest()
    assert _load_pretrained("resnet18", plant(buffer.getvalue()), "IMAGENET1K_V1", whole.upper()) is not None
    with pytest.raises(WeightsUnavailable, match="not model.weights_sha256"):
        _load_pretrained("resnet18", plant(buffer.getvalue()), "IMAGENET1K_V1", whole[:8] + "0" * 56)


def test_a_checkpoint_loads_only_with_the_whole_digest_the_settings_pin(tmp_path: Path):
    import hashlib

    path = tmp_path / "tuned.pt"
    torch.save(load_model(SMALL).module.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    info = load_model(SMALL.model_copy(update={"weights": str(path), "weights_sha256": digest})).info
    assert info.weights == str(path) and info.version == f"sha256:{digest}"  # the bytes loaded, named in every event
    other = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    with pytest.raises(WeightsUnavailable, match=f"its SHA-256 is {digest}, not model.weights_sha256 {other}: refused"):
        load_model(SMALL.model_copy(update={"weights": str(path), "weights_sha256": other}))
    with pytest.raises(ValueError, match="weights_sha256"):
        ModelSettings(weights_sha256="11ad3fa6")  # a prefix is not a digest


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("https://user:s3cr3t@models.example/resnet.pt?X-Amz-Signature=abc", "https://models.example/resnet.pt"),
        ("s3://models/resnet50.pt", "s3://models/resnet50.pt"),
        ("/models/resnet50.pt", "/models/resnet50.pt"),
        ("https://models.example:8443/a.pt?token=t0k", "https://models.example:8443/a.pt"),
        ("simplecache::https://user:s3cr3t@models.example/m.pt", "simplecache::https://models.example/m.pt"),  # an fsspec chain
        ("filecache::s3://key:s3cr3t@models/m.pt?sig=x", "filecache::s3://models/m.pt"),
    ],
)
def test_a_checkpoint_uri_is_described_without_credentials(uri, shown):
    from inference.worker.model import redact_uri

    assert redact_uri(uri) == shown


def test_a_checkpoint_that_cannot_be_read_is_reported_without_its_token():
    with pytest.raises(WeightsUnavailable) as caught:
        load_model(SMALL.model_copy(update={"weights": "memory://user:t0ps3cret@nowhere/ckpt.pt?sig=s1gn4ture"}))
    assert "t0ps3cret" not in str(caught.value) and "s1gn4ture" not in str(caught.value)


def test_two_different_files_at_one_path_are_two_versions(tmp_path: Path):
    """A prediction's model names the weights loaded, not the setting: the same path holding
    other bytes is another version; random weights say their seed."""
    path = tmp_path / "model.pt"
    torch.save(load_model(SMALL).module.state_dict(), path)
    first = load_model(SMALL.model_copy(update={"weights": str(path)})).info
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in load_model(SMALL).module.state_dict().items()}, path)
    second = load_model(SMALL.model_copy(update={"weights": str(path)})).info
    assert first.weights == second.weights == str(path)
    assert first.version != second.version and first.version.startswith("sha256:") and len(first.version) == 7 + 64
    assert load_model(SMALL.model_copy(update={"seed": 7})).info.version == "random:seed=7"
