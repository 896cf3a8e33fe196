"""The tiny T5Gemma 2 with the tiny SigLIP tower, trained on UL2 text mixed with the synthetic
shapes captions (t5g2/data/shapes.py): the CPU run of the whole image path.

    python -m launch.make_shapes --out data/shapes
    python -m launch.train --config configs/tiny_vision.py --workdir workdir/tiny_vision

Half the rows are image-text. The tower is random here (no SigLIP checkpoint is downloaded), so
it trains with the rest (`model.vision.trainable="all"`); a run that starts from a real tower
keeps the default "none" (`--config.init.vision_from=<checkpoint>`).
"""

from configs import base, tiny


def get_config():
    cfg = tiny.get_config()
    cfg.name = "tiny_vision"
    cfg.model.vision = base.vision(**base.TINY_VISION, trainable="all")
    cfg.data.image_text.update(paths=("data/shapes/train.jsonl",), rate=0.5)
    cfg.eval.update(every=0, samples=0)  # held-out evaluation reads the UL2 text only
    return cfg
