"""T5Gemma 2 4B-4B: two Gemma 3 4B stacks (34 layers, d 2560, 8 q / 4 kv heads) and the released
SigLIP tower (so400m/14 at 896 pixels, frozen), 16K training. Gemma 3 4B is multimodal: its
tower and projector start the model's (`init.from_gemma3`)."""

from configs import base


def get_config(variant=None):
    """`variant` "text": the text-only model (`--config=configs/t5g2_4b.py:text`)."""
    enc = base.stack(num_layers=34, d_model=2560, ffn_dim=10240, num_heads=8, num_kv_heads=4,
                     sliding_window=1024, global_rope_scale=8.0)
    model = base.released_model(enc, variant)
    return base.adaptation_16k(model, name="t5g2_4b")
