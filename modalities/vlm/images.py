"""Pictures for VLM records: a file path, a URL, encoded bytes (a `datasets` Image feature) or a PIL image,
checked when the data is loaded and read as RGB when encoded."""

from __future__ import annotations

import io
import os
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmopd.data.records import RecordError

MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb threshold (MAX_IMAGE_PIXELS); above it we refuse
Picture = str | Path | bytes | Image.Image  # a path or URL, a picture file's bytes, or a decoded picture
OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def picture_of(item: Any, base_dir: Path) -> Picture:
    """One entry of a record's `images` as a Picture: a relative path is resolved against `base_dir`, and an
    Image feature's {"bytes", "path"} becomes its bytes (or its path when it holds none)."""
    if isinstance(item, dict) and ("bytes" in item or "path" in item):
        item = item.get("bytes") or item.get("path")
    if isinstance(item, str) and item.startswith(("http://", "https://")):
        return item
    if isinstance(item, (str, Path)) and str(item):
        try:
            return str((base_dir / item).resolve())
        except (RuntimeError, OSError) as err:  # a symlink loop (a RuntimeError before Python 3.13)
            raise RecordError(f"image path {base_dir / item} cannot be resolved: {err}") from err
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
    """Raise RecordError naming the picture if it is missing, empty, too large or not a readable image. A file
    is decoded whole (after its header passed the pixel cap), so truncated data fails here rather than being
    read as a black picture."""
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
                image.verify()  # the file's structure and size, from its chunks, before any decoding
                width, height = image.size
        except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
            raise RecordError(f"cannot read image {describe(picture)}: {err}") from err
    if width == 0 or height == 0:
        raise RecordError(f"image has zero size ({width}x{height}): {describe(picture)}")
    if width * height > MAX_PIXELS:
        raise RecordError(f"image is too large ({width}x{height} = {width * height:,} pixels, limit "
                          f"{MAX_PIXELS:,}): {describe(picture)}; downscale it, processors resize to far less anyway")
    if not isinstance(picture, Image.Image):
        try:
            with _open(data) as image:
                image.load()
            missing = png_rows_missing(data if isinstance(data, bytes) else Path(data).read_bytes())
        except (OSError, SyntaxError, ValueError, zlib.error, struct.error) as err:
            raise RecordError(f"cannot decode image {describe(picture)} ({width}x{height}): {err}") from err
        if missing:
            raise RecordError(f"image {describe(picture)} is {width}x{height}, but its data stops {missing:,} bytes "
                              "short (a truncated PNG, which would read as black); re-export the picture")


def png_rows_missing(raw: bytes, chunk: int = 1 << 20) -> int:
    """How many bytes of row data a PNG's IDAT stream lacks for the size its header states (0 for other formats).
    Pillow decodes a PNG whose compressed stream ends early as black rows without an error."""
    if not raw.startswith(PNG_SIGNATURE):
        return 0
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", raw[16:29])
    bits = depth * PNG_CHANNELS.get(colour, 4)
    passes = ADAM7 if interlace else ((0, 0, 1, 1),)
    need = 0
    for x0, y0, dx, dy in passes:
        w, h = max(0, (width - x0 + dx - 1) // dx), max(0, (height - y0 + dy - 1) // dy)
        need += h * (1 + (w * bits + 7) // 8) if w else 0  # each row: a filter byte and its samples
    stream, got, pos = zlib.decompressobj(), 0, 8
    while pos + 8 <= len(raw) and got < need:
        length, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        if kind == b"IDAT":
            data = raw[pos + 8:pos + 8 + length]
            while data and got < need:  # decompressed a megabyte at a time, and counted, not kept
                got += len(stream.decompress(data, chunk))
                data = stream.unconsumed_tail
        pos += 12 + length
    return max(0, need - got)


def load_rgb(picture: Picture) -> Image.Image:
    """The picture as 3-channel RGB (grayscale, 16-bit grayscale, palette, RGBA and CMYK are converted)."""
    if isinstance(picture, Image.Image):
        return _rgb(picture)
    with _open(picture) as image:
        return _rgb(image)


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I"):  # 16-bit grayscale: I;16 (I;16B, ...), or I as older Pillow opens a 16-bit PNG
        # Pillow's conversion clips every value above 255, so a 16-bit picture would read as nearly all white:
        # scale 16 bits to 8 instead (I is read as 16-bit too, the range of the 16-bit files it comes from)
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8  # [H, W]
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")
    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")  # transparent pixels become white
    return image.convert("RGB")
