"""Synthetic shapes-VQA: small Pillow pictures of 1–3 coloured shapes in a row, with one-word questions
about colour, shape, count, relative position, and a two-step question ("what colour is the shape
left of the square?"). Every question has exactly one correct answer; scoring is exact match."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230),
                                             "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
KINDS = ("colour", "shape", "count", "position", "two_step")
SLOTS = 3  # left, middle, right
IMAGE_SIZE = 64
BACKGROUND = (245, 245, 240)
WORDS = sorted({*COLOURS, *SHAPES, "what", "colour", "is", "the", "shape", "one", "how", "many", "shapes", "are",
                "there", "left", "right", "or", "of", "?", "1", "2", "3"})


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    slot: int  # 0 = left .. SLOTS-1 = right
    dy: int  # vertical offset from the centre line, in pixels at IMAGE_SIZE


def random_scene(rng: random.Random, min_items: int = 1) -> list[Item]:
    """1–3 shapes, each of a different kind and colour, in different slots (ordered left to right)."""
    n = rng.randint(min_items, SLOTS)
    shapes, colours, slots = rng.sample(SHAPES, n), rng.sample(sorted(COLOURS), n), sorted(rng.sample(range(SLOTS), n))
    return [Item(s, c, slot, rng.randint(-IMAGE_SIZE // 6, IMAGE_SIZE // 6)) for s, c, slot in zip(shapes, colours, slots)]


def draw(scene: list[Item], size: int = IMAGE_SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    r = size * 0.13
    for item in scene:
        cx, cy = (item.slot + 0.5) * size / SLOTS, size / 2 + item.dy * size / IMAGE_SIZE
        fill = COLOURS[item.colour]
        if item.shape == "circle":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif item.shape == "square":
            pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            pen.polygon([(cx, cy - r * 1.15), (cx - r * 1.15, cy + r), (cx + r * 1.15, cy + r)], fill=fill)
    return image


def ask(scene: list[Item], kind: str, rng: random.Random) -> tuple[str, str] | None:
    """A (question, answer) of `kind` about `scene`, or None when the scene cannot support one."""
    if kind == "colour":
        item = rng.choice(scene)
        return f"what colour is the {item.shape}?", item.colour
    if kind == "shape":
        item = rng.choice(scene)
        return f"what shape is the {item.colour} one?", item.shape
    if kind == "count":
        return "how many shapes are there?", str(len(scene))
    if kind == "position":
        if len(scene) < 2:
            return None
        a, b = rng.sample(scene, 2)
        return f"is the {a.shape} left or right of the {b.shape}?", "left" if a.slot < b.slot else "right"
    if kind == "two_step":
        options = []
        for anchor in scene:
            for side, others in (("left", [i for i in scene if i.slot < anchor.slot]),
                                 ("right", [i for i in scene if i.slot > anchor.slot])):
                if len(others) == 1:
                    options.append((f"what colour is the shape {side} of the {anchor.shape}?", others[0].colour))
        return rng.choice(options) if options else None
    raise ValueError(f"unknown question kind {kind!r}; kinds: {', '.join(KINDS)}")


def make_records(n: int, seed: int) -> list[tuple[list[Item], dict]]:
    """n (scene, record) pairs, question kinds in equal shares."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        while (qa := ask(scene := random_scene(rng, 2 if kind in ("position", "two_step") else 1), kind, rng)) is None:
            pass
        out.append((scene, {"prompt": qa[0], "answer": qa[1], "kind": kind}))
    return out


def write_split(root: Path, name: str, n: int, seed: int) -> Path:
    """Draw n examples into root/img/NAME-xxxxx.png and write root/NAME.jsonl (image paths relative to it)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (scene, record) in enumerate(make_records(n, seed)):
        rel = f"img/{name}-{i:05d}.png"
        draw(scene).save(root / rel)
        lines.append(json.dumps({"images": [rel], **record}))
    path = root / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
