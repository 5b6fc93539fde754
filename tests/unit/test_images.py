import io

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from inference.errors import ImageDecodeError
from inference.images import Preprocessing, decode, preprocess, to_rgb

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


def test_corrupt_jpeg_body():
    data = bytearray(encoded(noise(200, 200), "JPEG"))
    data[300:2000] = b"\x00" * 1700
    data[-2:] = b"\x00\x00"
    try:
        decode(bytes(data), "bad.jpg", 10**8)
    except ImageDecodeError as exc:
        assert exc.stage == "decode"


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encoded(Image.new("L", (12000, 12000)), "PNG")  # small file, 144 Mpx
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode(bomb, "bomb.png", max_pixels=40_000_000)
