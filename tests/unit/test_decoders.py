"""Untrusted bytes decoded in processes the worker can kill (``inference.worker.decoders``): with
real decoder processes forked by their own server, hostile files generated here."""

import io
import os
import time

import numpy as np
import pytest
from PIL import Image

from inference.records.results import Failure
from inference.settings import ImageSettings
from inference.worker.decoders import KILL_GRACE_S, DecoderProcesses
from inference.worker.images import Preprocessing, decode_crop

SPEC = Preprocessing()


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


PHOTO = encoded(Image.fromarray(np.random.default_rng(7).integers(0, 255, (300, 400, 3), dtype=np.uint8)), "JPEG")


def one_call_webp(side: int = 6000) -> bytes:
    """A flat 36 MP WebP of 100 KB: libwebp decodes it in one native call (0.7 s on a 2-core
    EPYC), and Pillow's WebP plugin reads its bytes before: no deadline inside the process
    even sees it."""
    return encoded(Image.new("RGB", (side, side), (120, 30, 200)), "WEBP", quality=50, method=0)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def decoders():
    pool = DecoderProcesses(ImageSettings(decode_timeout_s=5.0), SPEC)
    yield pool
    pool.close()


def test_a_decoder_process_gives_the_crop_the_worker_would(decoders):
    crop = decoders.decode("photo.jpg", PHOTO)
    assert not isinstance(crop, Failure)
    assert crop.dtype.is_floating_point is False and tuple(crop.shape) == (3, 224, 224)
    assert (crop.int() - decode_crop(PHOTO, "photo.jpg", SPEC, 10**8).int()).abs().max() <= 1
    bad = decoders.decode("bad.jpg", b"\xff\xd8 not a jpeg")
    assert isinstance(bad, Failure) and bad.stage == "decode" and bad.message


def test_an_image_past_its_deadline_in_one_native_call_is_killed_not_abandoned():
    hostile = one_call_webp()
    deadline_s = 0.05
    started = time.perf_counter()
    decode_crop(hostile, "slow.webp", SPEC, 10**8, timeout_s=deadline_s)  # in process: decoded, the deadline never seen
    in_process_s = time.perf_counter() - started
    assert in_process_s > 3 * (deadline_s + KILL_GRACE_S)  # else the file proves nothing on this machine
    pool = DecoderProcesses(ImageSettings(decode_timeout_s=deadline_s, max_pixels=10**8), SPEC)
    try:
        assert not isinstance(pool.decode("warm.jpg", PHOTO), Failure)  # the server is up
        [pid] = pool.pids()
        started = time.perf_counter()
        late = pool.decode("slow.jpg", hostile)  # named .jpg: the bytes decide
        took = time.perf_counter() - started
        assert isinstance(late, Failure) and late.stage == "decode" and "images.decode_timeout_s" in late.message
        assert took < min(deadline_s + KILL_GRACE_S + 1.0, in_process_s), (took, in_process_s)
        deadline = time.monotonic() + 5
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not alive(pid)  # nothing of that image runs any more
        assert pool.replaced == 1 and pool.pids() == []
        assert not isinstance(pool.decode("next.jpg", PHOTO), Failure)  # a new process takes the next image
    finally:
        pool.close()


def test_a_decode_past_its_memory_bound_fails_that_image_alone():
    """36 MP decode to 108 MB of RGB: past a 64 MB bound the decoder runs out of memory (or
    dies), and the next image decodes."""
    pool = DecoderProcesses(ImageSettings(decode_timeout_s=30.0, decode_memory_mb=64), SPEC)
    try:
        failed = pool.decode("big.webp", one_call_webp())
        assert isinstance(failed, Failure) and failed.stage == "decode", failed
        assert "images.decode_memory_mb: 64" in failed.message, failed.message
        assert not isinstance(pool.decode("next.jpg", PHOTO), Failure)
    finally:
        pool.close()


def test_no_credential_reaches_a_decoder_process(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-in-a-decoder")
    monkeypatch.setenv("VISIONSTREAM_STORAGE__SECRET_ACCESS_KEY", "never-in-a-decoder")
    pool = DecoderProcesses(ImageSettings(), SPEC)
    try:
        assert not isinstance(pool.decode("photo.jpg", PHOTO), Failure)
        [pid] = pool.pids()
        with open(f"/proc/{pid}/environ", "rb") as environ:
            assert b"never-in-a-decoder" not in environ.read()
    finally:
        pool.close()


def test_closing_leaves_no_decoder_or_server_running():
    pool = DecoderProcesses(ImageSettings(), SPEC)
    assert not isinstance(pool.decode("photo.jpg", PHOTO), Failure)
    pids = [*pool.pids(), pool.server.process.pid]
    pool.close()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids)


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_a_batch_of_hostile_files_among_good_images_ends_in_time_within_a_memory_bound(tmp_path):
    """The held-out check of issue 35, on a real runner: good photos and hostile files named
    .jpg (36 MP WebPs that libwebp decodes in one call, a TIFF whose tiles dwarf it, a JPEG of
    marker segments) in one batch. Every good image is predicted; each hostile one is a decode
    failure within its deadline (plus the kill's grace), never the batch's; the worker's own
    memory does not grow by their pixels; afterwards no decoder process of theirs runs."""
    from inference.settings import ModelSettings, StorageSettings
    from inference.worker.model import load_model
    from inference.worker.runtime import BatchRunner, RunnerSettings

    from .test_hostile_images import tiled_tiff

    deadline_s = 0.3
    model = ModelSettings(name="resnet18", weights="none", device="cpu", precision="fp32", compile=False)
    images = ImageSettings(decode_timeout_s=deadline_s, decode_threads=2)
    runner = BatchRunner.around(load_model(model), RunnerSettings(model, images, StorageSettings(), "tcp://127.0.0.1:1", 2, 8))
    small = encoded(Image.new("RGB", (64, 48), (200, 120, 40)), "JPEG")
    hostile = {
        "webp-a.jpg": one_call_webp(), "webp-b.jpg": one_call_webp(6100), "webp-c.jpg": one_call_webp(6200),
        "tiles.jpg": tiled_tiff(1, 8192, 8192, 8192), "markers.jpg": small[:2] + b"\xff\xfe\x00\x02" * 70_000 + small[2:],
    }
    paths = []
    for index in range(6):
        path = tmp_path / f"n02085620_{index}.jpg"
        path.write_bytes(PHOTO)
        paths.append(str(path))
    for name, data in hostile.items():
        path = tmp_path / name
        path.write_bytes(data)
        paths.append(str(path))
    try:
        runner.classify(paths[:2], r"(?P<wnid>n\d{8})")  # the decoder processes are up
        before = rss_bytes()
        started = time.perf_counter()
        results = runner.classify(paths, r"(?P<wnid>n\d{8})")
        took = time.perf_counter() - started
        grown = rss_bytes() - before
        by_name = {result.name: result for result in results}
        assert all(by_name[f"n02085620_{index}.jpg"].prediction is not None for index in range(6))
        for name in hostile:
            assert by_name[name].prediction is None and by_name[name].error.stage == "decode", by_name[name]
        late = {name for name in hostile if "images.decode_timeout_s" in by_name[name].error.message}
        assert {"webp-a.jpg", "webp-b.jpg", "webp-c.jpg"} <= late  # (the marker walk may be late too, on a busy host)
        # three one-call decodes on two decode threads: two rounds of a deadline and its grace, then the rest
        assert took < 2 * (deadline_s + KILL_GRACE_S) + 3.0, took
        assert grown < 64 << 20, grown  # 36 MP of RGB is 108 MB a file: none of it in the worker
        assert runner.decoder.processes.replaced >= 3
        assert len(runner.decoder.processes.pids()) <= images.decode_threads
    finally:
        runner.close()


def test_on_the_device_path_only_jpegs_are_parsed_in_the_worker_and_the_rest_in_decoder_processes(monkeypatch):
    """With a device decoder (nvJPEG on a GPU; libjpeg-turbo on the CPU stands in for it at its
    seam), the worker reads the headers of the JPEGs it may decode on the device: a bounded
    marker walk under the image's deadline. Every other file, hostile TIFF layouts and
    one-call WebPs among them, goes to a decoder process unparsed."""
    from inference.settings import ModelSettings, StorageSettings
    from inference.worker import decoding
    from inference.worker.gpu import jpeg_decoder
    from inference.worker.model import load_model
    from inference.worker.runtime import BatchRunner, RunnerSettings

    from .test_hostile_images import tiled_tiff

    model = ModelSettings(name="resnet18", weights="none", device="cpu", precision="fp32", compile=False)
    images = ImageSettings(decode_timeout_s=0.3, decode_threads=2)
    runner = BatchRunner.around(load_model(model), RunnerSettings(model, images, StorageSettings(), "tcp://127.0.0.1:1", 1))
    runner.decoder.device_decoder = jpeg_decoder("cpu")
    parsed_here: list[str] = []
    real_read_header = decoding.read_header
    monkeypatch.setattr(decoding, "read_header", lambda data, uri, *args, **kwargs: (parsed_here.append(uri), real_read_header(data, uri, *args, **kwargs))[1])
    png = encoded(Image.new("RGB", (64, 48), (10, 200, 40)), "PNG")
    uris = ["photo.jpg", "tiles.jpg", "webp.jpg", "png.jpg"]
    try:
        outcomes = runner.decoder.decode_all(uris, [PHOTO, tiled_tiff(1, 8192, 8192, 8192), one_call_webp(), png])
        assert parsed_here == ["photo.jpg"]
        assert tuple(outcomes[0].shape) == tuple(outcomes[3].shape) == (3, 224, 224)
        assert all(isinstance(outcome, Failure) and outcome.stage == "decode" for outcome in outcomes[1:3]), outcomes[1:3]
        assert runner.decoder.processes.replaced >= 1  # the one-call WebP's process was killed at its deadline
    finally:
        runner.close()
