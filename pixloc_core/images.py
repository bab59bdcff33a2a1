"""Reading user images: one decoder and one error type for maps, features and queries, from a
local folder or straight from a bucket (`pixloc_core.files`).

EXIF orientation is ignored, as COLMAP does, so that pixels match the cameras of the models.
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image

from . import files
from .files import Location

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")


class ImageReadError(ValueError):
    """An image that cannot be read; the message names the file and the reason."""


def list_images(image_dir: Location) -> list[str]:
    """Image names relative to image_dir (subfolders included), sorted; other files are ignored."""
    try:
        names = files.list_files(image_dir)
    except FileNotFoundError:
        raise FileNotFoundError(f"{image_dir}: image directory does not exist") from None
    return [name for name in names if name.lower().endswith(IMAGE_EXTENSIONS)]


@contextmanager
def _open(path: Location) -> Iterator[Image.Image]:
    """The PIL image of a local file (opened lazily) or of a remote object (fetched whole)."""
    source = io.BytesIO(files.read_bytes(path)) if files.is_remote(path) else path
    with Image.open(source) as image:
        yield image


def read_image(path: Location, mode: str = "RGB") -> np.ndarray:
    """(H, W, 3) uint8 for mode "RGB", (H, W) for "L"; writable, as torch.from_numpy wants."""
    with opened(path) as image:
        return np.array(image.convert(mode))


def image_size(path: Location) -> tuple[int, int]:
    """(width, height) from the header, without decoding the pixels."""
    with opened(path) as image:
        return image.size


@contextmanager
def opened(path: Location) -> Iterator[Image.Image]:
    """The image, any failure to read it an ImageReadError naming the file and the reason."""
    try:
        with _open(path) as image:
            yield image
    except FileNotFoundError:
        raise ImageReadError(f"{path}: image not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"{path}: cannot decode image ({error})") from None
