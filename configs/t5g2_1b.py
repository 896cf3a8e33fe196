"""T5Gemma 2 1B-1B: two Gemma 3 1B stacks (26 layers, d 1152, 4 q / 1 kv heads), 16K training."""

from configs import base


def get_config():
    enc = base.stack(num_layers=26, d_model=1152, ffn_dim=6912, num_heads=4, num_kv_heads=1,
                     sliding_window=512, global_rope_scale=8.0)
    return base.adaptation_16k(base.model(enc), name="t5g2_1b")
