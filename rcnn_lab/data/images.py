"""The one home for opening an image file: any Pillow mode in, float32 RGB ``[3, H, W]`` in [0, 1] out.

Every reader of image files (COCO datasets, ``rcnn-lab predict``, preflight checks) goes through
``read_image`` (pixels) or ``image_size`` (header only, no decode):

* **Pixel limit.** The size is read from the file's header and checked against ``MAX_PIXELS``
  (or the caller's ``max_pixels``) *before* any pixel is decoded, so a small file declaring a
  huge image (a "decompression bomb") is one line, not an exhausted memory. Pillow's own
  ``MAX_IMAGE_PIXELS`` guard is left as it is; its warning is silenced (ours is the rule).
* **Orientation.** The EXIF orientation tag is applied (``PIL.ImageOps.exif_transpose``), as a
  photo viewer shows the image; ``image_size`` reports the size after it.
* **Modes.** ``1``, ``L``, ``LA``, ``P``, ``PA``, ``RGB``, ``RGBA``, ``CMYK``, ``YCbCr``, ... are
  converted by Pillow to 8-bit RGB and divided by 255 (an alpha channel is dropped, as
  torchvision's and detectron2's readers do). 16-bit modes (``I;16``, ``I;16B``, ...) are divided
  by 65535 and ``I`` (32-bit integers, how 16-bit files often arrive) too, clipped to [0, 1].
  ``F`` (32-bit float) is taken as already in [0, 1] (torchvision's ``to_tensor`` convention),
  clipped, NaN read as 0. A single channel is repeated to three.
* **Errors.** A missing, unreadable, truncated, corrupt, non-image or over-limit file raises
  ``ImageError`` (a ``ConfigError``: exit 2), one line naming the file, the reason and the fix.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from rcnn_lab.errors import ConfigError, Problem, cut, display_path

__all__ = ["IMAGE_SUFFIXES", "MAX_PIXELS", "ImageError", "image_size", "read_image"]

MAX_PIXELS = 100_000_000  # width x height of the largest image opened (10,000 x 10,000; 1.2 GB as float32 RGB)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees (width and height exchange)
_EXIF_ORIENTATION = 0x0112


class ImageError(ConfigError):
    """An image file that cannot be used: one line naming the file, the reason and the fix."""

    def __init__(self, path: str | Path, reason: str, fix: str = "replace or remove the file", key: str = ""):
        self.file, self.reason, self.fix = display_path(path), reason, fix
        super().__init__([Problem(key, f"{reason}; {fix}", self.file)])

    def under(self, key: str) -> ImageError:
        """The same error reported under a config key (e.g. a dataset's ``images``)."""
        return ImageError(self.file, self.reason, self.fix, key)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return cut(text, 120)


def _open(path: str | Path, max_pixels: int):
    """The file opened lazily by Pillow (header read, no pixel decoded), its size checked against the limit."""
    from PIL import Image, UnidentifiedImageError

    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except FileNotFoundError:
        raise ImageError(path, "image file does not exist", "check the path") from None
    except IsADirectoryError:
        raise ImageError(path, "is a folder, not an image file", "name an image file") from None
    except PermissionError:
        raise ImageError(path, "image file is not readable (permission denied)", "make it readable (chmod +r)") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image file Pillow can read (unknown format)",
                         "replace it with a JPEG or PNG, or remove it") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(path, f"image is over the pixel limit ({_reason(exc)})", "downscale it or remove it") from None
    except Exception as exc:  # a corrupt header: Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageError(path, f"corrupt image header ({_reason(exc)})") from None
    width, height = image.size
    if width < 1 or height < 1:
        image.close()
        raise ImageError(path, f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        image.close()
        raise ImageError(path, f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}",
                         "downscale it or remove it")
    return image


def _orientation(image) -> int:
    """The EXIF orientation (1..8) known from the header; 1 where absent or unreadable.

    PNG: only an ``eXIf`` chunk before the pixel data counts (reading a later one would decode the image).
    """
    try:
        if image.format == "PNG" and "exif" not in image.info:
            return 1
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:  # a malformed EXIF block: ignore the tag, as a viewer does
        return 1


def image_size(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` as ``read_image`` returns the image (EXIF orientation applied), from the header only.

    Raises ``ImageError`` for a missing, non-image, corrupt-header or over-limit file; a file whose
    header is sound but whose pixel data is damaged is found by ``read_image`` only.
    """
    image = _open(path, max_pixels)
    with image:
        width, height = image.size
        return (height, width) if _orientation(image) in _SWAPS_SIDES else (width, height)


def _pixels(image) -> np.ndarray:
    """float32 ``[H, W, 3]`` in [0, 1] from a loaded Pillow image of any mode."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        gray = np.asarray(image).astype(np.float32) / 65535.0
    elif mode == "F":
        gray = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    else:
        with warnings.catch_warnings():  # "Palette images with Transparency expressed in bytes ..."
            warnings.simplefilter("ignore", UserWarning)
            rgb = image if mode == "RGB" else image.convert("RGB")
        return np.asarray(rgb, dtype=np.float32) / 255.0
    gray = np.clip(gray, 0.0, 1.0)
    return np.repeat(gray[:, :, None], 3, axis=2)


def read_image(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """The image at ``path`` as float32 ``[3, H, W]`` RGB in [0, 1], EXIF orientation applied (module docstring).

    Raises ``ImageError`` (exit 2, one line) for a missing, unreadable, corrupt, truncated,
    non-image or over-limit (``max_pixels``, checked before decoding) file.
    """
    from PIL import ImageOps

    image = _open(path, max_pixels)
    with image:
        try:
            image.load()
        except Exception as exc:  # truncated or corrupt pixel data (OSError, SyntaxError, ValueError, EOFError, ...)
            raise ImageError(path, f"cannot decode image ({_reason(exc)})") from None
        if _orientation(image) != 1:
            try:
                image = ImageOps.exif_transpose(image)
            except Exception:  # a malformed EXIF block: keep the stored orientation
                pass
        pixels = _pixels(image)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
