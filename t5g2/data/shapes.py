"""A synthetic image-text dataset for CPU runs and tests: coloured shapes and their captions.

Each example is a PNG of one shape (circle, square or triangle) in one of four colours, at a
random place, size and background shade, with the caption "a <colour> <shape>" as the target and
"<start_of_image> what is this?" as the prompt. Written as files in the layout
`t5g2.data.image_text` reads (a JSONL file beside an `images/` folder), so a run exercises the
real reading, decoding and preprocessing path; a model can only get the caption right from the
pixels (12 equally likely captions: chance is 1 in 12).
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
           "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
PROMPT = "<start_of_image> what is this?"


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def draw(colour: str, shape: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One picture: the shape filled with `colour` on a light grey background."""
    shade = int(rng.integers(200, 256))
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    extent = int(rng.integers(size // 3, size * 3 // 4))
    x0, y0 = (int(v) for v in rng.integers(0, size - extent, 2))
    box = (x0, y0, x0 + extent, y0 + extent)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(x0 + extent // 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)],
                    fill=COLOURS[colour])
    return image


def write_shapes(out_dir: str, count: int, *, seed: int = 0, size: int = 64,
                 name: str = "train") -> str:
    """Writes `count` examples to `out_dir`/`name`.jsonl and `out_dir`/images/; returns the JSONL
    path. Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, f"{name}.jsonl")
    with open(path, "w") as lines:
        for i in range(count):
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            image = f"images/{name}_{i:05d}.png"
            draw(colour, shape, rng, size).save(os.path.join(out_dir, image))
            lines.write(json.dumps({"text": PROMPT, "images": [image],
                                    "target": caption(colour, shape)}) + "\n")
    return path
