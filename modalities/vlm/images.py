"""Pictures for VLM records: a file path, a URL, encoded bytes (a `datasets` Image feature) or a PIL image,
checked when the data is loaded and read as RGB when encoded."""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from mmopd.data import RecordError

MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb threshold (MAX_IMAGE_PIXELS); above it we refuse
Picture = str | Path | bytes | Image.Image  # a path or URL, a picture file's bytes, or a decoded picture
OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def picture_of(item: Any, base_dir: Path) -> Picture:
    """One entry of a record's `images` as a Picture: a relative path is resolved against `base_dir`, and an
    Image feature's {"bytes", "path"} becomes its bytes (or its path when it holds none)."""
    if isinstance(item, dict) and ("bytes" in item or "path" in item):
        item = item.get("bytes") or item.get("path")
    if isinstance(item, str) and item.startswith(("http://", "https://")):
        return item
    if isinstance(item, (str, Path)) and str(item):
        return str((base_dir / item).resolve())
    if isinstance(item, (bytes, Image.Image)):
        return item
    raise RecordError(f"an image must be a path, a URL, picture bytes or a datasets Image, got {item!r:.60}")


def describe(picture: Picture) -> str:
    return f"({len(picture):,} bytes)" if isinstance(picture, bytes) else \
        f"({picture.width}x{picture.height} PIL image)" if isinstance(picture, Image.Image) else str(picture)


def _fetch(url: str) -> bytes:
    offline = [name for name in OFFLINE if os.environ.get(name, "").lower() in ("1", "true", "yes", "on")]
    if offline:
        raise RecordError(f"cannot fetch image {url}: {offline[0]} is set (offline); download the pictures and give "
                          "their paths or bytes, or unset it")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise RecordError(f"cannot fetch image {url}: {err}; check the network, or download the pictures and give "
                          "their paths or bytes") from err


def _open(picture: Picture) -> Image.Image:
    if isinstance(picture, Image.Image):
        return picture
    if isinstance(picture, bytes):
        return Image.open(io.BytesIO(picture))
    if str(picture).startswith(("http://", "https://")):
        return Image.open(io.BytesIO(_fetch(str(picture))))
    return Image.open(picture)


def check_image(picture: Picture) -> None:
    """Raise RecordError naming the picture if it is missing, empty or not a readable image."""
    if isinstance(picture, (str, Path)) and not str(picture).startswith(("http://", "https://")):
        path = Path(picture)
        if not path.is_file():
            raise RecordError(f"image not found: {path}")
        if path.stat().st_size == 0:
            raise RecordError(f"image file is empty (0 bytes): {path}")
    if isinstance(picture, bytes) and not picture:
        raise RecordError("image is empty (0 bytes)")
    if isinstance(picture, Image.Image):
        width, height = picture.size
    else:
        data = _fetch(picture) if isinstance(picture, str) and picture.startswith(("http://", "https://")) else picture
        try:
            with _open(data) as image:
                image.verify()  # checks the file's structure without decoding every pixel
                width, height = image.size
        except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
            raise RecordError(f"cannot read image {describe(picture)}: {err}") from err
    if width == 0 or height == 0:
        raise RecordError(f"image has zero size ({width}x{height}): {describe(picture)}")
    if width * height > MAX_PIXELS:
        raise RecordError(f"image is too large ({width}x{height} = {width * height:,} pixels, limit "
                          f"{MAX_PIXELS:,}): {describe(picture)}; downscale it, processors resize to far less anyway")


def load_rgb(picture: Picture) -> Image.Image:
    """The picture as 3-channel RGB (grayscale, palette, RGBA and CMYK are converted)."""
    if isinstance(picture, Image.Image):
        return _rgb(picture)
    with _open(picture) as image:
        return _rgb(image)


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")  # transparent pixels become white
    return image.convert("RGB")
