"""Synthetic scenes with questions and one-word answers: the built-in default model's world.

A scene holds one to four shapes, each of a different kind and a different colour, of varied sizes
at varied, non-overlapping positions, on a plain or noisy background. Shapes have a dark outline, as
flat icons do: an edge then looks the same whatever the fill colour, so a small vision tower learns
the outlines (and with them the shapes) from far fewer pictures. Every question is answerable
from the picture alone and has exactly one right one-word answer:

  what colour is the X?              -> red | green | blue | yellow | purple | orange
  what shape is the C thing?         -> circle | square | triangle | diamond
  how many shapes are there?         -> one | two | three | four
  is there a X?                      -> yes | no
  is the X on the left or the right? -> left | right   (asked only when clearly on one side)
  is the X at the top or the bottom? -> top | bottom   (likewise)

Everything follows from one integer seed (`random.Random`), so the training and held-out sets are
reproducible and disjoint by seed. Needs only Pillow.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS = ((245, 245, 245), (225, 225, 215), (200, 205, 210), (235, 230, 245))
NUMBERS = ("one", "two", "three", "four")
SIZE = 336  # pixels, the model's input size
HELD_OUT_SEED = (
    1_000_003  # the synthetic held-out set: never drawn from in training (train.py uses small seeds)
)
MARGIN = 40  # pixels from the centre line a shape must be for a left/right or top/bottom question
OUTLINE = (25, 25, 25)
OUTLINE_WIDTH = 3  # pixels
QUESTION_KINDS = ("colour", "shape", "count", "exists", "horizontal", "vertical")


def normalise(text: str) -> str:
    """An answer as exact match compares it: case, surrounding space and a final full stop ignored."""
    return text.strip().strip(".").strip().lower()


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    x: int  # centre, pixels
    y: int
    radius: int


@dataclass(frozen=True)
class Scene:
    items: tuple[Item, ...]
    background: tuple[int, int, int]
    noise: int  # amplitude of the background noise, 0 for plain
    seed: int  # for the noise

    def render(self, size: int = SIZE) -> Image.Image:
        image = Image.new("RGB", (size, size), self.background)
        if self.noise:
            rng = random.Random(self.seed)
            grain = Image.frombytes("L", (size, size), rng.randbytes(size * size)).point(
                lambda v: 128 + (v - 128) * self.noise // 128
            )
            image = Image.blend(image, Image.merge("RGB", (grain, grain, grain)), 0.25)
        draw = ImageDraw.Draw(image)
        for it in self.items:
            _draw(draw, it, COLOURS[it.colour], OUTLINE)
        return image

    def item_map(self, size: int = SIZE) -> np.ndarray:
        """[size, size] uint8: at each pixel 1 + the index of the item drawn there, 0 for background
        (drawn exactly as render() draws, so labels and picture agree)."""
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        for index, it in enumerate(self.items):
            _draw(draw, it, index + 1, index + 1)
        return np.asarray(canvas)


@dataclass(frozen=True)
class Question:
    kind: str
    text: str
    answer: str


def _draw(draw: ImageDraw.ImageDraw, it: Item, fill, outline) -> None:
    if it.shape == "circle":
        box = (it.x - it.radius, it.y - it.radius, it.x + it.radius, it.y + it.radius)
        draw.ellipse(box, fill=fill, outline=outline, width=OUTLINE_WIDTH)
    else:
        draw.polygon(_outline(it), fill=fill, outline=outline, width=OUTLINE_WIDTH)


def _outline(it: Item) -> list[tuple[float, float]]:
    r, x, y = it.radius, it.x, it.y
    if it.shape == "square":
        s = r * 0.85
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if it.shape == "diamond":
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    return [
        (x + r * math.cos(a), y + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
    ]  # triangle


def make_scene(rng: random.Random) -> Scene:
    count = rng.randint(1, 4)
    shapes, colours = rng.sample(SHAPES, count), rng.sample(list(COLOURS), count)
    items: list[Item] = []
    while len(items) < count:
        radius = rng.randint(22, 52)
        x, y = rng.randint(radius + 4, SIZE - radius - 4), rng.randint(radius + 4, SIZE - radius - 4)
        if all(math.hypot(x - o.x, y - o.y) > radius + o.radius + 8 for o in items):
            items.append(Item(shapes[len(items)], colours[len(items)], x, y, radius))
    noise = rng.choice((0, 0, 40, 90))
    return Scene(tuple(items), rng.choice(BACKGROUNDS), noise, rng.randrange(1 << 30))


def questions(scene: Scene) -> list[Question]:
    """Every question the scene answers unambiguously."""
    out = []
    present = {it.shape for it in scene.items}
    for it in scene.items:
        out.append(Question("colour", f"What colour is the {it.shape}?", it.colour))
        out.append(Question("shape", f"What shape is the {it.colour} thing?", it.shape))
        if abs(it.x - SIZE / 2) > MARGIN:
            out.append(
                Question(
                    "horizontal",
                    f"Is the {it.shape} on the left or the right?",
                    "left" if it.x < SIZE / 2 else "right",
                )
            )
        if abs(it.y - SIZE / 2) > MARGIN:
            out.append(
                Question(
                    "vertical",
                    f"Is the {it.shape} at the top or the bottom?",
                    "top" if it.y < SIZE / 2 else "bottom",
                )
            )
    out.append(Question("count", "How many shapes are there?", NUMBERS[len(scene.items) - 1]))
    for shape in SHAPES:
        out.append(Question("exists", f"Is there a {shape}?", "yes" if shape in present else "no"))
    return out


def sample(rng: random.Random) -> tuple[Scene, Question]:
    """One scene and one question about it, the question's kind drawn uniformly first."""
    scene = make_scene(rng)
    asked = questions(scene)
    kinds = sorted({q.kind for q in asked})
    kind = rng.choice(kinds)
    return scene, rng.choice([q for q in asked if q.kind == kind])


def dataset(seed: int, count: int) -> list[tuple[Scene, Question]]:
    rng = random.Random(seed)
    return [sample(rng) for _ in range(count)]


def write_jsonl(items: list[tuple[Scene, Question]], folder: Path) -> Path:
    """Images as PNG files and a JSONL of {"image", "question", "answer"}: `mllm-edge eval`'s format."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (scene, q) in enumerate(items):
        name = f"scene-{i:05d}.png"
        scene.render().save(folder / name)
        lines.append(
            json.dumps(
                {
                    "image": name,
                    "question": q.text,
                    "answer": q.answer,
                    "kind": q.kind,
                    "scene": asdict(scene),
                }
            )
        )
    path = folder / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    """python -m mllm_edge.default_model.scenes OUT.png [--seed N]: a held-out scene and its questions."""
    import argparse

    p = argparse.ArgumentParser(
        description="Write one synthetic scene (a held-out one by default) and print its questions and answers."
    )
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    args = p.parse_args(argv)
    scene = make_scene(random.Random(args.seed))
    scene.render().save(args.out)
    print(f"wrote {args.out}")
    for q in questions(scene):
        print(f"  {q.text:<45} {q.answer}")


if __name__ == "__main__":
    main()
