"""Loading user images for editing: every way a file can be wrong gets a clear error or a
documented conversion, never a traceback from deep inside torch."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 64_000_000  # refuse anything larger before decoding it


class ImageInputError(ValueError):
    """The image cannot be used; the message says why."""


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray((arr / top * 255).clip(0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def model_size(width: int, height: int, side: int, multiple: int) -> tuple[int, int]:
    """(height, width) for a model of native side `side`: the image's aspect ratio at about the
    model's pixel count, each side a multiple of `multiple` (the UNet's total downsampling). A
    side held at `multiple` does not stretch the other past twice that pixel count: a panorama
    more extreme than that is cropped (by `fit`), not worked on at many times the pixels."""
    scale = side / math.sqrt(width * height)
    h, w = (max(multiple, round(v * scale / multiple) * multiple) for v in (height, width))
    longest = max(multiple, 2 * side * side // min(h, w) // multiple * multiple)
    return min(h, longest), min(w, longest)


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (height, width)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a size is WIDTHxHEIGHT in pixels, e.g. 96x64, got {text!r}") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"a size needs positive sides, got {text!r}")
    return height, width


def fit(image: np.ndarray, size: int | tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    """uint8 HxWx3 image at `size` (a side, or (height, width)): centre-cropped to that aspect
    ratio, then resized; a note says so when anything changed."""
    height, width = (size, size) if isinstance(size, int) else size
    if image.shape[:2] == (height, width):
        return image, []
    im = ImageOps.fit(Image.fromarray(image), (width, height), Image.LANCZOS)
    crop = "" if image.shape[0] * width == image.shape[1] * height else ", centre-cropped to that aspect ratio first"
    note = f"resized from {image.shape[1]}x{image.shape[0]} to {width}x{height} (width x height{crop})"
    return np.asarray(im, dtype=np.uint8).copy(), [note]


def load_image(source: str | Path | Image.Image | np.ndarray,
               size: int | tuple[int, int] | None) -> tuple[np.ndarray, list[str]]:
    """(uint8 HxWx3 image, notes about conversions applied); `size` is a side (square), a
    (height, width), or None to keep the image's own size."""
    notes: list[str] = []
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise ImageInputError(f"array images must be uint8 HxW or HxWxC, got {source.dtype} {source.shape}")
        try:
            source = Image.fromarray(source)
        except (TypeError, ValueError) as err:
            raise ImageInputError(f"cannot read a {source.shape} uint8 array as an image: {err}") from None
    if isinstance(source, Image.Image):
        im = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageInputError(f"no image file at {path}")
        try:
            # Pillow warns (not raises) between MAX_IMAGE_PIXELS and twice that, already in
            # `open`: the warning filter must cover the open as well as the decode.
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as opened:
                    if opened.width * opened.height > MAX_PIXELS:
                        raise ImageInputError(
                            f"{path} is {opened.width}x{opened.height} pixels, over the limit of {MAX_PIXELS:,}: "
                            "refused (possible decompression bomb)")
                    opened.load()
                    im = opened.copy()  # keeps mode, palette and info (transparency)
        except ImageInputError:
            raise  # a ValueError: keep it out of the "corrupt" branch below
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageInputError(f"{path} refused as a possible decompression bomb: {err}") from None
        except UnidentifiedImageError:
            raise ImageInputError(f"{path} is not an image file Pillow can read") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageInputError(f"{path} is corrupt or truncated: {err}") from None
    orientation = im.getexif().get(0x0112, 1)  # EXIF Orientation: how a camera says to display it
    if orientation not in (1, None):
        im = ImageOps.exif_transpose(im)
        notes.append(f"rotated upright from EXIF orientation {orientation}")
    if im.mode != "RGB":
        notes.append(f"converted from mode {im.mode} to RGB")
        im = _to_rgb(im)
    image = np.asarray(im, dtype=np.uint8).copy()
    if size is None:
        return image, notes
    image, resized = fit(image, size)
    return image, notes + resized
