"""Objects built to hurt: scans that cost minutes, formats we never chose, and random bytes under
image names. Each ends as that image's own decode failure, at bounded cost, on every path."""

import io
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from inference.errors import DecodeOverdue, ImageDecodeError
from inference.worker import images
from inference.worker.images import ALLOWED_FORMATS, DEFAULT_MAX_SCANS, Preprocessing, decode_crop, jpeg_scans, read_header

SPEC = Preprocessing()


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def progressive(width: int = 256, height: int = 256, flat: bool = False) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 255, (height, width, 3), dtype=np.uint8)
    picture = Image.new("RGB", (width, height), (120, 130, 140)) if flat else Image.fromarray(pixels)
    return encoded(picture, "JPEG", progressive=True, quality=90)


def with_extra_scans(data: bytes, copies: int) -> bytes:
    """The hostile file: the last scan (SOS to EOI) repeated ``copies`` times before EOI."""
    last_scan = data.rindex(b"\xff\xda")
    scan = data[last_scan:-2]
    return data[:-2] + scan * copies + b"\xff\xd9"


def test_a_real_progressive_jpeg_is_decoded_and_its_scans_counted():
    data = progressive()
    scans = jpeg_scans(data, DEFAULT_MAX_SCANS)
    assert 2 <= scans <= 20  # what libjpeg writes for a progressive file
    assert decode_crop(data, "p.jpg", SPEC, 10**8).shape == (3, 224, 224)
    assert jpeg_scans(encoded(Image.new("RGB", (64, 64)), "JPEG"), DEFAULT_MAX_SCANS) == 1  # baseline: one scan


def test_a_jpeg_of_thousands_of_scans_is_refused_before_any_decoding():
    data = with_extra_scans(progressive(1024, 1024, flat=True), 4000)  # a flat picture: each scan is tiny
    assert len(data) < 1_000_000
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="more than 100 scans") as caught:
        decode_crop(data, "slow.jpg", SPEC, 10**8)
    assert caught.value.stage == "decode"
    assert time.perf_counter() - started < 1.0  # counted, not decoded (decoding takes seconds)
    with pytest.raises(ImageDecodeError, match="images.max_jpeg_scans"):
        read_header(data, "slow.jpg", 10**8)
    assert decode_crop(with_extra_scans(progressive(), 3), "few.jpg", SPEC, 10**8, max_scans=100).shape == (3, 224, 224)


def test_the_larger_a_progressive_jpeg_the_fewer_scans_it_may_have():
    data = with_extra_scans(progressive(1024, 1024, flat=True), 25)  # about 35 scans in all
    scans = jpeg_scans(data, DEFAULT_MAX_SCANS)
    assert images.SCANS_AT_PIXEL_LIMIT < scans < DEFAULT_MAX_SCANS
    assert decode_crop(data, "small-enough.jpg", SPEC, max_pixels=10**8).shape == (3, 224, 224)
    with pytest.raises(ImageDecodeError, match=f"progressive JPEG of {scans} scans over 1024x1024 pixels: too costly") as caught:
        decode_crop(data, "at-the-limit.jpg", SPEC, max_pixels=1024 * 1024)  # at the pixel limit: 20 scans at most
    assert caught.value.stage == "decode"
    ordinary = progressive(1024, 1024)
    assert decode_crop(ordinary, "ordinary.jpg", SPEC, max_pixels=1024 * 1024).shape == (3, 224, 224)


class SteppingClock:
    """time.monotonic for the test's own thread: each call one second later. Other threads (a
    Dask or compile thread left by an earlier test) get the real clock and move nothing: they
    would otherwise make the count depend on what else runs, and how fast."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.real = time.monotonic
        self.thread = threading.get_ident()

    def __call__(self) -> float:
        if threading.get_ident() != self.thread:
            return self.real()
        self.now += 1.0
        return self.now


@pytest.mark.parametrize(("fmt", "options"), [("PNG", {}), ("GIF", {}), ("BMP", {}), ("JPEG", {"quality": 95})])
def test_a_decode_past_its_deadline_ends_there_as_that_images_failure(fmt, options, monkeypatch):
    data = encoded(Image.fromarray(np.random.default_rng(3).integers(0, 255, (600, 800, 3), dtype=np.uint8)), fmt, **options)
    blocks = len(data) // images.DECODE_BLOCK_BYTES
    assert blocks > 40
    assert decode_crop(data, f"x.{fmt}", SPEC, 10**8, timeout_s=10.0).shape == (3, 224, 224)  # in time: decoded

    image = images.open_image(data, f"x.{fmt}", 10**8, timeout_s=20.0)
    started = time.monotonic()
    clock = SteppingClock(started)
    monkeypatch.setattr(images.time, "monotonic", clock)  # from here on, a second passes at every read
    with pytest.raises(DecodeOverdue):
        image.load()
    reads = clock.now - started
    assert reads <= 21 < blocks  # stopped at the first read past the deadline, long before the last block
    monkeypatch.undo()

    with pytest.raises(ImageDecodeError, match=r"(not decoded|header not read) within images.decode_timeout_s \(1e-09 s\)") as caught:
        decode_crop(data, f"x.{fmt}", SPEC, 10**8, timeout_s=1e-9)
    assert caught.value.stage == "decode"


def test_the_worker_decodes_under_images_decode_timeout_s():
    from inference.records.results import Failure
    from inference.settings import ImageSettings

    plugin = device_path_plugin()
    plugin.decoder.device_decoder = None  # the CPU path
    big = encoded(Image.fromarray(np.random.default_rng(4).integers(0, 255, (600, 800, 3), dtype=np.uint8)), "PNG")
    plugin.decoder.settings = ImageSettings(decode_timeout_s=1e-9, decode_processes=False)
    late = plugin.decoder.decode_one("big.png", big)
    assert isinstance(late, Failure) and late.stage == "decode" and "images.decode_timeout_s" in late.message
    plugin.decoder.settings = ImageSettings(decode_processes=False)
    assert plugin.decoder.decode_one("big.png", big).shape == (3, 224, 224)


def test_junk_between_segments_hides_no_scan():
    """libjpeg skips bytes that are not a marker between segments (with a warning) and decodes
    on: the count does the same, so a junk byte cannot smuggle thousands of scans past it."""
    data = with_extra_scans(progressive(64, 64, flat=True), 300)
    app0_end = 4 + int.from_bytes(data[4:6], "big")
    smuggled = data[:app0_end] + b"\x00junk" + data[app0_end:]
    assert jpeg_scans(smuggled, DEFAULT_MAX_SCANS) > DEFAULT_MAX_SCANS
    with pytest.raises(ImageDecodeError, match="more than 100 scans"):
        decode_crop(smuggled, "smuggled.jpg", SPEC, 10**8)
    assert jpeg_scans(b"\xff\xd8" + b"\xff" * 1_000_000, DEFAULT_MAX_SCANS) == 0  # fill bytes: no scan, and quick


def test_megabytes_of_fill_bytes_before_the_markers_end_at_the_deadline():
    """Pillow parses a JPEG's markers one byte at a time: 8 MB of 0xFF fill would take seconds
    (50 MB, a minute) before any pixel; the header read stops at images.decode_timeout_s."""
    with pytest.raises(ImageDecodeError, match=r"header not read within images.decode_timeout_s \(1e-06 s\)"):
        read_header(b"\xff\xd8" + b"\xff" * (8 << 20), "fill.jpg", 10**8, timeout_s=1e-6)


def test_a_thumbnails_scans_inside_exif_do_not_count():
    thumbnail = encoded(Image.new("RGB", (16, 16), (9, 9, 9)), "JPEG")
    exif = Image.Exif()
    exif[0x010E] = "x" * 10  # a description; the thumbnail rides in APP1 as raw bytes below
    main = encoded(Image.new("RGB", (64, 64), (200, 10, 10)), "JPEG", exif=exif.tobytes() + thumbnail * 3)
    assert jpeg_scans(main, DEFAULT_MAX_SCANS) == 1


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("ICO", {"sizes": [(64, 64)]}), ("EPS", {}), ("TGA", {}), ("PCX", {}), ("DDS", {}), ("PPM", {})],
)
def test_formats_we_did_not_choose_are_refused_whatever_the_key_says(fmt, options):
    try:
        data = encoded(Image.new("RGB", (64, 64), (10, 200, 10)), fmt, **options)
    except (OSError, KeyError, ValueError) as exc:  # this Pillow cannot write it: nothing to refuse
        pytest.skip(f"Pillow cannot write {fmt}: {exc}")
    assert fmt not in ALLOWED_FORMATS
    with pytest.raises(ImageDecodeError, match="not a recognised image format") as caught:
        decode_crop(data, "innocent.jpg", SPEC, 10**8)
    assert caught.value.stage == "decode"


def test_an_ico_wrapping_a_huge_png_is_refused_without_decoding_it():
    """Pillow's ICO plugin decodes an embedded PNG while merely opening it: never opened here."""
    inner = encoded(Image.new("L", (4000, 4000)), "PNG")
    header = b"\x00\x00\x01\x00\x01\x00" + bytes([0, 0, 0, 0]) + (1).to_bytes(2, "little") + (32).to_bytes(2, "little")
    entry_end = len(header) + 8
    ico = header + len(inner).to_bytes(4, "little") + entry_end.to_bytes(4, "little") + inner
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        read_header(ico, "icon.jpg", 1_000_000)


def test_every_allowed_format_is_accepted():
    picture = Image.new("RGB", (80, 60), (10, 120, 200))
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"):
        assert decode_crop(encoded(picture, fmt), f"x.{fmt.lower()}", SPEC, 10**8).shape == (3, 224, 224), fmt


SEEDS = {fmt: encoded(Image.new("RGB", (40, 30), (1, 2, 3)), fmt) for fmt in ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 400)),
)
def test_mutated_headers_decode_or_fail_as_that_image_alone(fmt, edits, cut):
    data = bytearray(SEEDS[fmt])
    for position, value in edits:
        if position < len(data):
            data[position] = value
    data = bytes(data[:cut] if cut is not None else data)
    try:
        crop = decode_crop(data, "m.jpg", SPEC, 10**7)
    except ImageDecodeError as exc:
        assert exc.stage == "decode" and exc.uri == "m.jpg"
    else:
        assert crop.shape == (3, 224, 224)
    assert jpeg_scans(data, 10) <= 11


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_under_an_image_name_are_a_decode_failure(data):
    with pytest.raises(ImageDecodeError) as caught:
        decode_crop(b"\xff\xd8" + data, "random.jpg", SPEC, 10**7)
    assert caught.value.stage == "decode"


def device_path_plugin():
    """A CPU model's runner that takes the device-decode path, the device decoder stubbed at its
    seam by libjpeg-turbo on the CPU (what nvJPEG does on a GPU, less the speed)."""
    from inference.worker.gpu import jpeg_decoder
    from inference.worker.model import load_model
    from inference.worker.runtime import BatchRunner, RunnerSettings
    from inference.settings import ImageSettings, ModelSettings, StorageSettings

    # compile off: a short-lived in-process runner about decoding; decoding in its threads, where
    # a test can reach the decoders (the decoder processes: test_decoders)
    settings = ModelSettings(name="resnet18", weights="none", device="cpu", precision="fp32", compile=False)
    runner = BatchRunner.around(load_model(settings), RunnerSettings(settings, ImageSettings(decode_processes=False), StorageSettings(), "tcp://127.0.0.1:1", torch_threads=1))
    runner.decoder.device_decoder = jpeg_decoder("cpu")
    return runner


DEVICE_PLUGIN = device_path_plugin()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 400)),
    noise_bytes=st.binary(max_size=300),
)
def test_the_device_decode_path_gives_each_image_a_crop_or_its_own_failure(fmt, edits, cut, noise_bytes):
    from inference.records.results import Failure

    data = bytearray(SEEDS[fmt])
    for position, value in edits:
        if position < len(data):
            data[position] = value
    mutated = bytes(data[:cut] if cut is not None else data)
    good = SEEDS["JPEG"]
    uris = ["a.jpg", "m.jpg", "r.jpg", "b.jpg"]
    outcomes = DEVICE_PLUGIN.decoder.decode_all(uris, [good, mutated, b"\xff\xd8" + noise_bytes, good])
    assert len(outcomes) == 4
    for outcome in outcomes:
        assert isinstance(outcome, Failure) and outcome.stage == "decode" or outcome.shape == (3, 224, 224)
    assert outcomes[0].shape == outcomes[3].shape == (3, 224, 224)  # the good ones never pay for the others


def test_the_device_decodes_at_most_its_pixel_budget_per_batch_and_the_cpu_the_rest():
    from inference.settings import ImageSettings

    plugin = device_path_plugin()
    on_device: list[int] = []
    cpu_decoder = plugin.decoder.device_decoder

    def counting(encoded_images):
        on_device.append(len(encoded_images))
        return cpu_decoder(encoded_images)

    plugin.decoder.device_decoder = counting
    photo = encoded(Image.fromarray(np.random.default_rng(5).integers(0, 255, (300, 400, 3), dtype=np.uint8)), "JPEG")
    plugin.decoder.settings = ImageSettings(device_batch_max_pixels=3 * 300 * 400, decode_processes=False)  # three such pictures
    outcomes = plugin.decoder.decode_all([f"p{i}.jpg" for i in range(7)], [photo] * 7)
    assert on_device == [3]
    assert all(outcome.shape == (3, 224, 224) for outcome in outcomes)
    reference = decode_crop(photo, "p.jpg", SPEC, 10**8)
    assert all((outcome.int() - reference.int()).abs().max() <= 1 for outcome in outcomes)


def tiled_tiff(width: int, height: int, tile_w: int, tile_h: int, tiles: int = 1) -> bytes:
    """A deflate-compressed, tiled, 8-bit grey TIFF written by hand: ``tiles`` tile entries of
    ``tile_w`` x ``tile_h`` zeros (all pointing at the same data), whatever the image's size."""
    import struct
    import zlib

    compressor = zlib.compressobj(9)
    row = b"\0" * tile_w
    tile = b"".join(compressor.compress(row) for _ in range(tile_h)) + compressor.flush()
    entries = 10
    arrays_at = 8 + 2 + entries * 12 + 4
    arrays = 8 * tiles if tiles > 1 else 0
    data_at = arrays_at + arrays
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1), (277, 3, 1, 1),
            (322, 4, 1, tile_w), (323, 4, 1, tile_h)]
    if tiles > 1:
        tags += [(324, 4, tiles, arrays_at), (325, 4, tiles, arrays_at + 4 * tiles)]
    else:
        tags += [(324, 4, 1, data_at), (325, 4, 1, len(tile))]
    out = b"II*\x00" + struct.pack("<IH", 8, entries) + b"".join(struct.pack("<HHII", *tag) for tag in tags) + struct.pack("<I", 0)
    if tiles > 1:
        out += struct.pack(f"<{tiles}I", *[data_at] * tiles) + struct.pack(f"<{tiles}I", *[len(tile)] * tiles)
    return out + tile


def test_a_tiff_whose_tiles_dwarf_its_image_is_refused_before_libtiff_allocates_them():
    """libtiff decodes a whole tile in one call, as large as declared: 1 x 8192 pixels in one
    8192 x 8192 tile would allocate 64 MiB (32,768 x 32,768: 1 GiB from a 1 MB file)."""
    bomb = tiled_tiff(1, 8192, 8192, 8192)
    assert len(bomb) < 200_000
    started = time.perf_counter()
    for read in (lambda: read_header(bomb, "bomb.jpg", 10**8), lambda: decode_crop(bomb, "bomb.jpg", SPEC, 10**8)):
        with pytest.raises(ImageDecodeError, match="tiles cover 67108864 pixels for a 1x8192 image") as caught:
            read()
        assert caught.value.stage == "decode"
    assert time.perf_counter() - started < 1.0  # refused from the tags, nothing decoded
    with pytest.raises(ImageDecodeError, match="a TIFF of 17 tiles where a 1000x1000 image has room for 16"):
        decode_crop(tiled_tiff(1000, 1000, 256, 256, tiles=17), "many.tif", SPEC, 10**8)


@pytest.mark.parametrize("compression", [None, "tiff_deflate", "tiff_lzw", "packbits"])
def test_ordinary_tiffs_still_decode(compression):
    assert decode_crop(tiled_tiff(1000, 1000, 256, 256, tiles=16), "tiled.tif", SPEC, 10**8).shape == (3, 224, 224)
    assert decode_crop(tiled_tiff(100, 100, 256, 256), "small-tiled.tif", SPEC, 10**8).shape == (3, 224, 224)
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    assert decode_crop(encoded(photo, "TIFF", compression=compression), "strips.tif", SPEC, 10**8).shape == (3, 224, 224)


def test_the_marker_walk_is_bounded_in_count_and_in_time(monkeypatch):
    """Megabytes of tiny marker segments, or of restart markers inside a scan, cost seconds of
    Python to walk: past MAX_JPEG_SEGMENTS segments the JPEG is refused; past the deadline the
    walk stops (it used to run before any deadline applied)."""
    small = encoded(Image.new("RGB", (64, 48), (200, 120, 40)), "JPEG")
    comments = small[:2] + b"\xff\xfe\x00\x02" * (images.MAX_JPEG_SEGMENTS + 10) + small[2:]
    with pytest.raises(ImageDecodeError, match=f"more than {images.MAX_JPEG_SEGMENTS} marker segments: too costly to walk"):
        read_header(comments, "comments.jpg", 10**8)
    sos = small.index(b"\xff\xda")
    restarts = small[: sos + 2 + int.from_bytes(small[sos + 2 : sos + 4], "big")] + b"\x00\xff\xd0" * 200_000 + small[-2:]
    monkeypatch.setattr(images.time, "monotonic", SteppingClock(time.monotonic()))
    with pytest.raises(DecodeOverdue):
        jpeg_scans(restarts, 100, deadline=images.time.monotonic() + 5)  # five seconds: five looks at the clock


def test_one_deadline_covers_the_header_and_the_decode(monkeypatch):
    data = encoded(Image.fromarray(np.random.default_rng(3).integers(0, 255, (600, 800, 3), dtype=np.uint8)), "PNG")
    clock = SteppingClock(time.monotonic())
    monkeypatch.setattr(images.time, "monotonic", clock)
    started = clock.now
    with pytest.raises(ImageDecodeError, match="within images.decode_timeout_s"):
        decode_crop(data, "x.png", SPEC, 10**8, timeout_s=20.0)
    assert clock.now - started <= 22  # header and decode together: not 20 s each
