"""Reading the demo's inputs: file names, folders and globs expanded, images read upright in BGR."""

import glob
import os

import numpy as np
from detectron2.data.detection_utils import read_image
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "UnreadableImageError", "expand_inputs", "read_image_bgr"]

# What a folder given as input is searched for; files named explicitly or by a glob are tried whatever
# their extension, so an odd name is reported rather than silently ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")


class UnreadableImageError(ValueError):
    """An input that is missing or not a decodable image; the message starts with its name."""


def expand_inputs(patterns):
    """Turn files, folders (their images, sorted) and globs into (paths, problems).

    `problems` are one-line messages for patterns that named nothing: they are reported as failed
    inputs, never silently dropped.
    """
    paths, problems = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(pattern, name)
                for name in os.listdir(pattern)
                if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(pattern, name))
            )
            if not found:
                problems.append(f"{pattern}: folder contains no image files ({', '.join(IMAGE_EXTENSIONS)})")
        elif os.path.exists(pattern):
            found = [pattern]
        else:
            found = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
            if not found:
                problems.append(f"{pattern}: no such file, folder or matching glob")
        paths.extend(p for p in found if p not in paths)
    return paths, problems


def read_image_bgr(path) -> np.ndarray:
    """An HxWx3 uint8 BGR image (DefaultPredictor's input convention) from any PIL-readable file.

    Grayscale, palette and RGBA images become 3-channel (alpha dropped) and the EXIF orientation is
    applied, both by detectron2's `read_image`. Raises UnreadableImageError naming the file.
    """
    try:
        image = read_image(path, format="BGR")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL's UnidentifiedImageError and truncated files are OSErrors; a missing file as well.
        if isinstance(e, UnidentifiedImageError):
            reason = "not an image format PIL can decode"
        else:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise UnreadableImageError(
            f"{path}: cannot read as an image ({type(e).__name__}: {reason})"
        ) from None
    return np.ascontiguousarray(image)
