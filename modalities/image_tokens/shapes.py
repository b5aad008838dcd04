"""The toy picture task: Pillow-drawn coloured shapes on a plain background, one class per
(colour, shape) pair, with random size and position so that every class has many pictures."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {"red": (220, 40, 40), "blue": (40, 80, 230)}
SHAPES = ("circle", "square", "triangle")
CLASS_NAMES = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
IMAGE_SIZE = 16
BACKGROUND = (235, 235, 225)


def draw(label: int, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """One picture of class `label`: its shape in its colour, 50–80% of the side, placed at random."""
    colour, shape = CLASS_NAMES[label].split()[1:]
    image = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    extent = rng.uniform(0.5, 0.8) * size
    x0, y0 = rng.uniform(0, size - extent), rng.uniform(0, size - extent)
    box = [x0, y0, x0 + extent, y0 + extent]
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        inset = extent * 0.08  # a square as wide as the circle looks bigger: match their areas roughly
        pen.rectangle([box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset], fill=fill)
    else:
        pen.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    return image


def make_images(n: int, seed: int, size: int = IMAGE_SIZE) -> tuple[list[Image.Image], list[int]]:
    """n pictures with labels cycling through the classes (balanced)."""
    rng = random.Random(seed)
    labels = [i % len(CLASS_NAMES) for i in range(n)]
    return [draw(label, rng, size) for label in labels], labels


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> [N, 3, H, W] float32 in [-1, 1]."""
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])  # [N, H, W, 3]
    return rearrange(torch.from_numpy(array), "n h w c -> n c h w") / 127.5 - 1.0


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [-1, 1] -> PIL RGB images."""
    levels = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()  # [N, 3, H, W]
    array = rearrange(levels, "n c h w -> n h w c").cpu().numpy()
    return [Image.fromarray(a) for a in array]


def write_split(root: Path, name: str, n: int, seed: int) -> Path:
    """Draw n pictures into root/img/NAME-xxxxx.png and write root/NAME.jsonl with their labels; each
    record also names its picture (`image`, relative to the file), the target of sft and supervised_kd."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    images, labels = make_images(n, seed)
    lines = []
    for i, (image, label) in enumerate(zip(images, labels)):
        rel = f"img/{name}-{i:05d}.png"
        image.save(root / rel)
        lines.append(json.dumps({"label": label, "prompt": CLASS_NAMES[label], "image": rel}))
    path = root / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
