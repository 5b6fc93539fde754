"""bytes -> RGB image -> normalised tensor, through the weights' own transforms. Pure."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from inference.errors import ImageDecodeError

# Pillow refuses nothing itself: we apply our own configurable limit below.
Image.MAX_IMAGE_PIXELS = None


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


def decode(data: bytes, uri: str, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode bytes into an upright RGB image, or raise ImageDecodeError.

    ``draft_size`` lets JPEG decode at 1/2, 1/4 or 1/8 scale while the short side stays at
    least that large: the resize that follows is then cheaper and nearly identical.
    """
    if not data:
        raise ImageDecodeError(uri, "empty object")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    uri, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
                )
            if draft_size and image.format == "JPEG":
                scale = min(width, height) / draft_size
                if scale >= 2:
                    image.draft("RGB", (max(1, round(width / scale)), max(1, round(height / scale))))
            image.load()
            image = ImageOps.exif_transpose(image) or image
            return to_rgb(image)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(uri, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(uri, f"corrupt or truncated image: {exc}") from None


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


def preprocess(image: Image.Image, spec: Preprocessing) -> Tensor:
    """RGB image -> float tensor [3, crop, crop], exactly as the weights' transforms do."""
    image = F.resize(image, [spec.resize_size], interpolation=spec.interpolation, antialias=True)
    image = F.center_crop(image, [spec.crop_size])
    tensor = F.convert_image_dtype(F.pil_to_tensor(image), torch.float)
    return F.normalize(tensor, mean=list(spec.mean), std=list(spec.std))
