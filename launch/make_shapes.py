"""Write the synthetic shapes image-text dataset (t5g2/data/shapes.py) for a CPU vision run.

    python -m launch.make_shapes --out data/shapes
    python -m launch.train --config configs/tiny_vision.py --workdir workdir/tiny_vision

writes data/shapes/train.jsonl (and heldout.jsonl, other pictures) beside data/shapes/images/.
"""

from __future__ import annotations

from absl import flags

from launch import cli

_OUT = flags.DEFINE_string("out", "data/shapes", "the directory to write")
_COUNT = flags.DEFINE_integer("count", 2000, "training examples")
_HELDOUT = flags.DEFINE_integer("heldout", 100, "held-out examples (heldout.jsonl)")
_SIZE = flags.DEFINE_integer("size", 64, "picture width and height in pixels")
_SEED = flags.DEFINE_integer("seed", 0, "what decides the pictures")


def main(argv):
    del argv
    from t5g2.data.shapes import write_shapes

    for name, count, seed in (("train", _COUNT.value, _SEED.value),
                              ("heldout", _HELDOUT.value, _SEED.value + 1)):
        path = write_shapes(_OUT.value, count, seed=seed, size=_SIZE.value, name=name)
        print(f"wrote {count} examples to {path}")


if __name__ == "__main__":
    cli.run(main)
