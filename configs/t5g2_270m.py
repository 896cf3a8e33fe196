"""T5Gemma 2 270M-270M: two Gemma 3 270M stacks (18 layers, d 640, 4 q / 1 kv heads) and the
released SigLIP tower (so400m/14 at 896 pixels, frozen), 16K training.

Gemma 3 270M is text-only: the tower (and, if it has one of width 640, the projector) comes from
the checkpoint named by `init.vision_from`, e.g. a T5Gemma 2 or Gemma 3 4B (whose 2560-wide
projector does not fit: the projector then starts from zeros and needs
`model.vision.trainable="projector"`). The text-only model: `--config=configs/t5g2_270m.py:text`.
"""

from configs import base


def get_config(variant=None):
    """`variant` "text": the text-only model (`--config=configs/t5g2_270m.py:text`)."""
    enc = base.stack(num_layers=18, d_model=640, ffn_dim=2048, num_heads=4, num_kv_heads=1,
                     sliding_window=512, global_rope_scale=8.0)
    model = base.released_model(enc, variant)
    return base.adaptation_16k(model, name="t5g2_270m")
