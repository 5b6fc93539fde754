"""bytes -> upright uint8 crop -> normalised batch, equal to the weights' own transforms. Pure.

The weights' ``transforms()`` resize a Pillow image (in uint8), center-crop it, then scale and
normalise. This module stops at the uint8 crop [3, crop, crop]: it is 4x smaller than float32
to stack, pin and copy, and ``normalize`` finishes the job on the model's device. JPEG goes
through ``torchvision.io.decode_jpeg`` (libjpeg-turbo here; nvJPEG on a GPU, in
``inference.worker.gpu``); other formats, odd modes and whatever decode_jpeg refuses go through Pillow.
The byte limit is the fetcher's; the pixel limit (``images.max_pixels``) is checked on the
header, before any decode. Pillow's own process-wide guard (``Image.MAX_IMAGE_PIXELS``) is left
as Pillow sets it: ours decides below it; above twice it Pillow refuses first, and we report that
as the limit too, since lifting it would change what every other Pillow user in the process gets.
"""

from __future__ import annotations

import io
import re
import struct
import time
import warnings
from dataclasses import dataclass

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms.v2 import functional as F2

from inference.errors import DecodeOverdue, ImageDecodeError

# torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they still work,
# and TorchCodec is not on the GPU hosts. Silence that one notice, not image warnings in general.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated")

EXIF_ORIENTATION = 0x0112
# The formats an object may be decoded as, whatever its key says: Pillow knows about 40, some
# of which hand the bytes to other programs (EPS to Ghostscript) or decode a whole embedded
# image while merely opening (ICO wrapping a PNG). Every one of these is opened header first,
# so the pixel limit is checked before any pixel is decoded.
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF")
_OPENERS = tuple(name for name in ALLOWED_FORMATS if name != "MPO")  # Pillow opens MPO through its JPEG plugin
# A progressive JPEG is decoded scan by scan, each pass over every coefficient: a small file of
# thousands of tiny scans costs minutes. Real encoders write at most a few dozen
# (libjpeg-turbo's own advice for untrusted input is a limit of the same order).
DEFAULT_MAX_SCANS = 100
# JPEGs whose short side is at least this many times the resize target decode faster through
# Pillow's draft mode (libjpeg's DCT scaling: 1/2, 1/4, 1/8) than in full through decode_jpeg;
# below it decode_jpeg wins. Measured on this project's CPU (BENCHMARKS.md, "CPU decode").
DRAFT_MIN_SCALE = 2
# Each scan of a progressive JPEG is a pass over every block of the picture, so its cost is
# scans x pixels: a progressive JPEG may have at most this many scans at the pixel limit
# (proportionally more when smaller, up to max_jpeg_scans). Real encoders write about 10.
# At the default limit that is about 0.8 s of decoding on one core (AMD EPYC, AVX2: a 4096x4096
# JPEG of 100 scans, 1.7e9 scan-pixels, took 1.6 s).
SCANS_AT_PIXEL_LIMIT = 20
# Pillow parses headers and decodes PNG, GIF, BMP and the JPEGs it takes (large ones in draft
# mode, CMYK, what decode_jpeg refuses) block by block as it reads the encoded bytes: the
# deadline (``images.decode_timeout_s``) is checked at every read, so a decode past it ends
# within one block's work (smaller blocks than Pillow's 64 KiB: finer, at no measurable cost).
# What decodes in one call that no deadline stops is bounded by the pixel and scan limits
# instead: JPEGs through decode_jpeg (libjpeg-turbo) or nvJPEG, a progressive JPEG's scans,
# WebP, libtiff-compressed TIFF.
DECODE_BLOCK_BYTES = 8192
_FILL = re.compile(rb"\xff+")


@dataclass(frozen=True, slots=True)
class Preprocessing:
    """What the weights' ``transforms()`` does: resize, center crop, scale, normalise."""

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: InterpolationMode = InterpolationMode.BILINEAR

    @classmethod
    def from_transforms(cls, transforms: object) -> Preprocessing:
        """Read the parameters of a torchvision ``ImageClassification`` preset."""
        resize = transforms.resize_size  # type: ignore[attr-defined]
        crop = transforms.crop_size  # type: ignore[attr-defined]
        return cls(
            resize_size=resize[0] if isinstance(resize, list | tuple) else resize,
            crop_size=crop[0] if isinstance(crop, list | tuple) else crop,
            mean=tuple(transforms.mean),  # type: ignore[attr-defined]
            std=tuple(transforms.std),  # type: ignore[attr-defined]
            interpolation=transforms.interpolation,  # type: ignore[attr-defined]
        )


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What an image's header says, read without decoding its pixels."""

    format: str | None  # Pillow's name: "JPEG", "PNG", ...
    mode: str  # Pillow's mode: "RGB", "L", "CMYK", "P", ...
    width: int  # as stored, before EXIF orientation
    height: int
    orientation: int = 1  # EXIF orientation, 1-8

    @property
    def plain_jpeg(self) -> bool:
        """A JPEG that decode_jpeg turns into the same RGB as Pillow: YCbCr/RGB or grayscale, not
        CMYK. MPO (phone cameras' multi-picture JPEG) counts: both decoders read its first picture."""
        return self.format in ("JPEG", "MPO") and self.mode in ("RGB", "L")

    def draft_scale(self, resize_size: int) -> float:
        return min(self.width, self.height) / resize_size


class _EncodedBytes(io.BytesIO):
    """The encoded bytes as Pillow reads them, block by block while it decodes: a read after
    ``deadline`` (``time.monotonic``) raises DecodeOverdue, which ends the decode there."""

    def __init__(self, data: bytes, deadline: float) -> None:
        super().__init__(data)
        self.deadline = deadline

    def read(self, size: int | None = -1) -> bytes:
        if time.monotonic() > self.deadline:
            raise DecodeOverdue
        return super().read(size)


def open_image(
    data: bytes, uri: str, max_pixels: int, max_scans: int = DEFAULT_MAX_SCANS, timeout_s: float | None = None,
    deadline: float | None = None,
) -> Image.Image:
    """``Image.open`` (header only, no pixels decoded) of one of ``ALLOWED_FORMATS``, under our
    limits; ImageDecodeError for empty or unrecognised data, another format, more than
    ``max_pixels`` pixels (a decompression bomb), a JPEG of more than ``max_scans`` scans, or
    more scans than ``SCANS_AT_PIXEL_LIMIT`` allow for its size. With ``timeout_s``, the
    image's ``load()`` raises DecodeOverdue past that many seconds from now (or at ``deadline``,
    a ``time.monotonic()`` reading: one deadline for every step of one image), and so does the
    walk of a JPEG's markers."""
    if not data:
        raise ImageDecodeError(uri, "empty object")
    if deadline is None and timeout_s is not None:
        deadline = time.monotonic() + timeout_s
    encoded = io.BytesIO(data) if deadline is None else _EncodedBytes(data, deadline)
    try:
        image = Image.open(encoded, formats=_OPENERS)
    except Image.DecompressionBombError as exc:  # over Pillow's own ceiling (2 x MAX_IMAGE_PIXELS)
        raise ImageDecodeError(uri, f"exceeds the limit of Pillow's decompression-bomb guard: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(uri, f"not a recognised image format (accepted: {', '.join(ALLOWED_FORMATS)})") from exc
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, IndexError, KeyError, struct.error, NotImplementedError) as exc:
        raise ImageDecodeError(uri, f"corrupt or truncated image: {type(exc).__name__}: {exc}") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageDecodeError(uri, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
    if image.format in ("JPEG", "MPO"):
        try:
            scans = jpeg_scans(data, max_scans, deadline)
        except ValueError as exc:  # more marker segments than any real JPEG has
            image.close()
            raise ImageDecodeError(uri, f"a JPEG of {exc}: too costly to walk") from None  # the count says it all
        if scans > max_scans:
            image.close()
            raise ImageDecodeError(uri, f"a JPEG of more than {max_scans} scans (images.max_jpeg_scans): too costly to decode")
        if scans > 1 and scans * width * height > SCANS_AT_PIXEL_LIMIT * max_pixels:
            image.close()
            raise ImageDecodeError(
                uri, f"a progressive JPEG of {scans} scans over {width}x{height} pixels: too costly to decode (at most {SCANS_AT_PIXEL_LIMIT} scans at images.max_pixels)"
            )
    if image.format == "TIFF":
        problem = tiff_layout_problem(image)
        if problem is not None:
            image.close()
            raise ImageDecodeError(uri, problem)
    if timeout_s is not None:
        image.decodermaxblock = DECODE_BLOCK_BYTES
    return image


TIFF_SLACK_PIXELS = 2048 * 2048  # what the tiles or strips may cover past the image: one large tile


def tiff_layout_problem(image: Image.Image) -> str | None:
    """Why a TIFF's tile or strip layout is refused before decoding, or None. libtiff decodes a
    whole tile or strip in one call, as large as the file declares it, whatever the image's size:
    a 1 MB file declaring a 1 x 32,768 image in one 32,768 x 32,768 deflate tile makes it allocate
    1 GiB, and the pixel limit sees 32,768 pixels. So the pixels the tiles (or strips) cover, as
    declared, may exceed the image's by at most 4x plus one 2048 x 2048 tile, and there may be no
    more of them than the image has room for. Pure."""
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return None
    width, height = image.size
    planes = int(tags.get(277, 1) or 1) if int(tags.get(284, 1) or 1) == 2 else 1  # PlanarConfiguration 2: a set per sample
    try:
        if 322 in tags or 323 in tags:  # TileWidth, TileLength
            tile_w, tile_h = int(tags.get(322, 0)), int(tags.get(323, 0))
            count = len(_as_tuple(tags.get(324, ())))  # TileOffsets
            room = -(-width // max(1, tile_w)) * -(-height // max(1, tile_h)) * planes
            what, covered = "tiles", tile_w * tile_h * count
        else:
            rows = min(int(tags.get(278, height) or height), height)  # RowsPerStrip, as libtiff clips it
            count = len(_as_tuple(tags.get(273, ())))  # StripOffsets
            room = -(-height // max(1, rows)) * planes
            what, covered = "strips", width * rows * count
    except (TypeError, ValueError):
        return "corrupt TIFF: unreadable tile or strip tags"
    if count > room:
        return f"a TIFF of {count} {what} where a {width}x{height} image has room for {room}: refused"
    if covered > 4 * width * height * planes + TIFF_SLACK_PIXELS:
        return f"a TIFF whose {what} cover {covered} pixels for a {width}x{height} image: too costly to decode, refused"
    return None


def _as_tuple(value: object) -> tuple[object, ...]:
    return value if isinstance(value, tuple) else (value,)


MAX_JPEG_SEGMENTS = 65_536  # marker segments outside the scans' data; real encoders write dozens
MARKER_CHECK_EVERY = 1024  # steps of the marker walk between two looks at the deadline


def jpeg_scans(data: bytes, limit: int, deadline: float | None = None) -> int:
    """How many scans (SOS segments) a JPEG holds, counting no further than ``limit`` + 1. Walks
    the marker segments by their lengths (an EXIF thumbnail's scans inside APP1 do not count)
    and skips each scan's entropy-coded data (where 0xFF is always stuffed or a restart marker).
    Between segments, bytes that are not a marker are skipped up to the next 0xFF, as libjpeg
    does (it only warns), so junk cannot hide scans from the count; runs of 0xFF fill are skipped
    at C speed. Stops quietly where the data ends: the decoder reports what is wrong. Bounded:
    ValueError past ``MAX_JPEG_SEGMENTS`` segments, DecodeOverdue past ``deadline`` (megabytes
    of tiny segments or restart markers would otherwise cost seconds of Python). Pure but for
    the clock."""
    size = len(data)
    position, scans, steps = 2, 0, 0  # past SOI
    while scans <= limit:
        steps += 1
        if steps > MAX_JPEG_SEGMENTS:
            raise ValueError(f"more than {MAX_JPEG_SEGMENTS} marker segments")
        if deadline is not None and steps % MARKER_CHECK_EVERY == 0 and time.monotonic() > deadline:
            raise DecodeOverdue
        position = data.find(b"\xff", position)  # libjpeg's next_marker: junk before it is skipped
        if position < 0:
            break
        position = _FILL.match(data, position).end()  # past the 0xFF and any fill bytes
        if position >= size:
            break
        marker = data[position]
        position += 1
        if marker == 0xD9:  # EOI
            break
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            continue
        if position + 2 > size:
            break
        end = position + int.from_bytes(data[position : position + 2], "big")
        if marker != 0xDA:
            position = end
            continue
        scans += 1
        position = end
        while True:  # the entropy-coded data: up to the next marker that is not stuffing or a restart
            steps += 1
            if deadline is not None and steps % MARKER_CHECK_EVERY == 0 and time.monotonic() > deadline:
                raise DecodeOverdue
            position = data.find(b"\xff", position)
            if position < 0:
                return scans
            run_end = _FILL.match(data, position).end()
            if run_end >= size:
                return scans
            following = data[run_end]
            if following == 0x00 or 0xD0 <= following <= 0xD7:
                position = run_end + 1
            else:
                position = run_end - 1  # the 0xFF that starts the next marker
                break
    return scans


def read_header(
    data: bytes, uri: str, max_pixels: int, max_scans: int = DEFAULT_MAX_SCANS, timeout_s: float | None = None,
    deadline: float | None = None,
) -> ImageHeader:
    """Format, mode, size and orientation from the header; ImageDecodeError for empty or
    unrecognised data, or more than ``max_pixels`` pixels (a decompression bomb is refused here).
    ``timeout_s`` bounds the parse too (Pillow reads a JPEG's markers byte by byte: megabytes
    of fill bytes before them would otherwise cost a minute)."""
    image, header = open_with_header(data, uri, max_pixels, max_scans, timeout_s, deadline)
    image.close()
    return header


def open_with_header(
    data: bytes, uri: str, max_pixels: int, max_scans: int = DEFAULT_MAX_SCANS, timeout_s: float | None = None,
    deadline: float | None = None,
) -> tuple[Image.Image, ImageHeader]:
    """``open_image`` and what its header says (``header_of``), under one deadline: the image
    stays open for its decode (the caller closes it); ImageDecodeError as ``read_header``."""
    try:
        image = open_image(data, uri, max_pixels, max_scans, timeout_s, deadline)
    except DecodeOverdue:
        raise overdue(uri, "header not read", timeout_s) from None  # the deadline's signal, no error
    try:
        return image, header_of(image, uri)
    except DecodeOverdue:
        image.close()
        raise overdue(uri, "header not read", timeout_s) from None
    except BaseException:
        image.close()
        raise


def overdue(uri: str, what: str, timeout_s: float | None) -> ImageDecodeError:
    """The record of an image whose parse or decode passed its deadline (``DecodeOverdue``)."""
    return ImageDecodeError(uri, f"{what} within images.decode_timeout_s ({timeout_s:g} s)")


def header_of(image: Image.Image, uri: str) -> ImageHeader:
    """What the header of an image opened by ``open_image`` says (its EXIF read, no pixels)."""
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1) if image.format in ("JPEG", "MPO") else 1
    except (OSError, SyntaxError, ValueError, TypeError) as exc:
        raise ImageDecodeError(uri, f"corrupt or truncated image: {exc}") from exc
    width, height = image.size
    return ImageHeader(image.format, image.mode, width, height, orientation if orientation in range(1, 9) else 1)


def decode(
    data: bytes,
    uri: str,
    max_pixels: int,
    draft_size: int | None = None,
    max_scans: int = DEFAULT_MAX_SCANS,
    timeout_s: float | None = None,
    deadline: float | None = None,
) -> Image.Image:
    """Decode bytes into an upright RGB Pillow image, or raise ImageDecodeError.

    ``draft_size`` lets JPEG decode at 1/2, 1/4 or 1/8 scale while the short side stays at
    least that large: the resize that follows is then cheaper and nearly identical.
    ``timeout_s`` bounds the decode (see ``DECODE_BLOCK_BYTES``).
    """
    try:
        image = open_image(data, uri, max_pixels, max_scans, timeout_s, deadline)
    except DecodeOverdue:
        raise overdue(uri, "not decoded", timeout_s) from None  # the deadline's signal, no error
    return decode_opened(image, uri, draft_size, timeout_s)


def decode_opened(image: Image.Image, uri: str, draft_size: int | None, timeout_s: float | None) -> Image.Image:
    """The pixels of an image ``open_image`` opened (under its deadline), upright RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if draft_size and image.format in ("JPEG", "MPO"):
                width, height = image.size
                scale = min(width, height) / draft_size
                if scale >= 2:
                    image.draft("RGB", (max(1, round(width / scale)), max(1, round(height / scale))))
            image.load()
            image = ImageOps.exif_transpose(image) or image
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(uri, f"corrupt or truncated image: {exc}") from exc
    except DecodeOverdue:
        raise overdue(uri, "not decoded", timeout_s) from None  # the deadline's signal, no error


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, CMYK, palette, 16-bit and alpha images -> RGB (alpha over white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return image.point(lambda value: value / 256).convert("L").convert("RGB")
    return image.convert("RGB")


def as_bytes_tensor(data: bytes) -> Tensor:
    """The encoded bytes as the 1-d uint8 CPU tensor decode_jpeg takes (a writable copy)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_crop(
    data: bytes,
    uri: str,
    spec: Preprocessing,
    max_pixels: int,
    draft: bool = True,
    max_scans: int = DEFAULT_MAX_SCANS,
    timeout_s: float | None = None,
) -> Tensor:
    """The CPU path: bytes -> upright uint8 crop [3, crop, crop], or ImageDecodeError.

    Plain JPEGs decode through torchvision.io (libjpeg-turbo, about twice Pillow's rate with the
    tensor resize), except large ones that Pillow's draft mode decodes at reduced scale; the
    rest, and any JPEG decode_jpeg refuses, through Pillow, whose errors name what is wrong,
    under the deadline ``timeout_s``: one deadline for the header, the marker walk and the
    decode together, not one each.
    """
    opened, header = open_with_header(data, uri, max_pixels, max_scans, timeout_s)  # once: header, walk and decode share it
    with opened:
        if header.plain_jpeg and not (draft and header.draft_scale(spec.resize_size) >= DRAFT_MIN_SCALE):
            try:
                image = decode_jpeg(as_bytes_tensor(data), mode=ImageReadMode.RGB)
            except RuntimeError:
                pass  # corrupt, truncated or unusual: Pillow decides, and says why if it fails too
            else:
                return resize_crop(orient(image, header.orientation), spec)
        upright = decode_opened(opened, uri, spec.resize_size if draft else None, timeout_s)
        return resize_crop(F.pil_to_tensor(upright), spec)


def orient(image: Tensor, orientation: int) -> Tensor:
    """Apply an EXIF orientation (1-8) to an image [..., H, W], as ``ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return image.flip(-1)  # mirrored left-right
    if orientation == 3:
        return image.flip(-2, -1)  # upside down
    if orientation == 4:
        return image.flip(-2)  # mirrored top-bottom
    if orientation == 5:
        return image.transpose(-2, -1)  # mirrored along the main diagonal
    if orientation == 6:
        return image.rot90(-1, (-2, -1))  # stored turned left: turn it right
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)  # mirrored along the other diagonal
    if orientation == 8:
        return image.rot90(1, (-2, -1))  # stored turned right: turn it left
    return image


def resize_crop(image: Tensor, spec: Preprocessing) -> Tensor:
    """uint8 [3, H, W] (CPU or CUDA) -> uint8 [3, crop, crop]: antialiased resize of the short
    side, then center crop, as the weights' transforms do on a Pillow image (within rounding)."""
    image = F2.resize(image, [spec.resize_size], interpolation=spec.interpolation, antialias=True)
    return F2.center_crop(image, [spec.crop_size, spec.crop_size])


def crop(image: Image.Image, spec: Preprocessing) -> Tensor:
    """RGB Pillow image -> uint8 crop [3, crop, crop] through Pillow's own resize: the reference."""
    image = F.resize(image, [spec.resize_size], interpolation=spec.interpolation, antialias=True)
    return F.pil_to_tensor(F.center_crop(image, [spec.crop_size]))


def normalization(spec: Preprocessing, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """The mean and std as [3, 1, 1] tensors on ``device``; made once per model, not per batch."""
    return (torch.tensor(spec.mean, device=device).view(3, 1, 1), torch.tensor(spec.std, device=device).view(3, 1, 1))


def normalize(batch: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 [..., 3, h, w] -> float32 scaled to [0, 1] and normalised, as ToTensor + Normalize do."""
    return batch.float().div_(255).sub_(mean).div_(std)


def preprocess(image: Image.Image, spec: Preprocessing) -> Tensor:
    """RGB image -> float tensor [3, crop, crop], exactly as the weights' transforms do."""
    return normalize(crop(image, spec), *normalization(spec))
