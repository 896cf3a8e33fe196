"""T5Gemma 2 1B-1B: two Gemma 3 1B stacks (26 layers, d 1152, 4 q / 1 kv heads) and the released
SigLIP tower (so400m/14 at 896 pixels, frozen), 16K training.

Gemma 3 1B is text-only: the tower (and, if it has one of width 1152, the projector) comes from
the checkpoint named by `init.vision_from`, e.g. a T5Gemma 2 or Gemma 3 4B (whose 2560-wide
projector does not fit: the projector then starts from zeros and needs
`model.vision.trainable="projector"`). The text-only model: `--config=configs/t5g2_1b.py:text`.
"""

from configs import base


def get_config(variant=None):
    """`variant` "text": the text-only model (`--config=configs/t5g2_1b.py:text`)."""
    enc = base.stack(num_layers=26, d_model=1152, ffn_dim=6912, num_heads=4, num_kv_heads=1,
                     sliding_window=512, global_rope_scale=8.0)
    model = base.released_model(enc, variant)
    return base.adaptation_16k(model, name="t5g2_1b")
