"""Image files for VLM records: checked once when the data is loaded, read as RGB when encoded."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mmopd.data import RecordError

MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb threshold (MAX_IMAGE_PIXELS); above it we refuse


def check_image(path: Path) -> None:
    """Raise RecordError naming `path` if it is missing, empty or not a readable image."""
    if not path.is_file():
        raise RecordError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise RecordError(f"image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as image:
            image.verify()  # checks the file's structure without decoding every pixel
            width, height = image.size
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise RecordError(f"cannot read image {path}: {err}") from err
    if width == 0 or height == 0:
        raise RecordError(f"image has zero size ({width}x{height}): {path}")
    if width * height > MAX_PIXELS:
        raise RecordError(f"image is too large ({width}x{height} = {width * height:,} pixels, limit "
                          f"{MAX_PIXELS:,}): {path}; downscale it, processors resize to far less anyway")


def load_rgb(path: str | Path) -> Image.Image:
    """The image at `path` as 3-channel RGB (grayscale, palette, RGBA and CMYK are converted)."""
    with Image.open(path) as image:
        if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")  # transparent pixels become white
        return image.convert("RGB")
