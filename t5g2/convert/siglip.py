"""Hugging Face SigLIP vision tower + T5Gemma 2 / Gemma 3 multimodal projector <-> t5g2's
`vision/...` parameters, and the vision config both ways.

One table serves every checkpoint that holds the tower: T5Gemma 2 (`model.encoder.vision_tower.`,
older saves with `vision_model.` inside), Gemma 3 multimodal (`model.vision_tower.` /
`vision_tower.vision_model.` on disk) and a bare `SiglipVisionModel`; callers give the prefixes.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np

from t5g2.convert.hf_config import TensorSource
from t5g2.convert.layout import (CONV, HEADS_BIAS, HEADS_IN, HEADS_OUT, LINEAR, VECTOR,
                                 stack_layers, to_t5g2, to_torch, unstack_layers)
from t5g2.model.config import ConfigError, VisionConfig

# (reference name under the tower prefix, t5g2 name under vision/tower/, layout)
EMBEDDING_WEIGHTS = (
    ("embeddings.patch_embedding.weight", "patch_kernel", CONV),
    ("embeddings.patch_embedding.bias", "patch_bias", VECTOR),
    ("embeddings.position_embedding.weight", "position", VECTOR),
    ("post_layernorm.weight", "final_norm/scale", VECTOR),
    ("post_layernorm.bias", "final_norm/bias", VECTOR),
)
# (reference name under encoder.layers.{l}., t5g2 name inside the layer, layout)
VISION_LAYER_WEIGHTS = (
    ("layer_norm1.weight", "attn_norm/scale", VECTOR),
    ("layer_norm1.bias", "attn_norm/bias", VECTOR),
    ("self_attn.q_proj.weight", "attn/q", HEADS_IN),
    ("self_attn.q_proj.bias", "attn/q_bias", HEADS_BIAS),
    ("self_attn.k_proj.weight", "attn/k", HEADS_IN),
    ("self_attn.k_proj.bias", "attn/k_bias", HEADS_BIAS),
    ("self_attn.v_proj.weight", "attn/v", HEADS_IN),
    ("self_attn.v_proj.bias", "attn/v_bias", HEADS_BIAS),
    ("self_attn.out_proj.weight", "attn/o", HEADS_OUT),
    ("self_attn.out_proj.bias", "attn/o_bias", VECTOR),
    ("layer_norm2.weight", "mlp_norm/scale", VECTOR),
    ("layer_norm2.bias", "mlp_norm/bias", VECTOR),
    ("mlp.fc1.weight", "mlp/fc1", LINEAR),
    ("mlp.fc1.bias", "mlp/fc1_bias", VECTOR),
    ("mlp.fc2.weight", "mlp/fc2", LINEAR),
    ("mlp.fc2.bias", "mlp/fc2_bias", VECTOR),
)
# The projection is stored [vision width, text width] and used as x @ W: no transpose.
PROJECTOR_WEIGHTS = (
    ("mm_input_projection_weight", "projection", VECTOR),
    ("mm_soft_emb_norm.weight", "norm/scale", VECTOR),
)
TOWER_LAYERS = "vision/tower/layers"


class _Stacking(NamedTuple):
    """The tower's layers stack one per period (pattern 1), as `layout` expects of a stack."""
    num_layers: int
    sliding_window_pattern: int = 1


def vision_from_hf(cfg: Mapping[str, Any], tokens_per_image: int, where: str,
                   trainable: str = "none") -> VisionConfig:
    """VisionConfig from a SiglipVisionConfig dict and the projector's tokens per image."""
    d = dict(cfg)
    act = d.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"{where}.hidden_act={act!r}: t5g2's tower implements "
                          "gelu_pytorch_tanh (SigLIP so400m)")
    vision = VisionConfig(
        image_size=d.get("image_size", 224), patch_size=d.get("patch_size", 16),
        num_channels=d.get("num_channels", 3), d_model=d.get("hidden_size", 768),
        ffn_dim=d.get("intermediate_size", 3072), num_layers=d.get("num_hidden_layers", 12),
        num_heads=d.get("num_attention_heads", 12),
        layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)), tokens_per_image=tokens_per_image,
        trainable=trainable)
    vision.validate(where)
    return vision


def hf_from_vision(vision: VisionConfig) -> dict[str, Any]:
    """The SiglipVisionConfig fields of `vision` (no pooling head, as T5Gemma 2 and Gemma 3)."""
    return dict(hidden_size=vision.d_model, intermediate_size=vision.ffn_dim,
                num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
                num_channels=vision.num_channels, image_size=vision.image_size,
                patch_size=vision.patch_size, hidden_act="gelu_pytorch_tanh",
                layer_norm_eps=vision.layer_norm_eps, vision_use_head=False)


def tower_prefix(source: TensorSource, prefix: str) -> str:
    """`prefix` or, for checkpoints that nest the tower one level deeper, `prefix`vision_model."""
    nested = f"{prefix}vision_model."
    return nested if f"{nested}post_layernorm.weight" in source else prefix


def take_vision(source: TensorSource, vision: VisionConfig, tower: str,
                projector: str | None) -> dict[str, np.ndarray]:
    """t5g2's `vision/...` flat params from `source` (keys under `tower` and `projector`; the
    tower's alone when `projector` is None)."""
    tower = tower_prefix(source, tower)
    flat = {f"vision/tower/{ours}": to_t5g2(source.take(tower + hf), layout, vision.head_dim)
            for hf, ours, layout in EMBEDDING_WEIGHTS}
    layers = {i: {ours: to_t5g2(source.take(f"{tower}encoder.layers.{i}.{hf}"), layout,
                                vision.head_dim)
                  for hf, ours, layout in VISION_LAYER_WEIGHTS}
              for i in range(vision.num_layers)}
    flat.update(stack_layers(_Stacking(vision.num_layers), TOWER_LAYERS, layers))
    if projector is not None:
        flat.update({f"vision/projector/{ours}": source.take(projector + hf)
                     for hf, ours, _ in PROJECTOR_WEIGHTS})
    return flat


def put_vision(flat: Mapping[str, np.ndarray], vision: VisionConfig, tower: str,
               projector: str) -> dict[str, np.ndarray]:
    """The reference's tensors (keys under `tower` and `projector`) from t5g2's `vision/...`."""
    sd = {tower + hf: to_torch(np.asarray(flat[f"vision/tower/{ours}"]), layout)
          for hf, ours, layout in EMBEDDING_WEIGHTS}
    for i, weights in unstack_layers(_Stacking(vision.num_layers), TOWER_LAYERS, flat).items():
        for hf, ours, layout in VISION_LAYER_WEIGHTS:
            sd[f"{tower}encoder.layers.{i}.{hf}"] = to_torch(np.asarray(weights[ours]), layout)
    sd.update({projector + hf: np.asarray(flat[f"vision/projector/{ours}"])
               for hf, ours, _ in PROJECTOR_WEIGHTS})
    return sd
