import io
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from inference.errors import ConfigError, FetchError
from inference.worker.gpu import jpeg_decoder
from inference.worker.model import load_model
from inference.records.results import Failure, ImageResult, Timings
from inference.settings import ImageSettings, ModelSettings, StorageSettings, TruthSettings
from inference.worker.runtime import build_result
from inference.worker.plugin import ResidentModel
from streams.embedded.samples import synthetic_photo

MODEL = load_model(ModelSettings(name="resnet18", weights="none", device="cpu", precision="fp32", compile=False))
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


# --- ResidentModel.classify: per-image failures are records; a failed forward pass raises ----

# compile off: many short-lived in-process runners about the plugin and batches; the compiled path has tests of its own
SETTINGS = ModelSettings(name="resnet18", weights="none", device="cpu", precision="fp32", compile=False)


def jpeg(seed: int, mode: str = "RGB", size: tuple[int, int] = (300, 240)) -> bytes:
    buffer = io.BytesIO()
    synthetic_photo(np.random.default_rng(seed), *size).convert(mode).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def resident() -> Iterator[ResidentModel]:
    plugin = ResidentModel(SETTINGS, ImageSettings(decode_threads=2), StorageSettings(), warmup_batch=4)
    plugin.load(SimpleNamespace(address="tcp://127.0.0.1:1"))  # what setup reads of a Worker
    yield plugin
    plugin.teardown(None)


def test_a_failed_forward_pass_raises_instead_of_failing_every_image(resident: ResidentModel, tmp_path: Path):
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg(1))

    def out_of_memory(batch: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    resident.runner.forward.predict = out_of_memory
    with pytest.raises(torch.OutOfMemoryError):
        resident.runner.classify([str(good)], PATTERN)


def test_bad_images_are_records_and_the_rest_are_classified(resident: ResidentModel, tmp_path: Path):
    files = {"a.jpg": jpeg(1), "b.png": _png(), "bad.jpg": b"not an image", "cut.jpg": jpeg(2)[:900]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    uris = [str(tmp_path / name) for name in files] + [str(tmp_path / "missing.jpg")]
    results = resident.runner.classify(uris, PATTERN)
    assert [r.error.stage if r.error else None for r in results] == [None, None, "decode", "decode", "fetch"]
    assert all(len(r.top_k) == 5 for r in results[:2])
    assert results[0].timings.batch_size == 5


def test_the_device_path_falls_back_per_image_to_the_cpu_path(resident: ResidentModel):
    """The device branch, run with libjpeg-turbo standing in for nvJPEG: one corrupt JPEG fails
    the batched call, the retry finds it, and it alone takes the CPU path (which reports it);
    PNG and CMYK never go to the device."""
    calls: list[int] = []
    decode = jpeg_decoder("cpu")

    def recording(encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        calls.append(len(encoded))
        return decode(encoded)

    resident.runner.decoder.device_decoder = recording
    data: list[bytes | FetchError] = [
        jpeg(1), _png(), jpeg(2, "L"), corrupt(jpeg(3)), jpeg(4, "CMYK"), FetchError("s3://b/k", "object not found"), jpeg(5), jpeg(6)[:-300],
    ]
    uris = [f"u{i}" for i in range(len(data))]
    outcomes = resident.runner.decoder.decode_all(uris, data)
    assert calls == [4, 1, 1, 1, 1]  # the plain, complete JPEGs in one call, then one at a time
    assert [type(o).__name__ for o in outcomes] == ["Tensor", "Tensor", "Tensor", "Failure", "Tensor", "Failure", "Tensor", "Failure"]
    assert outcomes[3].stage == "decode" and "corrupt or truncated" in outcomes[3].message
    assert outcomes[5].stage == "fetch"
    assert outcomes[7].stage == "decode"  # truncated: straight to the CPU path, which says so
    resident.runner.decoder.device_decoder = None
    cpu_only = resident.runner.decoder.decode_all(uris, data)
    for device_path, cpu_path in zip(outcomes, cpu_only, strict=True):
        if isinstance(device_path, torch.Tensor):
            assert torch.equal(device_path, cpu_path)  # same decoder here, same crops
        else:
            assert device_path == cpu_path


def test_gpu_decode_on_a_cpu_model_is_a_configuration_error():
    plugin = ResidentModel(SETTINGS, ImageSettings(decode="gpu"), StorageSettings())
    with pytest.raises(ConfigError, match="images.decode is gpu"):
        plugin.load(SimpleNamespace(address="tcp://127.0.0.1:1"))
    plugin.teardown(None)


def corrupt(data: bytes) -> bytes:
    """A JPEG with a sound header and end marker and broken scan data (two SOF markers)."""
    scan = data.index(b"\xff\xda")
    return data[: scan + 200] + b"\xff\xc0" * 50 + data[scan + 300 :]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (50, 40), (10, 200, 30, 128)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_batch_keeps_its_order_one_bad_image_fails_only_itself_and_the_timings_are_filled(resident: ResidentModel, tmp_path: Path):
    names = ["n02085620_1.jpg", "corrupt.jpg", "n02085620_2.jpg", "missing.jpg", "n02085620_3.jpg"]
    files = {names[0]: jpeg(1), names[1]: corrupt(jpeg(3)), names[2]: jpeg(2, size=(200, 320)), names[4]: jpeg(4, "L")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    uris = [str(tmp_path / name) for name in names]  # missing.jpg is never written
    results = resident.runner.classify(uris, PATTERN)
    assert [r.uri for r in results] == uris
    assert [r.error.stage if r.error else None for r in results] == [None, "decode", None, "fetch", None]
    for index in (0, 2, 4):  # each good image's record is its own: the same as classified alone
        [alone] = resident.runner.classify([uris[index]], PATTERN)
        assert [p.class_index for p in results[index].top_k] == [p.class_index for p in alone.top_k]
        assert [p.score for p in results[index].top_k] == pytest.approx([p.score for p in alone.top_k], abs=1e-5)
    assert len({tuple(p.score for p in results[i].top_k) for i in (0, 2, 4)}) == 3  # different images, told apart
    timings = results[0].timings
    assert all(r.timings == timings for r in results)  # one batch, one set of timings
    assert timings.batch_size == 5
    assert timings.fetch_ms > 0 and timings.decode_ms > 0 and timings.inference_ms > 0 and timings.queue_ms >= 0
    assert all(r.worker == "tcp://127.0.0.1:1" and r.model.name == "resnet18" for r in results)


def test_setup_loads_the_model_off_the_event_loop(monkeypatch: pytest.MonkeyPatch):
    """Dask awaits setup on the worker's event loop; the load runs in another thread, so the loop
    keeps serving (heartbeats) while a model downloads or a CUDA graph is captured."""
    import asyncio
    import threading

    plugin = ResidentModel(SETTINGS, ImageSettings(decode_threads=1), StorageSettings(), warmup_batch=4)
    loaded_in: list[threading.Thread] = []
    real_load = ResidentModel.load

    def load(self: ResidentModel, worker: object) -> None:
        loaded_in.append(threading.current_thread())
        real_load(self, worker)

    monkeypatch.setattr(ResidentModel, "load", load)

    async def run() -> threading.Thread:
        await plugin.setup(SimpleNamespace(address="tcp://127.0.0.1:1"))
        return threading.current_thread()

    loop_thread = asyncio.run(run())
    try:
        assert plugin.loaded is not None and loaded_in and loaded_in[0] is not loop_thread
    finally:
        plugin.teardown(None)


def test_a_batch_that_arrives_while_the_model_loads_waits_for_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Dask lists the plugin before its setup ends: a batch arriving then waits for the model,
    and never sees a half-built one."""
    import asyncio
    import threading
    import time

    from inference.worker import plugin as worker_module
    from inference.worker.plugin import classify_batch

    plugin = ResidentModel(SETTINGS, ImageSettings(decode_threads=1), StorageSettings(), warmup_batch=4)
    real_load = ResidentModel.load
    entered = threading.Event()

    def slow_load(self: ResidentModel, worker: object) -> None:
        entered.set()
        time.sleep(0.5)
        real_load(self, worker)

    monkeypatch.setattr(ResidentModel, "load", slow_load)
    monkeypatch.setattr(worker_module, "get_worker", lambda: SimpleNamespace(plugins={"p": plugin}, address="tcp://127.0.0.1:1"))
    (tmp_path / "a.jpg").write_bytes(jpeg(1))
    setup = threading.Thread(target=asyncio.run, args=(plugin.setup(SimpleNamespace(address="tcp://127.0.0.1:1")),))
    setup.start()
    try:
        assert entered.wait(30)
        [record] = classify_batch("p", [str(tmp_path / "a.jpg")], r"(?P<wnid>n\d{8})")
        assert record["error"] is None and record["prediction"] is not None
    finally:
        setup.join()
        plugin.teardown(None)


def test_a_failed_setup_leaves_no_half_built_model(monkeypatch: pytest.MonkeyPatch):
    import asyncio

    from inference.worker import plugin as worker_module
    from inference.errors import ModelNotResident
    from inference.worker.plugin import classify_batch

    plugin = ResidentModel(SETTINGS, ImageSettings(decode_threads=1), StorageSettings(), warmup_batch=4)
    from inference.worker import decoding

    monkeypatch.setattr(decoding, "_device_decoder", lambda mode, device: (_ for _ in ()).throw(RuntimeError("decoder set-up failed")))
    with pytest.raises(RuntimeError, match="decoder set-up failed"):
        asyncio.run(plugin.setup(SimpleNamespace(address="tcp://127.0.0.1:1")))
    monkeypatch.setattr(worker_module, "get_worker", lambda: SimpleNamespace(plugins={"p": plugin}, address="tcp://127.0.0.1:1"))
    with pytest.raises(ModelNotResident):
        classify_batch("p", ["a.jpg"], r"(?P<wnid>n\d{8})")
    plugin.teardown(None)


def test_a_model_that_failed_to_load_is_loaded_again_by_a_later_batch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The scheduler sets a registered plugin up once per worker and ignores registering it
    again: a load that failed (a checkpoint not there yet, a broken download) must be retried
    on the worker, after a backoff, or the worker answers every batch with an error forever."""
    import asyncio

    from inference.worker import plugin as worker_module
    from inference.errors import ModelLoadFailed
    from inference.worker.plugin import classify_batch

    plugin = ResidentModel(SETTINGS, ImageSettings(decode_threads=1), StorageSettings(), warmup_batch=4)
    real_load = ResidentModel.load
    attempts: list[int] = []

    def flaky_load(self: ResidentModel, worker: object) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("checkpoint s3://models/resnet.pt: connection reset")
        real_load(self, worker)

    monkeypatch.setattr(ResidentModel, "load", flaky_load)
    monkeypatch.setattr(worker_module, "RELOAD_BACKOFF_S", (0.3, 1.0))
    worker = SimpleNamespace(plugins={"p": plugin}, address="tcp://127.0.0.1:1")
    monkeypatch.setattr(worker_module, "get_worker", lambda: worker)
    with pytest.raises(OSError):
        asyncio.run(plugin.setup(worker))
    (tmp_path / "a.jpg").write_bytes(jpeg(1))
    with pytest.raises(ModelLoadFailed, match="connection reset"):  # within the backoff: says why, at once
        classify_batch("p", [str(tmp_path / "a.jpg")], r"(?P<wnid>n\d{8})")
    assert len(attempts) == 1
    import time

    time.sleep(0.35)  # the backoff passes
    with pytest.raises(ModelLoadFailed):  # this batch starts the reload in the background and goes elsewhere
        classify_batch("p", [str(tmp_path / "a.jpg")], r"(?P<wnid>n\d{8})")
    try:
        [record] = classify_batch("p", [str(tmp_path / "a.jpg")], r"(?P<wnid>n\d{8})")  # waits for the reload
        assert record["error"] is None and record["prediction"] is not None
        assert len(attempts) == 2 and plugin.failure is None and plugin.loads == 1
    finally:
        plugin.teardown(None)


def test_plugin_usage_counts_a_loading_model_and_waiting_batches_as_busy_by_the_workers_clock():
    import threading

    from inference.worker.plugin import PLUGIN_PREFIX, plugin_usage

    plugin = ResidentModel(SETTINGS, ImageSettings(), StorageSettings())
    worker = SimpleNamespace(plugins={plugin.name: plugin, "other": object()})
    assert plugin_usage(worker)[plugin.name][0] == 1  # not set up yet: loading
    plugin.ready = threading.Event()
    plugin.last_used = 0.0  # a clock reading from another host would be meaningless; this is the worker's own
    assert plugin_usage(worker)[plugin.name][0] == 1  # still loading
    plugin.ready.set()
    active, idle, lineage = plugin_usage(worker)[plugin.name]
    assert active == 0 and idle > 0 and set(plugin_usage(worker)) == {plugin.name} and plugin.name.startswith(PLUGIN_PREFIX)
    assert lineage is None  # registered by no stream deployment (a notebook's, say)
    del plugin.lineage  # as a plugin pickled by a release that recorded none
    assert plugin_usage(worker)[plugin.name][2] == "legacy"
    plugin.active_batches = 2  # running, or waiting for the model
    assert plugin_usage(worker)[plugin.name][0] == 2


def test_whatever_a_decoder_raises_for_one_image_is_that_images_dead_letter(tmp_path, monkeypatch):
    """A decoder that fails with something other than an image error (EOFError, struct.error: what
    Pillow's plugins raise on truncated headers) fails its image alone; the batch goes on. In the
    worker's own threads (``images.decode_processes: false``); in a decoder process: below."""
    import struct

    from PIL import Image

    from inference.worker import decoding
    from inference.worker.runtime import BatchRunner, RunnerSettings
    from inference.settings import ImageSettings, StorageSettings

    paths = []
    for name in ("n02085620_1.jpg", "n02085620_bad.jpg", "n02085620_2.jpg"):
        Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / name, "JPEG")
        paths.append(str(tmp_path / name))
    real = decoding.decode_crop

    def decode_crop(data, uri, *args, **kwargs):
        if "bad" in uri:
            raise struct.error("unpack requires a buffer of 4 bytes")
        return real(data, uri, *args, **kwargs)

    monkeypatch.setattr(decoding, "decode_crop", decode_crop)
    images = ImageSettings(decode_threads=1, decode_processes=False)
    runner = BatchRunner.start(RunnerSettings(SETTINGS, images, StorageSettings(), "tcp://127.0.0.1:1", 1, warmup_batch=3))
    try:
        results = runner.classify(paths, r"(?P<wnid>n\d{8})")
    finally:
        runner.close()
    bad = results[1]
    assert bad.prediction is None and bad.error.stage == "decode" and "error: unpack requires" in bad.error.message
    assert all(result.prediction is not None and result.error is None for result in (results[0], results[2]))


def test_whatever_a_decoder_raises_in_a_decoder_process_is_that_images_failure(monkeypatch):
    """The decoder process's own loop (``decoders.serve``, run here on a pipe): an exception that
    is not an image error, e.g. struct.error, is that image's answer; the next image is decoded."""
    import io
    import json
    import struct
    import threading
    from multiprocessing import Pipe

    from PIL import Image

    from inference.worker import decoders, images

    real = images.decode_crop

    def decode_crop(data, uri, *args, **kwargs):
        if "bad" in uri:
            raise struct.error("unpack requires a buffer of 4 bytes")
        return real(data, uri, *args, **kwargs)

    monkeypatch.setattr(images, "decode_crop", decode_crop)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, "JPEG")
    ours, theirs = Pipe()
    config = {"preprocessing": {"resize_size": 256, "crop_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                "interpolation": "bilinear"}, "max_pixels": 10**8, "draft": True, "max_scans": 100, "memory_mb": 0}
    serving = threading.Thread(target=decoders.serve, args=(theirs, json.dumps(config)), daemon=True)
    serving.start()
    answers = []
    for uri in ("bad.jpg", "good.jpg"):
        ours.send_bytes(json.dumps({"uri": uri, "timeout_s": 10.0}).encode())
        ours.send_bytes(buffer.getvalue())
        assert ours.poll(30), f"no answer for {uri}: the decoder's loop stopped"
        answers.append(json.loads(ours.recv_bytes()))
        if answers[-1]["ok"]:
            assert len(ours.recv_bytes()) == 3 * 224 * 224
    ours.close()
    serving.join(10)
    assert answers[0] == {"ok": False, "stage": "decode", "reason": "error: unpack requires a buffer of 4 bytes"}
    assert answers[1] == {"ok": True, "shape": [3, 224, 224]}
