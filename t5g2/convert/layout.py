"""Where layer i of a stack lives in t5g2's flat parameters, and how per-layer weights are laid out.

t5g2 scans whole attention-pattern periods: layer i < periods*pattern is slot i % pattern of the
stacked 'periods' (index i // pattern on the leading axis); the rest sit unstacked in 'tail'.
`stack_layers` / `unstack_layers` convert between {layer: {name: array}} and that layout, so the
checkpoint converters think in plain per-layer weights.

`LAYER_WEIGHTS` is the one table of per-layer weights shared by the Hugging Face converters:
(reference name, t5g2 name, layout). Torch linears are [out, in]; t5g2 kernels are [in, out] with
the head axis split out.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from t5g2.model.config import StackConfig

# Layouts: how a torch weight becomes a t5g2 kernel and back.
HEADS_IN = "heads_in"  # q/k/v: [heads*head_dim, in] -> [in, heads, head_dim]
HEADS_OUT = "heads_out"  # o: [out, heads*head_dim] -> [heads, head_dim, out]
LINEAR = "linear"  # [out, in] -> [in, out]
VECTOR = "vector"  # norm scales, unchanged (both keep Gemma's (1 + w) convention)
HEADS_BIAS = "heads_bias"  # q/k/v biases: [heads*head_dim] -> [heads, head_dim]
CONV = "conv"  # patch embedding: torch [out, in, kh, kw] -> [kh, kw, in, out]

ATTENTION_WEIGHTS = (
    ("q_proj.weight", "q", HEADS_IN),
    ("k_proj.weight", "k", HEADS_IN),
    ("v_proj.weight", "v", HEADS_IN),
    ("o_proj.weight", "o", HEADS_OUT),
    ("q_norm.weight", "q_norm/scale", VECTOR),
    ("k_norm.weight", "k_norm/scale", VECTOR),
)

LAYER_WEIGHTS = tuple(
    (f"self_attn.{hf}", f"attn/{ours}", layout) for hf, ours, layout in ATTENTION_WEIGHTS
) + (
    ("pre_self_attn_layernorm.weight", "pre_attn_norm/scale", VECTOR),
    ("post_self_attn_layernorm.weight", "post_attn_norm/scale", VECTOR),
    ("pre_feedforward_layernorm.weight", "pre_mlp_norm/scale", VECTOR),
    ("post_feedforward_layernorm.weight", "post_mlp_norm/scale", VECTOR),
    ("mlp.gate_proj.weight", "mlp/gate", LINEAR),
    ("mlp.up_proj.weight", "mlp/up", LINEAR),
    ("mlp.down_proj.weight", "mlp/down", LINEAR),
)


def to_t5g2(w: np.ndarray, layout: str, head_dim: int) -> np.ndarray:
    if layout == HEADS_IN:
        return w.T.reshape(w.shape[1], -1, head_dim)
    if layout == HEADS_OUT:
        return w.T.reshape(-1, head_dim, w.shape[0])
    if layout == HEADS_BIAS:
        return w.reshape(-1, head_dim)
    if layout == CONV:
        return w.transpose(2, 3, 1, 0)
    if layout == LINEAR:
        return w.T
    return w


def to_torch(w: np.ndarray, layout: str) -> np.ndarray:
    if layout == HEADS_IN:
        return w.reshape(w.shape[0], -1).T
    if layout == HEADS_OUT:
        return w.reshape(-1, w.shape[-1]).T
    if layout == HEADS_BIAS:
        return w.reshape(-1)
    if layout == CONV:
        return w.transpose(3, 2, 0, 1)
    if layout == LINEAR:
        return w.T
    return w


def layer_slot(cfg: StackConfig, i: int) -> tuple[str, int | None]:
    """(path prefix inside the stack, index on the stacked axis or None) of layer i."""
    pattern = cfg.sliding_window_pattern
    num_periods = cfg.num_layers // pattern
    if i < num_periods * pattern:
        return f"periods/layers/{i % pattern}", i // pattern
    return f"tail/{i - num_periods * pattern}", None


def stack_layers(cfg: StackConfig, prefix: str,
                 layers: Mapping[int, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """{layer i: {name: array}} -> t5g2 flat params under `prefix` (e.g. 'encoder/layers')."""
    if sorted(layers) != list(range(cfg.num_layers)):
        raise ValueError(f"{prefix}: expected layers 0..{cfg.num_layers - 1}, got "
                         f"{sorted(layers)}")
    grouped: dict[str, dict[int, np.ndarray]] = {}
    flat: dict[str, np.ndarray] = {}
    for i, weights in layers.items():
        slot, index = layer_slot(cfg, i)
        for name, w in weights.items():
            key = f"{prefix}/{slot}/{name}"
            if index is None:
                flat[key] = w
            else:
                grouped.setdefault(key, {})[index] = w
    for key, by_index in grouped.items():
        flat[key] = np.stack([by_index[j] for j in range(len(by_index))])
    return flat


def unstack_layers(cfg: StackConfig, prefix: str,
                   flat: Mapping[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """Inverse of `stack_layers`: the per-layer weights under `prefix`."""
    layers: dict[int, dict[str, np.ndarray]] = {i: {} for i in range(cfg.num_layers)}
    for i in range(cfg.num_layers):
        slot, index = layer_slot(cfg, i)
        start = f"{prefix}/{slot}/"
        for key, w in flat.items():
            if key.startswith(start):
                layers[i][key[len(start):]] = w if index is None else w[index]
    return layers
