"""Shared config structure. Each size file fills in the Gemma 3 dimensions.

Fields under `model` are checked by `t5g2.model.ModelConfig.from_config_dict`; override any of
them from the command line, e.g. `--config.model.cross_attention=separate`.
"""

import ml_collections


def stack(*, num_layers, d_model, ffn_dim, num_heads, num_kv_heads, sliding_window,
          head_dim=256, query_pre_attn_scalar=256.0, global_rope_scale=1.0):
    """One Gemma 3 stack: 5 local (theta 1e4) : 1 global (theta 1e6) layers."""
    return ml_collections.ConfigDict(dict(
        num_layers=num_layers, d_model=d_model, ffn_dim=ffn_dim, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim,
        query_pre_attn_scalar=float(query_pre_attn_scalar), sliding_window=sliding_window,
        sliding_window_pattern=6, local_rope_theta=10_000.0, global_rope_theta=1_000_000.0,
        local_rope_scale=1.0, global_rope_scale=float(global_rope_scale), rms_norm_eps=1e-6,
    ))


def model(encoder, *, vocab_size=262_144, decoder=None):
    """T5Gemma 2 with the paper's defaults: tied embeddings, merged attention."""
    return ml_collections.ConfigDict(dict(
        encoder=encoder, decoder=ml_collections.ConfigDict(decoder or encoder.to_dict()),
        vocab_size=vocab_size, tie_embeddings=True, cross_attention="merged",
        final_logit_softcap=ml_collections.FieldReference(None, field_type=float),
        pad_id=0, eos_id=1, bos_id=2, eoi_token_id=256_000, image_token_id=256_001,
        dtype="bfloat16", param_dtype="float32", remat="none",
    ))


def config(model_cfg, *, name):
    cfg = ml_collections.ConfigDict()
    cfg.name = name
    cfg.model = model_cfg
    cfg.seed = 0
    return cfg
