"""Attention: masks described by positions and segment ids, the softmax core, and the projections.

A mask is described, not materialised, by `MaskSpec` (query/key positions and segment ids plus
static causal/window flags), so a blockwise or fused kernel can replace `dot_product_attention`
without touching the layers. Segment id 0 is padding; a query only sees keys of its own segment.

Merged attention (T5Gemma 2) is `dot_product_attention` over two key/value parts: the decoder's
own keys (causal, RoPE) and the encoder outputs projected by the same k/v weights (no RoPE, never
windowed), joined under one softmax.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from t5g2.chunks import merge_sequence, split_sequence
from t5g2.model.layers import RMSNorm, default_init, param
from t5g2.model.rope import apply_rope


@struct.dataclass
class MaskSpec:
    """Which keys each query may see: same non-zero segment, plus optional causality and window.

    The window is in positions relative to the query: keys with -left <= k_pos - q_pos <= right.
    """

    q_positions: jax.Array  # [batch, q_len]
    q_segments: jax.Array  # [batch, q_len]
    kv_positions: jax.Array  # [batch, kv_len]
    kv_segments: jax.Array  # [batch, kv_len]
    causal: bool = struct.field(pytree_node=False, default=False)
    window: tuple[int, int] | None = struct.field(pytree_node=False, default=None)

    def dense(self) -> jax.Array:
        """The boolean mask [batch, q_len, kv_len]."""
        q_seg, kv_seg = self.q_segments[:, :, None], self.kv_segments[:, None, :]
        mask = (q_seg == kv_seg) & (kv_seg != 0)
        offset = self.kv_positions[:, None, :] - self.q_positions[:, :, None]
        if self.causal:
            mask &= offset <= 0
        if self.window is not None:
            left, right = self.window
            mask &= (offset >= -left) & (offset <= right)
        return mask


def encoder_window(window: int) -> tuple[int, int]:
    """The reference's two-sided encoder window: W keys, (W+1)//2-1 to the left, W//2 right."""
    return ((window + 1) // 2 - 1, window // 2)


def decoder_window(window: int) -> tuple[int, int]:
    """Causal sliding window: W keys including the query itself."""
    return (window - 1, 0)


KVPart = tuple[jax.Array, jax.Array, MaskSpec]


def dot_product_attention(q: jax.Array, parts: Sequence[KVPart], scale: float,
                          query_chunk: int = 0) -> jax.Array:
    """Grouped-query attention of q [B,T,N,H] over the concatenation of key/value parts.

    Each part is (k [B,S,K,H], v [B,S,K,H], MaskSpec); one float32 softmax spans all parts.
    A query row with no visible key gets a uniform average (finite, never NaN); such rows exist
    only at padding, whose outputs nothing reads.

    query_chunk > 0 processes the queries in chunks of that many, each rematerialised in the
    backward pass, so the scores held at once are [B, heads, chunk, keys] instead of
    [B, heads, T, keys]: what makes 16K-token sequences fit. The numbers are the same.
    """
    k = jnp.concatenate([p[0] for p in parts], axis=1)
    v = jnp.concatenate([p[1] for p in parts], axis=1)
    masks = [p[2] for p in parts]
    t = q.shape[1]
    if not query_chunk or t <= query_chunk:
        return _attend(q, k, v, masks, scale)

    q_fields = [(split_sequence(m.q_positions, query_chunk),
                 split_sequence(m.q_segments, query_chunk)) for m in masks]

    @jax.checkpoint
    def attend_chunk(args):
        q_chunk, fields = args
        chunk_masks = [m.replace(q_positions=pos, q_segments=seg)
                       for m, (pos, seg) in zip(masks, fields)]
        return _attend(q_chunk, k, v, chunk_masks, scale)

    out = jax.lax.map(attend_chunk, (split_sequence(q, query_chunk), q_fields))
    return merge_sequence(out, t)


def _attend(q, k, v, masks: Sequence[MaskSpec], scale: float) -> jax.Array:
    mask = jnp.concatenate([m.dense() for m in masks], axis=-1)
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k)
    # Scale by the unrounded scalar, then round to the compute dtype once, as the reference does.
    scores = (scores.astype(jnp.float32) * scale).astype(q.dtype).astype(jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


class Attention(nnx.Module):
    """Gemma 3 attention projections: q/k/v/o, q/k RMSNorm over head_dim, GQA, optional RoPE.

    `kv_dim` is the width keys/values are projected from: d_model for self and merged attention,
    the encoder's width for a separate cross-attention.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float, eps: float, *, kv_dim: int | None = None, query_chunk: int = 0,
                 param_dtype, rngs: nnx.Rngs):
        kv_dim = d_model if kv_dim is None else kv_dim
        self.scale = scale
        self.query_chunk = query_chunk
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
        q = self.q_norm(jnp.einsum("btd,dnh->btnh", x, self.q[...].astype(x.dtype)))
        return q if rope is None else apply_rope(q, *rope)

    def keys_values(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None):
        k = self.k_norm(jnp.einsum("bsd,dkh->bskh", x, self.k[...].astype(x.dtype)))
        v = jnp.einsum("bsd,dkh->bskh", x, self.v[...].astype(x.dtype))
        return (k if rope is None else apply_rope(k, *rope)), v

    def output(self, attended: jax.Array) -> jax.Array:
        return jnp.einsum("btnh,nhd->btd", attended, self.o[...].astype(attended.dtype))

    def self_attention(self, x, rope, mask: MaskSpec) -> jax.Array:
        """Encoder (bidirectional) or decoder (causal) self-attention."""
        q = self.queries(x, rope)
        k, v = self.keys_values(x, rope)
        return self.output(dot_product_attention(q, [(k, v, mask)], self.scale,
                                                 self.query_chunk))

    def merged_attention(self, x, rope, self_mask: MaskSpec, encoded: jax.Array,
                         cross_mask: MaskSpec) -> jax.Array:
        """T5Gemma 2: one softmax over [decoder keys (RoPE) | encoder keys (no RoPE)]."""
        q = self.queries(x, rope)
        k_self, v_self = self.keys_values(x, rope)
        k_cross, v_cross = self.keys_values(encoded, None)
        parts = [(k_self, v_self, self_mask), (k_cross, v_cross, cross_mask)]
        return self.output(dot_product_attention(q, parts, self.scale, self.query_chunk))

    def cross_attention(self, x, encoded: jax.Array, cross_mask: MaskSpec) -> jax.Array:
        """Classic cross-attention over encoder outputs, no RoPE on either side."""
        q = self.queries(x, None)
        k, v = self.keys_values(encoded, None)
        return self.output(dot_product_attention(q, [(k, v, cross_mask)], self.scale,
                                                 self.query_chunk))
