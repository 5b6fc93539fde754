import io
import struct
import zlib

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageOps
from torchvision.transforms import functional as F

from inference.errors import ImageDecodeError
from inference.worker.images import (
    Preprocessing,
    decode,
    decode_crop,
    normalization,
    normalize,
    orient,
    preprocess,
    read_header,
    to_rgb,
)

WEIGHTS = torchvision.models.ResNet50_Weights.IMAGENET1K_V2


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_preprocessing_equals_the_weights_own_transforms():
    image = noise(300, 200)
    spec = Preprocessing.from_transforms(WEIGHTS.transforms())
    assert (spec.resize_size, spec.crop_size) == (232, 224)  # V2's own sizes, not the tutorial's 256/250
    expected = WEIGHTS.transforms()(image)
    actual = preprocess(decode(encoded(image), "x.png", 10**8), spec)
    assert actual.shape == (3, 224, 224)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_normalisation_is_applied():
    white = Image.new("RGB", (256, 256), (255, 255, 255))
    tensor = preprocess(white, Preprocessing())
    assert tensor[0].mean().item() == pytest.approx((1 - 0.485) / 0.229, abs=1e-4)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "I;16", "1"])
def test_odd_modes_become_rgb(mode: str):
    image = noise(64, 48).convert(mode) if mode != "I;16" else Image.new("I;16", (64, 48), 40000)
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    decoded = decode(encoded(image, fmt), f"x.{fmt}", 10**8)
    assert decoded.mode == "RGB" and decoded.size == (64, 48)


def test_transparent_pixels_go_over_white():
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    image = noise(60, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode(encoded(image, "JPEG", exif=exif.tobytes()), "x.jpg", 10**8)
    assert decoded.size == (30, 60)


def test_large_jpeg_decodes_in_draft_mode_at_reduced_size_and_close_to_full_decode():
    image = noise(2000, 1600).resize((250, 200)).resize((2000, 1600))  # smooth enough to compare
    data = encoded(image, "JPEG", quality=90)
    drafted = decode(data, "x.jpg", 10**8, draft_size=232)
    assert min(drafted.size) >= 232 and drafted.size[0] < 2000
    spec = Preprocessing.from_transforms(WEIGHTS.transforms())
    full = preprocess(decode(data, "x.jpg", 10**8), spec)
    fast = preprocess(drafted, spec)
    assert (full - fast).abs().mean().item() < 0.05


def test_not_an_image():
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        decode(b"hello, this is text", "notes.jpg", 10**8)


def test_empty_object():
    with pytest.raises(ImageDecodeError, match="empty"):
        decode(b"", "empty.jpg", 10**8)


def test_truncated_jpeg():
    data = encoded(noise(300, 300), "JPEG")
    with pytest.raises(ImageDecodeError, match="corrupt or truncated") as caught:
        decode(data[: len(data) // 3], "cut.jpg", 10**8)
    assert caught.value.stage == "decode" and caught.value.uri == "cut.jpg"
    assert isinstance(caught.value.__cause__, OSError)  # Pillow's own error kept as the root cause


def test_corrupt_jpeg_body():
    data = bytearray(encoded(noise(200, 200), "JPEG"))
    data[300:2000] = b"\x00" * 1700
    data[-2:] = b"\x00\x00"
    for decoder in (lambda: decode(bytes(data), "bad.jpg", 10**8), lambda: decode_crop(bytes(data), "bad.jpg", SPEC, 10**8)):
        with pytest.raises(ImageDecodeError, match="corrupt or truncated") as caught:
            decoder()
        assert caught.value.stage == "decode" and caught.value.uri == "bad.jpg"


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encoded(Image.new("L", (12000, 12000)), "PNG")  # small file, 144 Mpx
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode(bomb, "bomb.png", max_pixels=40_000_000)


PILLOW_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3  # Pillow's own default: it warns above, refuses above twice


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 grayscale PNG whose header claims ``width`` x ``height``: a bomb's header, cheaply."""
    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(data[ihdr - 4 : ihdr + 13]))
    return bytes(data)


def test_importing_images_leaves_pillows_process_wide_guard_alone():
    assert Image.MAX_IMAGE_PIXELS == PILLOW_MAX_IMAGE_PIXELS  # this module imported inference.worker.images above


def test_our_pixel_limit_decides_below_and_above_pillows_own():
    above_pillows = png_claiming(12_000, 12_000)  # 144 Mpx: more than Pillow's limit, less than twice it
    assert 12_000 * 12_000 > PILLOW_MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError, match="exceeds the limit of 40000000"):
        read_header(above_pillows, "x.png", max_pixels=40_000_000)  # ours, smaller than Pillow's, refuses
    with pytest.warns(Image.DecompressionBombWarning):
        header = read_header(above_pillows, "x.png", max_pixels=150_000_000)  # ours, larger, admits it
    assert (header.width, header.height) == (12_000, 12_000)
    with pytest.raises(ImageDecodeError, match="exceeds the limit") as caught:
        read_header(png_claiming(20_000, 20_000), "x.png", max_pixels=10**9)  # past Pillow's ceiling: refused all the same
    assert caught.value.stage == "decode"
    image = noise(40, 30)
    assert decode(encoded(image), "x.png", max_pixels=1_200).size == (40, 30)  # exactly at our limit
    with pytest.raises(ImageDecodeError, match="1200 pixels exceeds the limit of 1199"):
        decode_crop(encoded(image), "x.png", SPEC, max_pixels=1_199)


# --- the uint8 path: header first, torchvision.io for JPEG, Pillow for the rest ---------------

SPEC = Preprocessing.from_transforms(WEIGHTS.transforms())


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth structure plus grain, like the generated data sets: resizing it means something."""
    from streams.embedded.samples import synthetic_photo

    return synthetic_photo(np.random.default_rng(seed), width, height)


def reference(data: bytes) -> torch.Tensor:
    """What the weights' own transforms make of the bytes, decoded in full by Pillow."""
    with Image.open(io.BytesIO(data)) as image:
        return WEIGHTS.transforms()(to_rgb(ImageOps.exif_transpose(image)))


def assert_close_to_reference(crop: torch.Tensor, expected: torch.Tensor) -> None:
    """uint8 crop, normalised, against the reference, in grey levels: torch's uint8 resize and
    Pillow's round differently in a few pixels (measured: mean 0.002-0.004, max 1), and
    another libjpeg-turbo build may add a level; a shifted or flipped picture is far off."""
    assert crop.dtype == torch.uint8 and crop.shape == (3, 224, 224)
    actual = normalize(crop, *normalization(SPEC))
    levels = ((actual - expected) * torch.tensor(SPEC.std).view(3, 1, 1) * 255).abs()
    assert levels.mean().item() < 0.1, levels.mean().item()
    assert torch.quantile(levels.flatten(), 0.999).item() <= 1.01
    assert levels.max().item() <= 2.01


@pytest.mark.parametrize(("width", "height"), [(440, 390), (230, 500), (300, 200)])
def test_jpeg_through_torchvision_io_equals_the_weights_transforms(width: int, height: int):
    data = encoded(photo(width, height), "JPEG", quality=90)
    assert_close_to_reference(decode_crop(data, "x.jpg", SPEC, 10**8), reference(data))


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P"])
def test_other_modes_and_formats_through_pillow_equal_the_weights_transforms(mode: str):
    image = photo(320, 260).convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    data = encoded(image, fmt)
    assert_close_to_reference(decode_crop(data, f"x.{fmt}", SPEC, 10**8), reference(data))


def test_large_jpeg_takes_pillow_draft_and_stays_close_to_a_full_decode():
    data = encoded(photo(2000, 1600), "JPEG", quality=90)
    fast = normalize(decode_crop(data, "x.jpg", SPEC, 10**8, draft=True), *normalization(SPEC))
    full = normalize(decode_crop(data, "x.jpg", SPEC, 10**8, draft=False), *normalization(SPEC))
    assert (fast - full).abs().mean().item() < 0.05
    assert_close_to_reference(decode_crop(data, "x.jpg", SPEC, 10**8, draft=False), reference(data))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_on_tensors_is_pillows(orientation: int):
    image = noise(7, 4, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(image, "JPEG", exif=exif.tobytes(), quality=95)
    with Image.open(io.BytesIO(data)) as stored:
        expected = F.pil_to_tensor(ImageOps.exif_transpose(stored).convert("RGB"))
        assert torch.equal(orient(F.pil_to_tensor(stored.convert("RGB")), orientation), expected)
    assert read_header(data, "x.jpg", 10**8).orientation == orientation


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_decode_crop_honours_exif_orientation(orientation: int):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(photo(360, 250), "JPEG", exif=exif.tobytes(), quality=90)
    assert_close_to_reference(decode_crop(data, "x.jpg", SPEC, 10**8), reference(data))


def test_header_is_read_without_decoding_and_the_pixel_limit_comes_first():
    data = encoded(photo(300, 200), "JPEG")
    header = read_header(data[: len(data) // 3], "cut.jpg", 10**8)  # pixels missing, header intact
    assert (header.format, header.mode, header.width, header.height, header.plain_jpeg) == ("JPEG", "RGB", 300, 200, True)
    with pytest.raises(ImageDecodeError, match="exceeds the limit of 59999"):
        read_header(data, "x.jpg", max_pixels=59_999)
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_crop(encoded(Image.new("L", (12000, 12000)), "PNG"), "bomb.png", SPEC, max_pixels=40_000_000)
    assert not read_header(encoded(photo(40, 30).convert("CMYK"), "JPEG"), "c.jpg", 10**8).plain_jpeg


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "empty"), (b"hello, this is text", "not a recognised image format")],
)
def test_decode_crop_refuses_what_is_not_an_image(data: bytes, message: str):
    with pytest.raises(ImageDecodeError, match=message) as caught:
        decode_crop(data, "x.jpg", SPEC, 10**8)
    assert caught.value.stage == "decode"


def test_truncated_jpeg_that_torchvision_refuses_is_reported_by_pillow():
    data = encoded(photo(300, 300), "JPEG")
    with pytest.raises(ImageDecodeError, match="corrupt or truncated") as caught:
        decode_crop(data[: len(data) // 3], "cut.jpg", SPEC, 10**8)
    assert caught.value.stage == "decode" and caught.value.uri == "cut.jpg"


def test_normalize_is_to_tensor_then_normalize():
    crop_ = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    expected = F.normalize(F.convert_image_dtype(crop_, torch.float), mean=list(SPEC.mean), std=list(SPEC.std))
    torch.testing.assert_close(normalize(crop_, *normalization(SPEC)), expected, atol=1e-6, rtol=0)


def test_a_multi_picture_jpeg_takes_the_jpeg_path_and_shows_its_first_picture():
    first, second = photo(320, 260, seed=1), photo(320, 260, seed=2)
    buffer = io.BytesIO()
    first.save(buffer, "MPO", save_all=True, append_images=[second])
    data = buffer.getvalue()
    assert read_header(data, "x.jpg", 10**8).plain_jpeg
    assert_close_to_reference(decode_crop(data, "x.jpg", SPEC, 10**8), reference(data))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_each_image_is_opened_once_for_its_header_walk_and_decode(monkeypatch, fmt):
    """Pillow parses a header when it opens an image: a second open would parse untrusted bytes
    twice (a TIFF's strip table, a JPEG's markers) within the one deadline."""
    from inference.worker import images

    opened: list[int] = []
    real_open = images.Image.open
    monkeypatch.setattr(images.Image, "open", lambda *args, **kwargs: (opened.append(1), real_open(*args, **kwargs))[1])
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 255, (600, 800, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, fmt)
    crop = decode_crop(buffer.getvalue(), f"x.{fmt.lower()}", SPEC, 10**8, timeout_s=5.0)  # a large JPEG: Pillow's draft path
    assert tuple(crop.shape) == (3, 224, 224)
    assert len(opened) == 1
