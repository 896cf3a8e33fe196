"""A tiny T5Gemma 2 for tests and the CPU smoke run: 12 layers (two global), GQA 4/2, window 8.

Small enough to run in seconds on one CPU core, large enough that every mechanism matters:
sequences longer than the window, two global layers, grouped-query attention with 2 kv heads,
head_dim != query_pre_attn_scalar, an EOI id inside the vocabulary.
"""

from configs import base


def get_config():
    enc = base.stack(num_layers=12, d_model=64, ffn_dim=128, num_heads=4, num_kv_heads=2,
                     head_dim=16, query_pre_attn_scalar=24.0, sliding_window=8,
                     global_rope_scale=8.0)
    cfg = base.config(base.model(enc, vocab_size=512), name="tiny")
    cfg.model.eoi_token_id = 500
    cfg.model.image_token_id = 501
    cfg.model.dtype = "float32"
    return cfg
