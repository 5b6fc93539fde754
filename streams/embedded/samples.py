"""Generate a Stanford-Dogs-layout image set: realistic sizes and JPEG cost, no real photos needed.

Images are 200-800 px a side (about 440x390 on average), JPEG quality 90, with smooth
structure plus fine noise so that decoding costs what it costs on photographs. Used by the
demo, the tests and the benchmarks; point those at a real folder or bucket instead where
you have one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# A few real Stanford Dogs classes (ImageNet wnids) and their folder labels.
DOG_CLASSES: tuple[tuple[str, str], ...] = (
    ("n02085620", "Chihuahua"),
    ("n02085782", "Japanese_spaniel"),
    ("n02085936", "Maltese_dog"),
    ("n02086240", "Shih-Tzu"),
    ("n02088364", "beagle"),
    ("n02099601", "golden_retriever"),
    ("n02106662", "German_shepherd"),
    ("n02110958", "pug"),
)


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields plus grain: compresses and decodes like a photo, unlike flat colour."""
    coarse = rng.random((max(2, height // 32), max(2, width // 32), 3)) * 255
    smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC), dtype=np.float32)
    grain = rng.normal(0, 18, (height, width, 3))
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    width = int(np.clip(rng.normal(440, 110), 200, 800))
    height = int(np.clip(rng.normal(390, 100), 200, 800))
    return width, height


def generate_dataset(
    root: str | Path,
    count: int,
    seed: int = 0,
    classes: tuple[tuple[str, str], ...] = DOG_CLASSES,
    bad_files: int = 0,
) -> list[Path]:
    """``count`` JPEGs under ``root/Images/<wnid>-<label>/<wnid>_<n>.jpg``, plus ``bad_files``
    unreadable ones (a truncated JPEG, a text file named .jpg, ...). Returns every path written."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    written: list[Path] = []
    for index in range(count):
        wnid, label = classes[index % len(classes)]
        folder = root / "Images" / f"{wnid}-{label}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{wnid}_{10000 + index}.jpg"
        synthetic_photo(rng, *image_size(rng)).save(path, "JPEG", quality=90)
        written.append(path)
    for index in range(bad_files):
        wnid, label = classes[index % len(classes)]
        folder = root / "Images" / f"{wnid}-{label}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{wnid}_bad{index}.jpg"
        if index % 2 == 0 and written:
            path.write_bytes(written[index % len(written)].read_bytes()[:700])  # truncated JPEG
        else:
            path.write_text("this is not an image\n")
        written.append(path)
    return written
