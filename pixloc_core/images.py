"""Reading user images: one decoder and one error type for maps, features and queries.

EXIF orientation is ignored, as COLMAP does, so that pixels match the cameras of the models.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")


class ImageReadError(ValueError):
    """An image that cannot be read; the message names the file and the reason."""


def list_images(image_dir: Path) -> list[str]:
    """Image names relative to image_dir (subfolders included), sorted; other files are ignored."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image directory does not exist")
    return sorted(p.relative_to(image_dir).as_posix() for p in image_dir.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_image(path: Path, mode: str = "RGB") -> np.ndarray:
    """(H, W, 3) uint8 for mode "RGB", (H, W) for "L"; writable, as torch.from_numpy wants."""
    with opened(path) as image:
        return np.array(image.convert(mode))


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header, without decoding the pixels."""
    with opened(path) as image:
        return image.size


@contextmanager
def opened(path: Path) -> Iterator[Image.Image]:
    """The image, any failure to read it an ImageReadError naming the file and the reason."""
    try:
        with Image.open(path) as image:
            yield image
    except FileNotFoundError:
        raise ImageReadError(f"{path}: image not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"{path}: cannot decode image ({error})") from None
