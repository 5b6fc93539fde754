"""The compiled CPU forward: padded to one batch shape (no recompiles), built in the background
while batches run eagerly, equal to eager within rounding, and a failed compile stays eager."""


import pytest
import torch

from inference import compiled
from inference.compiled import CompiledModel, compiles
from inference.model import load_model
from inference.settings import ImageSettings, ModelSettings, StorageSettings

SETTINGS = ModelSettings(name="resnet18", weights="none", device="cpu", precision="fp32", compile=False)


def test_auto_compiles_on_cpus_with_native_bf16_only(monkeypatch):
    monkeypatch.setattr(compiled, "cpu_has_native_bf16", lambda: True)
    assert compiles("auto", torch.device("cpu")) and compiles(True, torch.device("cpu"))
    assert not compiles("auto", torch.device("cuda")) and not compiles(False, torch.device("cpu"))
    monkeypatch.setattr(compiled, "cpu_has_native_bf16", lambda: False)
    assert not compiles("auto", torch.device("cpu")) and compiles(True, torch.device("cpu"))


def test_the_setting_reads_auto_and_booleans_from_text():
    assert ModelSettings(compile="auto").compile == "auto"
    assert ModelSettings(compile="true").compile is True and ModelSettings(compile="0").compile is False


@pytest.mark.slow  # compiles resnet18: about a minute on 2 cores
def test_padded_batches_match_eager_and_never_compile_again(tmp_path):
    from torch._dynamo.utils import counters

    model = load_model(SETTINGS)
    fast = CompiledModel.compile(model, batch_size=4, cache_dir=str(tmp_path / "cache"))
    graphs = counters["stats"]["unique_graphs"]
    crops = torch.randint(0, 255, (11, 3, 224, 224), dtype=torch.uint8)
    for rows in (1, 3, 4, 11):  # short, exact, and longer than the compiled batch (chunks)
        got, expected = fast.predict(crops[:rows]), model.predict(crops[:rows])
        assert got.shape == expected.shape == (rows, 1000)
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
        assert torch.equal(got.argmax(1), expected.argmax(1))
    assert counters["stats"]["unique_graphs"] == graphs  # no shape compiled again
    assert any((tmp_path / "cache").rglob("*")), "inductor wrote its cache where model.compile_cache_dir says"


@pytest.mark.slow  # compiles resnet18: about a minute on 2 cores
def test_a_worker_serves_eagerly_while_it_compiles_then_switches(tmp_path):
    from inference.runtime import BatchRunner

    settings = SETTINGS.model_copy(update={"compile": True, "compile_cache_dir": str(tmp_path / "cache")})
    runner = BatchRunner.start(settings, ImageSettings(decode_threads=1), StorageSettings(), "tcp://127.0.0.1:1", 2, warmup_batch=4)
    try:
        assert runner.compiling is not None
        eager = runner.predict
        crops = torch.randint(0, 255, (3, 3, 224, 224), dtype=torch.uint8)
        first = eager(crops)  # served at once, while the compile runs beside it
        runner.compiling.join()
        assert runner.predict is not eager and getattr(runner.predict, "__self__", None).__class__ is CompiledModel
        torch.testing.assert_close(runner.predict(crops), first, atol=1e-3, rtol=1e-3)
    finally:
        runner.close()


def test_a_compile_that_fails_leaves_the_worker_eager(monkeypatch, caplog):
    from inference.runtime import BatchRunner

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    settings = SETTINGS.model_copy(update={"compile": True})
    runner = BatchRunner.start(settings, ImageSettings(decode_threads=1), StorageSettings(), "tcp://127.0.0.1:1", 1, warmup_batch=2)
    try:
        runner.compiling.join()
        assert runner.predict == runner.loaded.predict
        assert "compiling the model failed; it keeps running eagerly: RuntimeError: no C++ compiler" in caplog.text
    finally:
        runner.close()


def test_a_worker_that_does_not_compile_says_how_it_runs(caplog):
    import logging

    from inference.runtime import BatchRunner

    caplog.set_level(logging.INFO, logger="inference.runtime")
    runner = BatchRunner.start(SETTINGS, ImageSettings(decode_threads=1), StorageSettings(), "tcp://127.0.0.1:1", 1, warmup_batch=2)
    try:
        assert runner.compiling is None
        assert "model resnet18 runs eagerly on cpu at fp32" in caplog.text
    finally:
        runner.close()
