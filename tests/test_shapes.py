"""The synthetic shapes dataset: deterministic files in image_text's layout whose captions say
what the pixels show."""

import json
import os

import numpy as np
from PIL import Image

from t5g2.data import shapes


def test_captions_name_the_colour_and_shape_in_the_picture(tmp_path):
    path = shapes.write_shapes(str(tmp_path), 60, seed=3, size=48)
    records = [json.loads(line) for line in open(path)]
    assert len(records) == 60
    seen = set()
    for record in records:
        assert record["text"] == shapes.PROMPT
        pixels = np.asarray(Image.open(os.path.join(tmp_path, record["images"][0])), np.int32)
        assert pixels.shape == (48, 48, 3)
        coloured = pixels[pixels.max(-1) - pixels.min(-1) > 60]  # not a grey background pixel
        colour = min(shapes.COLOURS, key=lambda c: np.abs(
            coloured - np.array(shapes.COLOURS[c])).sum(-1).mean())
        # Fill ratio of the shape's bounding box: square 1, circle pi/4, triangle 1/2.
        mask = pixels.max(-1) - pixels.min(-1) > 60
        rows, cols = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1))
        shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
        assert record["target"] == shapes.caption(colour, shape), record
        seen.add(record["target"])
    assert len(seen) == len(shapes.COLOURS) * len(shapes.SHAPES)  # every caption occurs


def test_the_same_seed_writes_the_same_files(tmp_path):
    a = shapes.write_shapes(str(tmp_path / "a"), 5, seed=1)
    b = shapes.write_shapes(str(tmp_path / "b"), 5, seed=1)
    assert open(a).read() == open(b).read()
    for name in sorted(os.listdir(tmp_path / "a" / "images")):
        assert (tmp_path / "a" / "images" / name).read_bytes() == \
            (tmp_path / "b" / "images" / name).read_bytes()
