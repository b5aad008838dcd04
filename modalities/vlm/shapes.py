"""Synthetic shapes-VQA: small Pillow pictures of 1–3 coloured shapes on a 2×2 grid, with one-word
questions about colour, shape, count, relative position, and a two-step question ("what colour is the
shape left of the square?"). Every question has exactly one correct answer; scoring is exact match.

The grid matches the families' 4-token image encodings (2×2 tokens): at that resolution each image
token sees one cell. Each cell has its own light tint (a board), so where a shape is can be read from
the pixels around it; with that, tiny models learn the task on a CPU in minutes."""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230),
                                             "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
KINDS = ("colour", "shape", "count", "position", "two_step")
GRID = 2  # cells per side
JITTER = 1  # pixels a shape may sit off its cell's centre
IMAGE_SIZE = 64
CELL_TINTS = {(0, 0): (250, 250, 250), (0, 1): (250, 250, 205), (1, 0): (215, 215, 215), (1, 1): (215, 215, 170)}
DIRECTIONS = {"left": (1, -1), "right": (1, 1), "above": (0, -1), "below": (0, 1)}  # (axis: 0 row / 1 col, sign)
WORDS = sorted({*COLOURS, *SHAPES, *DIRECTIONS, "what", "colour", "is", "the", "shape", "one", "how", "many",
                "shapes", "are", "there", "or", "of", "?", "1", "2", "3"})
MAX_ANSWER_WORDS = 4


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    row: int
    col: int
    dx: int  # jitter inside the cell, in pixels at IMAGE_SIZE
    dy: int

    def at(self, axis: int) -> int:
        return self.col if axis == 1 else self.row


def random_scene(rng: random.Random, min_items: int = 1) -> list[Item]:
    """1–3 shapes, each of a different kind and colour, in different cells."""
    n = rng.randint(min_items, len(SHAPES))
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    return [Item(s, colour, r, c, rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER))
            for s, colour, (r, c) in zip(rng.sample(SHAPES, n), rng.sample(sorted(COLOURS), n), cells)]


def is_eval_scene(scene: list[Item]) -> bool:
    """A fixed eighth of all layouts is held out: eval pictures are never seen in training."""
    key = ",".join(f"{i.shape}{i.colour}{i.row}{i.col}" for i in sorted(scene, key=lambda i: (i.row, i.col)))
    return zlib.crc32(key.encode()) % 8 == 0


def draw(scene: list[Item], size: int = IMAGE_SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size))
    pen = ImageDraw.Draw(image)
    cell, scale = size / GRID, size / IMAGE_SIZE
    for (row, col), tint in CELL_TINTS.items():
        pen.rectangle([col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1], fill=tint)
    r = cell * 0.3
    for item in scene:
        cx, cy = (item.col + 0.5) * cell + item.dx * scale, (item.row + 0.5) * cell + item.dy * scale
        fill = COLOURS[item.colour]
        if item.shape == "circle":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif item.shape == "square":
            pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            pen.polygon([(cx, cy - r * 1.15), (cx - r * 1.15, cy + r), (cx + r * 1.15, cy + r)], fill=fill)
    return image


def _place(item: Item, axis: int) -> str:
    """The item's column (left/right) or row (above/below) word."""
    if axis == 1:
        return "left" if item.col == 0 else "right"
    return "above" if item.row == 0 else "below"


def ask(scene: list[Item], kind: str, rng: random.Random) -> tuple[str, str] | None:
    """A (question, answer) of `kind` about `scene`, or None when the scene cannot support one.

    Answers are short chains that name what they look at before the final word, e.g. "what colour is
    the shape left of the square?" -> "square right circle red": the square is on the right, the
    shape on the left is the circle, the circle is red."""
    if kind == "colour":
        item = rng.choice(scene)
        return f"what colour is the {item.shape}?", f"{item.shape} {item.colour}"
    if kind == "shape":
        item = rng.choice(scene)
        return f"what shape is the {item.colour} one?", f"{item.colour} {item.shape}"
    if kind == "count":
        return "how many shapes are there?", str(len(scene))
    if kind == "position":
        pairs = [(a, b, axis) for a in scene for b in scene if a is not b for axis in (0, 1) if a.at(axis) != b.at(axis)]
        if not pairs:
            return None
        a, b, axis = rng.choice(pairs)
        options = "left or right of" if axis == 1 else "above or below"
        return f"is the {a.shape} {options} the {b.shape}?", f"{a.shape} {_place(a, axis)}"
    if kind == "two_step":
        options = []
        for anchor in scene:
            for word, (axis, sign) in DIRECTIONS.items():
                found = [i for i in scene if (i.at(axis) - anchor.at(axis)) * sign > 0]
                if len(found) == 1:
                    where = f"{word} of" if axis == 1 else word
                    options.append((f"what colour is the shape {where} the {anchor.shape}?",
                                    f"{anchor.shape} {_place(anchor, axis)} {found[0].shape} {found[0].colour}"))
        return rng.choice(options) if options else None
    raise ValueError(f"unknown question kind {kind!r}; kinds: {', '.join(KINDS)}")


def make_records(n: int, seed: int, held_out: bool) -> list[tuple[list[Item], dict]]:
    """n (scene, record) pairs, question kinds in equal shares, from held-out or training layouts."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        min_items = 2 if kind in ("position", "two_step") else 1
        while True:
            scene = random_scene(rng, min_items)
            qa = ask(scene, kind, rng) if is_eval_scene(scene) == held_out else None
            if qa is not None:
                break
        out.append((scene, {"prompt": qa[0], "answer": qa[1], "kind": kind}))
    return out


def write_split(root: Path, name: str, n: int, seed: int, held_out: bool) -> Path:
    """Draw n examples into root/img/NAME-xxxxx.png and write root/NAME.jsonl (image paths relative to it)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (scene, record) in enumerate(make_records(n, seed, held_out)):
        rel = f"img/{name}-{i:05d}.png"
        draw(scene).save(root / rel)
        lines.append(json.dumps({"images": [rel], **record}))
    path = root / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
