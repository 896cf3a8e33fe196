"""T5Gemma 2 270M-270M: two Gemma 3 270M stacks (18 layers, d 640, 4 q / 1 kv heads), 16K
training."""

from configs import base


def get_config():
    enc = base.stack(num_layers=18, d_model=640, ffn_dim=2048, num_heads=4, num_kv_heads=1,
                     sliding_window=512, global_rope_scale=8.0)
    return base.adaptation_16k(base.model(enc), name="t5g2_270m")
