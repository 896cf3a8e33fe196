"""T5Gemma 2 4B-4B: two Gemma 3 4B stacks (34 layers, d 2560, 8 q / 4 kv heads), 16K training."""

from configs import base


def get_config():
    enc = base.stack(num_layers=34, d_model=2560, ffn_dim=10240, num_heads=8, num_kv_heads=4,
                     sliding_window=1024, global_rope_scale=8.0)
    return base.adaptation_16k(base.model(enc), name="t5g2_4b")
