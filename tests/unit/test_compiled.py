"""The compiled CPU forward: an AOTInductor package per model, weights, precision, shape and code,
built once (in a process of its own) and loaded from the cache after; full batches in one call,
the rest in chunks; built while batches run eagerly on the same model; equal to eager within
rounding; a failed build is retried, then stays eager; native code is never loaded from a
directory other users can write to."""

import logging
import os
import threading
import time

import pytest
import torch

from inference.worker import compiled
from inference.worker.cachedir import private_dir
from inference.worker.compiled import CompiledModel, PackageBuilder, compiled_model, compiles, package_key
from inference.errors import BuildFailed, UnsafeCacheDir
from inference.worker.model import load_model
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
    [(60, 1, 4), (60, 2, 4), (60, 5, 5), (60, 8, 10), (60, 16, 20), (60, 32, 32), (64, 2, 4), (7, 1, 4), (1, 4, 1), (61, 2, 4)],
)
def test_the_compiled_chunk_grows_with_the_threads_and_is_never_the_whole_batch(batch_size, threads, chunk):
    """A partial batch pays for a few chunks, never for a whole batch: a chunk divides the batch
    where a divisor is near, else the last one is padded."""
    assert compiled.compiled_batch(batch_size, threads) == chunk
    assert compiled.compiled_shapes(batch_size, threads) == ((chunk,) if chunk == batch_size else (chunk, batch_size))


def test_a_package_is_named_by_the_weights_precision_batch_threads_and_cpu_it_was_built_for(monkeypatch):
    model = load_model(SETTINGS)
    key = package_key(model, 60)
    assert package_key(model, 60) == key  # stable: a restarted worker finds its package
    assert package_key(model, 30) != key
    assert package_key(model, 60, torch.get_num_threads() + 1) != key  # inductor writes the thread count into its kernels
    monkeypatch.setattr(compiled, "cpu_identity", lambda: "model name : another CPU")
    assert package_key(model, 60) != key
    monkeypatch.undo()
    monkeypatch.setattr(compiled.torchvision, "__version__", "0.0.1")
    assert package_key(model, 60) != key
    monkeypatch.undo()
    monkeypatch.setattr(compiled, "forward_code_digest", lambda: "the forward's code changed")
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


def _fake_load(monkeypatch):
    """Packages 'load' as their path (the seam after the build process)."""
    monkeypatch.setattr(compiled.CompiledModel, "load_runner", staticmethod(lambda model, batch_size, path: (path, 0.1)))
    monkeypatch.setattr(compiled, "_check_package", lambda path: None)


def test_a_refused_cache_dir_builds_in_a_private_one_that_is_removed_once_loaded(monkeypatch, tmp_path, caplog):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setattr(PackageBuilder, "build", lambda self, model, batch_size, target: target.write_bytes(b"package"))
    _fake_load(monkeypatch)
    built = compiled_model(load_model(SETTINGS), 4, str(shared)).path
    assert built.parent != shared and not built.parent.exists()  # built, loaded, and not left behind
    assert not any(shared.iterdir()) and "compile cache refused" in caplog.text


def test_a_package_others_could_have_written_is_not_loaded(monkeypatch, tmp_path, caplog):
    model = load_model(SETTINGS)
    path = compiled.package_path(model, 4, str(private_dir(str(tmp_path))))
    path.write_bytes(b"native code")
    path.chmod(0o666)
    loaded = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *args: loaded.append(args))
    monkeypatch.setattr(PackageBuilder, "build", _must_not_build)
    with pytest.raises(BuildFailed, match="no compiler here"):
        compiled_model(model, 4, str(tmp_path))
    assert not loaded and "unusable (UnsafeCacheDir" in caplog.text


def test_auto_without_a_cached_package_or_a_compiler_stays_eager(monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="inference.worker.compiled")
    monkeypatch.setattr(compiled, "_cpp_compiler", lambda: None)
    monkeypatch.setattr(PackageBuilder, "build", _must_not_build)
    assert compiled_model(load_model(SETTINGS), 4, str(tmp_path), "auto") is None
    assert "no C++ compiler to build one; the model runs eagerly" in caplog.text


def test_a_damaged_package_is_built_again(monkeypatch, tmp_path, caplog):
    model = load_model(SETTINGS)
    path = compiled.package_path(model, 4, str(private_dir(str(tmp_path))))
    path.write_bytes(b"not a package")
    built = []
    monkeypatch.setattr(PackageBuilder, "build", lambda *args: built.append(args) or _must_not_build())
    with pytest.raises(BuildFailed, match="no compiler here"):
        compiled_model(model, 4, str(tmp_path))
    assert "unusable" in caplog.text and built and not path.exists()


def test_workers_sharing_a_cache_build_a_package_once_and_clear_a_killed_build(monkeypatch, tmp_path):
    model = load_model(SETTINGS)
    path = compiled.package_path(model, 4, str(private_dir(str(tmp_path))))
    killed = [path.with_name(f".{path.stem}.999-1.pt2"), path.with_name(f".{path.stem}.999-1.weights")]
    for leftover in killed:
        leftover.write_bytes(b"half a package")
    builds, started = [], threading.Event()

    def slow_build(self, model, batch_size, target):
        builds.append(target)
        started.set()
        time.sleep(0.5)  # the other worker arrives meanwhile
        target.write_bytes(b"package")

    monkeypatch.setattr(PackageBuilder, "build", slow_build)
    _fake_load(monkeypatch)
    first = threading.Thread(target=compiled_model, args=(model, 4, str(tmp_path)))
    first.start()
    started.wait(10)
    assert compiled_model(model, 4, str(tmp_path)).path == path  # waited for the first build, then loaded it
    first.join()
    assert builds == [path] and not any(leftover.exists() for leftover in killed)


def test_full_batches_run_in_one_call_and_the_rest_as_the_cheapest_padded_calls():
    calls = []

    def runner(size):
        return lambda batch: calls.append((size, len(batch))) or torch.ones(len(batch), 1000)

    model = load_model(SETTINGS)
    package = CompiledModel({4: runner(4), 60: runner(60)}, {4: 0.1, 60: 1.0}, model, {})
    crops = torch.zeros(127, 3, 224, 224, dtype=torch.uint8)
    assert package.predict(crops).shape == (127, 1000)
    assert calls == [(60, 60), (60, 60), (4, 4), (4, 4)]  # 7 left: two chunks of 4 cost less than a padded 60
    assert package.plan(59) == [(0, 60)]  # 15 chunks (1.5 s) cost more than one padded call of 60 (1.0 s)
    assert package.plan(9) == [(0, 4), (4, 4), (8, 4)]
    assert CompiledModel({4: runner(4)}, {4: 0.1}, model, {}).plan(9) == [(0, 4), (4, 4), (8, 4)]
    chunks_cheaper = CompiledModel({4: runner(4), 60: runner(60)}, {4: 0.1, 60: 2.0}, model, {})  # as bf16 on an AVX-512 EPYC
    assert chunks_cheaper.plan(60) == [(start, 4) for start in range(0, 60, 4)]
    assert not chunks_cheaper.uses(60) and chunks_cheaper.uses(4) and package.uses(60)
    assert package.predict(torch.zeros(0, 3, 224, 224, dtype=torch.uint8)).shape == (0, 1000)  # eager: no rows


def _must_not_build(*args):
    raise BuildFailed("no compiler here")


def test_a_build_that_fails_says_why_in_one_line_and_one_that_is_killed_or_runs_out_of_memory_spares_the_worker(tmp_path):
    model = load_model(SETTINGS)
    folder = private_dir(str(tmp_path))
    builder = PackageBuilder(memory_mb=64, threads=1)  # 64 MiB: the build process cannot even import torch
    with pytest.raises(BuildFailed) as caught:
        builder.build(model, 4, compiled.package_path(model, 4, str(folder)))
    assert "model.compile_memory_mb: 64 MiB" in caught.value.reason, caught.value.reason
    assert "\n" not in caught.value.reason and len(caught.value.reason) < 600
    assert not list(folder.glob("*.pt2")) and not list(folder.glob(".*"))  # no partial package, no weights left
    assert compiled._reason(-9, "", False).startswith("the build process was killed by signal 9 (out of memory?")
    assert compiled._reason(1, "noise\nerror: RuntimeError: no C++ compiler\n", False) == "RuntimeError: no C++ compiler"


def test_the_build_process_gets_no_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("VISIONSTREAM_STORAGE__SECRET_KEY", "s3cr3t")
    monkeypatch.setenv("VISIONSTREAM_KAFKA__SASL_PASSWORD", "s3cr3t")
    env = compiled._build_env(tmp_path, 2)
    assert "s3cr3t" not in repr(env)
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path) and env["OMP_NUM_THREADS"] == "2"
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(tmp_path)  # this process's environment untouched


def test_a_failed_build_is_retried_with_backoff_and_says_why_once(monkeypatch, caplog, tmp_path):
    from inference.worker.runtime import BatchRunner, RunnerSettings

    attempts = []

    def flaky_build(self, model, batch_size, target):
        attempts.append(batch_size)
        if len(attempts) < 3:
            raise BuildFailed("RuntimeError: no C++ compiler")
        target.write_bytes(b"package")

    monkeypatch.setattr(PackageBuilder, "build", flaky_build)
    _fake_load(monkeypatch)
    monkeypatch.setattr(compiled, "RETRY_DELAYS_S", (0.01, 0.01, 0.01))
    settings = SETTINGS.model_copy(update={"compile": True, "compile_cache_dir": str(tmp_path)})
    runner = BatchRunner.start(RunnerSettings(settings, ImageSettings(decode_threads=1), StorageSettings(), "tcp://127.0.0.1:1", 1, warmup_batch=8))
    try:
        runner.forward.compiling.join(30)
        assert attempts == [4, 4, 4, 8]  # the chunk failed twice, then both shapes were built
        assert runner.forward_path == "compiled"
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "compiling model resnet18 failed" in r.message]
        assert len(warnings) == 1 and "RuntimeError: no C++ compiler" in warnings[0].message
    finally:
        runner.close()


def test_a_build_that_always_fails_leaves_the_worker_eager_and_says_so(monkeypatch, caplog, tmp_path):
    from inference.worker.runtime import BatchRunner, RunnerSettings

    monkeypatch.setattr(PackageBuilder, "build", lambda *args: (_ for _ in ()).throw(BuildFailed("RuntimeError: no C++ compiler")))
    monkeypatch.setattr(compiled, "RETRY_DELAYS_S", (0.01,))
    settings = SETTINGS.model_copy(update={"compile": True, "compile_cache_dir": str(tmp_path)})
    runner = BatchRunner.start(RunnerSettings(settings, ImageSettings(decode_threads=1), StorageSettings(), "tcp://127.0.0.1:1", 1, warmup_batch=2))
    try:
        runner.forward.compiling.join(30)
        assert runner.forward.predict == runner.loaded.predict and runner.forward_path == "eager"
        assert "failed (shape 2, attempt 2; giving up: it keeps running eagerly): RuntimeError: no C++ compiler" in caplog.text
    finally:
        runner.close()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("compiled"))


def test_eager_batches_run_while_the_package_builds_and_the_worker_then_runs_compiled(cache, caplog):
    """The default's cold start: the package is built (in its own process) while batches run on
    the same model; every batch is right, and the worker then runs compiled and agrees with eager.
    (Built in a thread of the worker, torch.export swapped the model's weights for fake tensors
    under the eager batches: both failed.)"""
    from inference.worker.runtime import BatchRunner, RunnerSettings

    caplog.set_level(logging.INFO, logger="inference")
    settings = SETTINGS.model_copy(update={"compile": "auto", "compile_cache_dir": cache})
    runner = BatchRunner.start(RunnerSettings(settings, ImageSettings(decode_threads=1), StorageSettings(), "tcp://127.0.0.1:1", 2, warmup_batch=8))
    torch.manual_seed(5)
    crops = torch.randint(0, 255, (9, 3, 224, 224), dtype=torch.uint8)
    expected = runner.loaded.predict(crops)
    try:
        assert runner.forward_path == "compiling"
        served = 0
        while runner.forward_path == "compiling":
            with runner.forward.model_lock:
                got = runner.forward.predict(crops)
            torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
            served += 1
        assert served > 1 and runner.forward_path == "compiled", caplog.text[-3000:]
        runner.forward.compiling.join(300)  # the full-batch shape too: kept where one call of 8 is cheaper than two of 4
        package = runner.forward.predict.__self__
        assert isinstance(package, CompiledModel) and sorted(package.runners) in ([4], [4, 8])
        assert ("now runs compiled (shapes 4+8" in caplog.text) != ("one call of 8" in caplog.text and "costs more than the chunks" in caplog.text)
        for rows in (1, 4, 8, 9):  # short, a chunk, a full batch, and longer
            got = runner.forward.predict(crops[:rows])
            torch.testing.assert_close(got, expected[:rows], atol=1e-3, rtol=1e-3)
            assert torch.equal(got.argmax(1), expected[:rows].argmax(1))
        assert "model resnet18 now runs compiled (shapes 4, fp32, package" in caplog.text
    finally:
        runner.close()


@pytest.mark.slow  # builds resnet18's package for chunks of 4: about 30 s on 2 cores
def test_a_restarted_worker_loads_its_packages_without_building(tmp_path, monkeypatch):
    model = load_model(SETTINGS)
    compiled_model(model, 4, str(tmp_path))  # built (in its own process) by a first worker
    monkeypatch.setattr(PackageBuilder, "build", _must_not_build)
    package = compiled_model(load_model(SETTINGS), 4, str(tmp_path))  # as a restarted worker: loaded, not built
    crops = torch.randint(0, 255, (11, 3, 224, 224), dtype=torch.uint8)
    torch.testing.assert_close(package.predict(crops), model.predict(crops), atol=1e-3, rtol=1e-3)


@pytest.mark.slow  # builds resnet18's bf16 package: about a minute on 2 cores
def test_the_bf16_package_agrees_with_fp32_on_the_best_class(cache):
    fp32 = load_model(SETTINGS)
    bf16 = compiled_model(load_model(SETTINGS.model_copy(update={"precision": "bf16"})), 8, cache)
    torch.manual_seed(3)
    crops = torch.randint(0, 255, (16, 3, 224, 224), dtype=torch.uint8)
    reference, got = fp32.predict(crops), bf16.predict(crops)
    assert got.dtype == torch.float32
    assert (reference.argmax(1) == got.argmax(1)).float().mean() >= 0.95


def test_a_closed_worker_kills_its_build_and_does_not_switch(cache, tmp_path):
    from inference.worker.runtime import BatchRunner, RunnerSettings

    settings = SETTINGS.model_copy(update={"compile": True, "compile_cache_dir": str(tmp_path)})
    runner = BatchRunner.start(RunnerSettings(settings, ImageSettings(decode_threads=1), StorageSettings(), "tcp://127.0.0.1:1", 1, warmup_batch=2))
    eager = runner.forward.predict
    builder = runner.forward.compiling.builder
    process = None
    deadline = time.monotonic() + 60
    while process is None and time.monotonic() < deadline:
        process = builder.process
        time.sleep(0.05)
    assert process is not None, "no build process started"
    wait_until = time.monotonic() + 30  # it lowers its own priority as it starts; its compilers inherit it
    while os.getpriority(os.PRIO_PROCESS, process.pid) < compiled.COMPILE_NICE and time.monotonic() < wait_until:
        time.sleep(0.05)
    assert os.getpriority(os.PRIO_PROCESS, process.pid) >= compiled.COMPILE_NICE
    runner.close()
    assert process.wait(10) != 0  # killed, not left to finish
    runner.forward.compiling.join(10)
    assert not runner.forward.compiling.is_alive() and runner.forward.predict is eager
    runner.forward.use(lambda batch: batch)
    assert runner.forward.predict is eager


def test_a_worker_that_does_not_compile_says_how_it_runs(caplog):
    from inference.worker.runtime import BatchRunner, RunnerSettings

    caplog.set_level(logging.INFO, logger="inference.worker.runtime")
    runner = BatchRunner.start(RunnerSettings(SETTINGS, ImageSettings(decode_threads=1), StorageSettings(), "tcp://127.0.0.1:1", 1, warmup_batch=2))
    try:
        assert runner.forward.compiling is None and runner.forward_path == "eager"
        assert "model resnet18 runs eagerly on cpu at fp32" in caplog.text
    finally:
        runner.close()


def test_torch_compile_on_a_gpu_gets_private_caches_not_the_shared_temp_folder(tmp_path, monkeypatch):
    """torch.compile's default caches are named after the user in the system temp folder, which
    anyone can create first: on a GPU with ``model.compile: true`` they go under the private
    ``model.compile_cache_dir``; an operator's own folders are kept, and refused where unsafe."""
    import os
    import stat

    from inference.errors import UnsafeCacheDir
    from inference.worker.cachedir import use_private_inductor_caches

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    use_private_inductor_caches(str(tmp_path / "cache"))
    for name, folder in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        path = os.environ[name]
        assert path == str((tmp_path / "cache" / folder).resolve())
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(shared))
    with pytest.raises(UnsafeCacheDir, match="writable by no one else"):
        use_private_inductor_caches(str(tmp_path / "cache"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_model_compiled_with_torch_compile_writes_its_caches_privately(tmp_path, monkeypatch):
    import os

    from inference.settings import ModelSettings
    from inference.worker.model import load_model

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    model = load_model(ModelSettings(name="resnet18", weights="none", device="cuda", precision="fp16", compile=True,
                                     compile_cache_dir=str(tmp_path / "cache")))
    model.predict(torch.zeros(2, 3, 224, 224, dtype=torch.uint8))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path.resolve()))
    assert any((tmp_path / "cache" / "inductor").iterdir())
