"""The compiled CPU forward: an AOTInductor package per model, weights, precision and batch size,
built once and loaded from the cache after; padded to one batch shape; built in the background
while batches run eagerly; equal to eager within rounding; a failed build stays eager; native code
is never loaded from a directory other users can write to."""

import logging
import os
import threading
import time

import pytest
import torch

from inference import compiled
from inference.compiled import CompiledModel, UnsafeCacheDir, compiled_model, compiles, package_key, private_dir
from inference.model import load_model
from inference.settings import ImageSettings, ModelSettings, StorageSettings

SETTINGS = ModelSettings(name="resnet18", weights="none", device="cpu", precision="fp32", compile=False)


def test_auto_and_true_compile_on_the_cpu_only():
    assert compiles("auto", torch.device("cpu")) and compiles(True, torch.device("cpu"))
    assert not compiles("auto", torch.device("cuda")) and not compiles(True, torch.device("cuda"))
    assert not compiles(False, torch.device("cpu"))


def test_the_setting_reads_auto_and_booleans_from_text():
    assert ModelSettings(compile="auto").compile == "auto"
    assert ModelSettings(compile="true").compile is True and ModelSettings(compile="0").compile is False


@pytest.mark.parametrize(
    ("batch_size", "threads", "chunk"),
    [(60, 1, 4), (60, 2, 4), (60, 5, 5), (60, 8, 10), (60, 16, 20), (60, 32, 60), (64, 2, 4), (7, 1, 7), (1, 4, 1), (61, 2, 61)],
)
def test_the_compiled_chunk_divides_the_batch_and_grows_with_the_threads(batch_size, threads, chunk):
    assert compiled.compiled_batch(batch_size, threads) == chunk


def test_a_package_is_named_by_the_weights_precision_batch_threads_and_cpu_it_was_built_for(monkeypatch):
    model = load_model(SETTINGS)
    key = package_key(model, 60)
    assert package_key(model, 60) == key  # stable: a restarted worker finds its package
    assert package_key(model, 30) != key
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # inductor writes the thread count into its kernels
        assert package_key(model, 60) != key
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(compiled, "_cpu_identity", lambda: "model name : another CPU")
    assert package_key(model, 60) != key
    monkeypatch.undo()
    assert package_key(load_model(SETTINGS.model_copy(update={"precision": "bf16"})), 60) != key
    assert package_key(load_model(SETTINGS.model_copy(update={"seed": 1})), 60) != key  # other weights
    with torch.no_grad():
        model.module.fc.bias[0] += 1.0  # one weight changed in place
    assert package_key(model, 60) != key


def test_a_cache_dir_others_can_write_to_or_redirect_is_refused(tmp_path):
    made = private_dir(str(tmp_path / "new" / "cache"))
    assert made.is_dir() and (made.stat().st_mode & 0o777) == 0o700
    for mode in (0o777, 0o770, 0o720):
        shared = tmp_path / f"shared-{mode:o}"
        shared.mkdir()
        shared.chmod(mode)
        with pytest.raises(UnsafeCacheDir, match="writable by no one else"):
            private_dir(str(shared))
    (tmp_path / "link").symlink_to(made)  # could be pointed elsewhere after the check
    with pytest.raises(UnsafeCacheDir, match="symbolic link"):
        private_dir(str(tmp_path / "link"))


def test_a_refused_cache_dir_builds_in_a_private_one_that_is_removed_once_loaded(monkeypatch, tmp_path, caplog):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setattr(compiled, "build_package", lambda model, batch_size, target: target.write_bytes(b"package"))
    monkeypatch.setattr(compiled.CompiledModel, "load", classmethod(lambda cls, model, batch_size, path: path))
    built = compiled_model(load_model(SETTINGS), 4, str(shared))
    assert built.parent != shared and not built.parent.exists()  # built, loaded, and not left behind
    assert not any(shared.iterdir()) and "compile cache refused" in caplog.text


def test_a_package_others_could_have_written_is_not_loaded(monkeypatch, tmp_path, caplog):
    model = load_model(SETTINGS)
    path = compiled.package_path(model, 4, str(private_dir(str(tmp_path))))
    path.write_bytes(b"native code")
    path.chmod(0o666)
    loaded = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *args: loaded.append(args))
    monkeypatch.setattr(compiled, "build_package", _must_not_build)
    with pytest.raises(RuntimeError, match="no compiler here"):
        compiled_model(model, 4, str(tmp_path))
    assert not loaded and "unusable (UnsafeCacheDir" in caplog.text


def test_auto_without_a_cached_package_or_a_compiler_stays_eager(monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="inference.compiled")
    monkeypatch.setattr(compiled, "_cpp_compiler", lambda: None)
    monkeypatch.setattr(compiled, "build_package", _must_not_build)
    assert compiled_model(load_model(SETTINGS), 4, str(tmp_path), "auto") is None
    assert "no C++ compiler to build one; the model runs eagerly" in caplog.text


def test_a_damaged_package_is_built_again(monkeypatch, tmp_path, caplog):
    model = load_model(SETTINGS)
    path = compiled.package_path(model, 4, str(private_dir(str(tmp_path))))
    path.write_bytes(b"not a package")
    built = []
    monkeypatch.setattr(compiled, "build_package", lambda *args: built.append(args) or _must_not_build())
    with pytest.raises(RuntimeError, match="no compiler here"):
        compiled_model(model, 4, str(tmp_path))
    assert "unusable" in caplog.text and built and not path.exists()


def test_workers_sharing_a_cache_build_a_package_once_and_clear_a_killed_build(monkeypatch, tmp_path):
    model = load_model(SETTINGS)
    path = compiled.package_path(model, 4, str(private_dir(str(tmp_path))))
    killed = path.with_name(f".{path.stem}.999-1.pt2")
    killed.write_bytes(b"half a package")
    builds, started = [], threading.Event()

    def slow_build(model, batch_size, target):
        builds.append(target)
        started.set()
        time.sleep(0.5)  # the other worker arrives meanwhile
        target.write_bytes(b"package")

    monkeypatch.setattr(compiled, "build_package", slow_build)
    monkeypatch.setattr(compiled.CompiledModel, "load", classmethod(lambda cls, model, batch_size, path: path))
    first = threading.Thread(target=compiled_model, args=(model, 4, str(tmp_path)))
    first.start()
    started.wait(10)
    assert compiled_model(model, 4, str(tmp_path)) == path  # waited for the first build, then loaded it
    first.join()
    assert builds == [path] and not killed.exists()


def test_the_background_compile_runs_at_a_lower_cpu_priority(monkeypatch):
    seen = {}

    class Package:
        path = "p.pt2"

        def predict(self, batch):
            return batch

    def fake_compiled_model(*args):
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return Package()

    monkeypatch.setattr(compiled, "compiled_model", fake_compiled_model)
    used = []
    compiled.compile_in_background(load_model(SETTINGS), 4, None, used.append, 1).join()
    assert seen["nice"] >= os.getpriority(os.PRIO_PROCESS, 0) + 1 and used


def _must_not_build(*args):
    raise RuntimeError("no compiler here")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("compiled"))


@pytest.mark.slow  # builds resnet18's package: about a minute on 2 cores
def test_padded_batches_match_eager_and_the_package_is_reused(cache, monkeypatch):
    model = load_model(SETTINGS)
    fast = compiled_model(model, 4, cache)
    assert fast.path.parent == private_dir(cache) and fast.path.suffix == ".pt2"
    crops = torch.randint(0, 255, (11, 3, 224, 224), dtype=torch.uint8)
    for rows in (1, 3, 4, 11):  # short, exact, and longer than the compiled batch (chunks)
        got, expected = fast.predict(crops[:rows]), model.predict(crops[:rows])
        assert got.shape == expected.shape == (rows, 1000)
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
        assert torch.equal(got.argmax(1), expected.argmax(1))
    monkeypatch.setattr(compiled, "build_package", _must_not_build)
    again = compiled_model(load_model(SETTINGS), 4, cache)  # as a restarted worker: loaded, not built
    torch.testing.assert_close(again.predict(crops), model.predict(crops), atol=1e-3, rtol=1e-3)


@pytest.mark.slow  # builds resnet18's bf16 package: about a minute on 2 cores
def test_the_bf16_package_agrees_with_fp32_on_the_best_class(cache):
    fp32 = load_model(SETTINGS)
    bf16 = compiled_model(load_model(SETTINGS.model_copy(update={"precision": "bf16"})), 8, cache)
    torch.manual_seed(3)
    crops = torch.randint(0, 255, (16, 3, 224, 224), dtype=torch.uint8)
    reference, got = fp32.predict(crops), bf16.predict(crops)
    assert got.dtype == torch.float32
    assert (reference.argmax(1) == got.argmax(1)).float().mean() >= 0.95


@pytest.mark.slow  # loads the package the test above built (or builds it)
def test_a_worker_serves_eagerly_while_it_compiles_then_switches(cache, caplog):
    from inference.runtime import BatchRunner

    caplog.set_level(logging.INFO, logger="inference")
    settings = SETTINGS.model_copy(update={"compile": True, "compile_cache_dir": cache})
    runner = BatchRunner.start(settings, ImageSettings(decode_threads=1), StorageSettings(), "tcp://127.0.0.1:1", 2, warmup_batch=4)
    try:
        assert runner.compiling is not None
        eager = runner.predict
        crops = torch.randint(0, 255, (3, 3, 224, 224), dtype=torch.uint8)
        first = eager(crops)  # served at once, while the compile runs beside it
        runner.compiling.join()
        assert runner.predict is not eager and getattr(runner.predict, "__self__", None).__class__ is CompiledModel
        assert runner.forward_path == "compiled"
        torch.testing.assert_close(runner.predict(crops), first, atol=1e-3, rtol=1e-3)
        assert "model resnet18 now runs compiled (batch 4, fp32, package" in caplog.text
    finally:
        runner.close()


def test_a_compile_that_fails_leaves_the_worker_eager(monkeypatch, caplog, tmp_path):
    from inference.runtime import BatchRunner

    monkeypatch.setattr(compiled, "build_package", lambda *args: (_ for _ in ()).throw(RuntimeError("no C++ compiler")))
    settings = SETTINGS.model_copy(update={"compile": True, "compile_cache_dir": str(tmp_path)})
    runner = BatchRunner.start(settings, ImageSettings(decode_threads=1), StorageSettings(), "tcp://127.0.0.1:1", 1, warmup_batch=2)
    try:
        runner.compiling.join()
        assert runner.predict == runner.loaded.predict and runner.forward_path == "eager"
        assert "compiling the model failed; it keeps running eagerly: RuntimeError: no C++ compiler" in caplog.text
    finally:
        runner.close()


def test_a_closed_worker_does_not_switch_to_a_compile_that_ends_late():
    from inference.runtime import BatchRunner

    runner = BatchRunner.start(SETTINGS, ImageSettings(decode_threads=1), StorageSettings(), "tcp://127.0.0.1:1", 1, warmup_batch=2)
    eager = runner.predict
    runner.close()
    runner.use(lambda batch: batch)
    assert runner.predict is eager


def test_a_worker_that_does_not_compile_says_how_it_runs(caplog):
    from inference.runtime import BatchRunner

    caplog.set_level(logging.INFO, logger="inference.runtime")
    runner = BatchRunner.start(SETTINGS, ImageSettings(decode_threads=1), StorageSettings(), "tcp://127.0.0.1:1", 1, warmup_batch=2)
    try:
        assert runner.compiling is None and runner.forward_path == "eager"
        assert "model resnet18 runs eagerly on cpu at fp32" in caplog.text
    finally:
        runner.close()
