"""A seeded synthetic CLEVR-like dataset: flat shapes of a few well-separated colours on a plain background, and
short videos in which one object moves and another appears, each with exact-answer questions.

Question types (answers are one word):
    count      "How many objects are there?"                       1..5
    position   "What shape is furthest to the left?" (right/top/bottom)   a shape
    shape      "What shape is the red object?"                     a shape
    colour     "What colour is the circle?"                        a colour
    appear     (video) "Which shape appears?"                      a shape
    direction  (video) "Which way does the moving object go?"      left / right / up / down

Every example is a pure function of (seed, split, index): numpy's SeedSequence, never Python's salted hash().
Splits draw from disjoint seed streams. Scenes are drawn at 4x and downsampled, so edges are anti-aliased the
same way at every resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (215, 35, 35), "green": (40, 160, 60), "blue": (35, 75, 215), "yellow": (240, 205, 30),
           "black": (25, 25, 25)}
BACKGROUND = (200, 200, 200)
DIRECTIONS = ("left", "right", "up", "down")
IMAGE_TYPES = ("count", "position", "shape", "colour")
VIDEO_TYPES = ("appear", "direction")
QUESTION_TYPES = IMAGE_TYPES + VIDEO_TYPES
SPLITS = {"train": 0, "val": 1, "test": 2}
MAX_OBJECTS = 5
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    x: float  # centre, as a fraction of the width
    y: float
    r: float  # radius, as a fraction of the width


@dataclass
class QA:
    qtype: str
    question: str
    answer: str


@dataclass
class Example:
    """One image or video with the questions that can be asked about it."""

    kind: str  # "image" | "video"
    frames: list[Image.Image]  # one for an image
    qas: list[QA] = field(default_factory=list)
    uid: str = ""


def rng_for(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], stream, index]))


def render(objects: list[Obj], size: int) -> Image.Image:
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        cx, cy, r = o.x * big, o.y * big, o.r * big
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            s = r * 0.85
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.8), (cx + r * 0.95, cy + r * 0.8)], fill=fill)
        elif o.shape == "star":
            pts = []
            for i in range(10):
                rad = r if i % 2 == 0 else r * 0.45
                a = -math.pi / 2 + i * math.pi / 5
                pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
            draw.polygon(pts, fill=fill)
    return img.resize((size, size), Image.LANCZOS)


def _place(rng: np.random.Generator, existing: list[Obj], shape: str, colour: str, r: float,
           box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)) -> Obj | None:
    x0, y0, x1, y1 = box
    for _ in range(200):
        x = rng.uniform(max(x0, r + 0.02), min(x1, 1 - r - 0.02))
        y = rng.uniform(max(y0, r + 0.02), min(y1, 1 - r - 0.02))
        if all(math.hypot(x - o.x, y - o.y) > (r + o.r) * 1.15 for o in existing):
            return Obj(shape, colour, x, y, r)
    return None


def _radius(rng: np.random.Generator) -> float:
    return float(rng.uniform(0.09, 0.13))


def random_scene(rng: np.random.Generator, count: int) -> list[Obj]:
    """`count` objects, non-overlapping; shapes and colours drawn with replacement."""
    while True:
        objects: list[Obj] = []
        for _ in range(count):
            o = _place(rng, objects, SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
                       _radius(rng))
            if o is None:
                break
            objects.append(o)
        if len(objects) == count:
            return objects


def _unique(objects: list[Obj], attr: str) -> list[Obj]:
    values = [getattr(o, attr) for o in objects]
    return [o for o in objects if values.count(getattr(o, attr)) == 1]


def image_questions(objects: list[Obj], rng: np.random.Generator) -> list[QA]:
    """Every question type that has a unique answer for this scene."""
    qas = [QA("count", "How many objects are there?", str(len(objects)))]
    sides = [("left", lambda o: -o.x), ("right", lambda o: o.x), ("top", lambda o: -o.y), ("bottom", lambda o: o.y)]
    for k in rng.permutation(len(sides)):
        side, key = sides[k]
        ranked = sorted(objects, key=key, reverse=True)
        # the extreme object must be clearly extreme, so the answer does not hinge on a pixel
        if len(ranked) == 1 or abs(key(ranked[0]) - key(ranked[1])) > 0.08:
            qas.append(QA("position", f"What shape is furthest to the {side}?", ranked[0].shape))
            break
    by_colour = _unique(objects, "colour")
    if by_colour:
        o = by_colour[rng.integers(len(by_colour))]
        qas.append(QA("shape", f"What shape is the {o.colour} object?", o.shape))
    by_shape = _unique(objects, "shape")
    if by_shape:
        o = by_shape[rng.integers(len(by_shape))]
        qas.append(QA("colour", f"What colour is the {o.shape}?", o.colour))
    return qas


def make_image(seed: int, split: str, index: int, size: int = 224) -> Example:
    rng = rng_for(seed, split, index)
    objects = random_scene(rng, int(rng.integers(1, MAX_OBJECTS + 1)))
    return Example("image", [render(objects, size)], image_questions(objects, rng), uid=f"{split}-img-{index}")


def make_video(seed: int, split: str, index: int, size: int = 112, frames: int = 8,
               distractors: bool = True) -> Example:
    """Static distractors, one object moving in a straight line, and one object that appears part-way (with a
    shape no other object has, so "which shape appears" has one answer). Without `distractors` (a training
    curriculum), the moving object alone, asked only which way it goes."""
    rng = rng_for(seed, split, index, stream=1)
    while True:
        direction = DIRECTIONS[rng.integers(4)]
        travel = float(rng.uniform(0.35, 0.5))
        dx, dy = {"left": (-travel, 0), "right": (travel, 0), "up": (0, -travel), "down": (0, travel)}[direction]
        r = _radius(rng)
        # start where the whole path stays inside the frame
        box = (max(0.0, -dx), max(0.0, -dy), min(1.0, 1 - dx), min(1.0, 1 - dy))
        mover = _place(rng, [], SHAPES[rng.integers(4)], list(COLOURS)[rng.integers(len(COLOURS))], r, box)
        if mover is None:
            continue
        path = [Obj(mover.shape, mover.colour, mover.x + dx * t / (frames - 1), mover.y + dy * t / (frames - 1),
                    mover.r) for t in range(frames)]
        if not distractors:
            return Example("video", [render([p], size) for p in path],
                           [QA("direction", "Which way does the moving object go?", direction)],
                           uid=f"{split}-vid-{index}-alone")
        statics: list[Obj] = []
        for _ in range(int(rng.integers(0, 2))):
            o = _place(rng, statics + path, SHAPES[rng.integers(4)], list(COLOURS)[rng.integers(len(COLOURS))],
                       _radius(rng))
            if o is not None:
                statics.append(o)
        present = {mover.shape} | {o.shape for o in statics}
        choices = [s for s in SHAPES if s not in present]
        newcomer = _place(rng, statics + path, choices[rng.integers(len(choices))],
                          list(COLOURS)[rng.integers(len(COLOURS))], _radius(rng))
        if newcomer is None:
            continue
        appear_at = int(rng.integers(max(1, frames // 4), frames - frames // 4))
        clip = [render(statics + [path[t]] + ([newcomer] if t >= appear_at else []), size) for t in range(frames)]
        qas = [QA("appear", "Which shape appears?", newcomer.shape),
               QA("direction", "Which way does the moving object go?", direction)]
        return Example("video", clip, qas, uid=f"{split}-vid-{index}")


def test_items(seed: int, per_type: int, split: str = "test", image_size: int = 224, frame_size: int = 112,
               frames: int = 8) -> list[tuple[Example, QA]]:
    """`per_type` (example, question) pairs of every type, each from its own scene: a balanced, fixed test set."""
    items: list[tuple[Example, QA]] = []
    for qtype in IMAGE_TYPES:
        found, index = 0, 0
        while found < per_type:
            ex = make_image(seed, split, index + 100_000 * IMAGE_TYPES.index(qtype), image_size)
            index += 1
            match = [qa for qa in ex.qas if qa.qtype == qtype]
            if match:
                items.append((ex, match[0]))
                found += 1
    for qtype in VIDEO_TYPES:
        for index in range(per_type):
            ex = make_video(seed, split, index + 100_000 * VIDEO_TYPES.index(qtype), frame_size, frames)
            items.append((ex, next(qa for qa in ex.qas if qa.qtype == qtype)))
    return items


def normalize_answer(text: str) -> str:
    """Exact match up to case, surrounding space and a trailing full stop."""
    return text.strip().strip(".").strip().lower()
