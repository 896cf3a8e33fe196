"""Attention layers: the Gemma 3 projections and the generation KV cache.

The softmax core is not here: `t5g2.model.kernels.dot_product_attention` runs it with the
implementation the config names (XLA einsums, splash on TPU, cuDNN or a Pallas flash kernel on
GPU), over key/value parts each with its `MaskSpec`, so adding a kernel never changes a layer.

Merged attention (T5Gemma 2) is one softmax over two key/value parts: the decoder's own keys
(causal, RoPE) and the encoder outputs projected by the same k/v weights (no RoPE, never
windowed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from t5g2.model.kernels import XLA, Kernel, dot_product_attention
from t5g2.model.layers import RMSNorm, default_init, param, project
from t5g2.model.masks import KVPart, MaskSpec, decoder_window, encoder_window
from t5g2.model.rope import apply_rope

__all__ = ["Attention", "KVCache", "KV_CACHE_AXES", "Kernel", "KVPart", "MaskSpec",
           "decoder_window", "dot_product_attention", "encoder_window"]


class Attention(nnx.Module):
    """Gemma 3 attention projections: q/k/v/o, q/k RMSNorm over head_dim, GQA, optional RoPE.

    `kv_dim` is the width keys/values are projected from: d_model for self and merged attention,
    the encoder's width for a separate cross-attention.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float, eps: float, *, kv_dim: int | None = None, kernel: Kernel = XLA,
                 param_dtype, rngs: nnx.Rngs):
        kv_dim = d_model if kv_dim is None else kv_dim
        self.scale = scale
        self.kernel = kernel
        self.q = param(rngs, default_init, (d_model, num_heads, head_dim),
                       ("embed", "heads", "head_dim"), param_dtype)
        self.k = param(rngs, default_init, (kv_dim, num_kv_heads, head_dim),
                       ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v = param(rngs, default_init, (kv_dim, num_kv_heads, head_dim),
                       ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o = param(rngs, default_init, (num_heads, head_dim, d_model),
                       ("heads", "head_dim", "embed"), param_dtype)
        self.q_norm = RMSNorm(head_dim, eps, "head_dim", param_dtype=param_dtype, rngs=rngs)
        self.k_norm = RMSNorm(head_dim, eps, "head_dim", param_dtype=param_dtype, rngs=rngs)

    def queries(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        q = self.q_norm(project(x, self.q[...]))
        return q if rope is None else apply_rope(q, *rope)

    def keys_values(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None):
        k = self.k_norm(project(x, self.k[...]))
        v = project(x, self.v[...])
        return (k if rope is None else apply_rope(k, *rope)), v

    def output(self, attended: jax.Array) -> jax.Array:
        return project(attended, self.o[...], contract=2)

    def attend(self, x, rope, self_mask: MaskSpec | None, cross: KVPart | None = None,
               cache: "KVCache | None" = None) -> tuple[jax.Array, "KVCache | None"]:
        """Queries from x over [cached keys | x's own keys | a cross part], under one softmax.

        self_mask None: no self part (classic cross-attention). With a cache (generation), the
        keys x produces are attended together with the cached ones and then written into it;
        returns (output, updated cache or None).
        """
        q = self.queries(x, rope)
        parts = []
        if self_mask is not None:
            k, v = self.keys_values(x, rope)
            if cache is not None:
                parts.append(cache.part(self_mask))
                cache = cache.write(k, v, self_mask.q_positions, self_mask.q_segments)
            parts.append((k, v, self_mask))
        if cross is not None:
            parts.append(cross)
        return self.output(dot_product_attention(q, parts, self.scale, self.kernel)), cache

    def self_attention(self, x, rope, mask: MaskSpec) -> jax.Array:
        """Encoder (bidirectional) or decoder (causal) self-attention."""
        return self.attend(x, rope, mask)[0]

    def cross_part(self, encoded: jax.Array, cross_mask: MaskSpec) -> KVPart:
        """Encoder outputs projected by this attention's k/v weights: no RoPE, never windowed."""
        return (*self.keys_values(encoded, None), cross_mask)

    def merged_attention(self, x, rope, self_mask: MaskSpec, encoded: jax.Array,
                         cross_mask: MaskSpec) -> jax.Array:
        """T5Gemma 2: one softmax over [decoder keys (RoPE) | encoder keys (no RoPE)]."""
        return self.attend(x, rope, self_mask, self.cross_part(encoded, cross_mask))[0]

    def cross_attention(self, x, encoded: jax.Array, cross_mask: MaskSpec) -> jax.Array:
        """Classic cross-attention over encoder outputs, no RoPE on either side."""
        return self.attend(x, None, None, self.cross_part(encoded, cross_mask))[0]


KV_CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")  # logical axes of cached keys/values


@struct.dataclass
class KVCache:
    """One attention's own past keys/values for generation (keys after k-norm and RoPE).

    Each slot records the position and segment id of the key it holds (segment 0: empty), so
    the usual `MaskSpec` decides visibility and slot order does not matter. `ring`: a buffer of
    the sliding window, slot = position mod length (a key leaves the window exactly when the
    key `length` positions later overwrites it); otherwise slot = position.
    """

    k: jax.Array  # [batch, length, kv_heads, head_dim]
    v: jax.Array
    positions: jax.Array  # [batch, length]
    segments: jax.Array  # [batch, length]
    ring: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def empty(cls, batch: int, length: int, kv_heads: int, head_dim: int, dtype,
              ring: bool) -> "KVCache":
        kv = jnp.zeros((batch, length, kv_heads, head_dim), dtype)
        ids = jnp.zeros((batch, length), jnp.int32)
        return cls(kv, kv, ids, ids, ring=ring)

    def part(self, mask: MaskSpec) -> KVPart:
        """The cached keys as a part seen by `mask`'s queries (with its causality and window)."""
        seen = MaskSpec(mask.q_positions, mask.q_segments, self.positions, self.segments,
                        causal=mask.causal, window=mask.window)
        return self.k, self.v, seen

    def write(self, k, v, positions, segments) -> "KVCache":
        """Stores the keys of tokens with segment != 0 at their slots; a ring keeps only each
        row's last `length` positions (so no two written keys share a slot)."""
        length = self.k.shape[1]
        keep = segments != 0
        if self.ring:
            last = jnp.max(jnp.where(keep, positions, -1), axis=1, keepdims=True)
            keep &= positions > last - length
            slots = positions % length
        else:
            keep &= positions < length
            slots = positions
        slots = jnp.where(keep, slots, length)  # out of range: dropped
        rows = jnp.arange(k.shape[0])[:, None]

        def put(buffer, values):
            return buffer.at[rows, slots].set(values.astype(buffer.dtype), mode="drop")

        return self.replace(k=put(self.k, k), v=put(self.v, v),
                            positions=put(self.positions, positions),
                            segments=put(self.segments, segments))
