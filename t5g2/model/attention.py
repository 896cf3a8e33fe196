"""Attention: masks described by positions and segment ids, the softmax core, and the projections.

A mask is described, not materialised, by `MaskSpec` (query/key positions and segment ids plus
static causal/window flags), so a blockwise or fused kernel can replace `dot_product_attention`
without touching the layers. Segment id 0 is padding; a query only sees keys of its own segment.

Merged attention (T5Gemma 2) is `dot_product_attention` over two key/value parts: the decoder's
own keys (causal, RoPE) and the encoder outputs projected by the same k/v weights (no RoPE, never
windowed), joined under one softmax.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from t5g2.chunks import from_blocks, merge_sequence, split_sequence, to_blocks
from t5g2.model.layers import RMSNorm, default_init, param, project
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
        return self.visible(self.q_positions[:, :, None], self.q_segments[:, :, None],
                            self.kv_positions[:, None, :], self.kv_segments[:, None, :])

    def visible(self, q_pos, q_seg, kv_pos, kv_seg) -> jax.Array:
        """The mask for broadcastable query and key position/segment arrays."""
        mask = (q_seg == kv_seg) & (kv_seg != 0)
        offset = kv_pos - q_pos
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

MIN_BAND_BLOCK = 64  # queries per block of banded (sliding-window) attention, at least
MASKED = -0.5 * float(jnp.finfo(jnp.float32).max)  # score bias of hidden keys: exp() gives 0


def dot_product_attention(q: jax.Array, parts: Sequence[KVPart], scale: float,
                          query_chunk: int = 0) -> jax.Array:
    """Grouped-query attention of q [B,T,N,H] over the concatenation of key/value parts.

    Each part is (k [B,S,K,H], v [B,S,K,H], MaskSpec); one float32 softmax spans all parts.
    A query row with no visible key gets a uniform average (finite, never NaN); such rows exist
    only at padding, whose outputs nothing reads.

    Queries are processed in blocks. A sliding-window part whose keys are the queries' own
    sequence is *banded*: each query block scores only the keys its window can reach (block +
    left + right of them) instead of all S, which is what makes local layers cost O(T·W), not
    O(T·S). This relies on positions increasing by at least 1 per index inside a segment (true
    for unpadded, padded and packed rows), so a key outside the band is never visible; the
    keys skipped are exactly keys the dense mask hides, and the numbers are the same.

    query_chunk > 0 processes the query blocks in groups of about that many queries, each
    rematerialised in the backward pass, so the scores held at once are [B, heads, chunk, keys]
    instead of [B, heads, T, keys]: what makes 16K-token sequences fit.
    """
    t = q.shape[1]
    block = _query_block(t, parts, query_chunk)
    blocks = -(-t // block)
    prepared = [_arrange_part(k, v, m, t, block, blocks) for k, v, m in parts]
    q_blocks = to_blocks(q, block, blocks)
    q_fields = [(to_blocks(m.q_positions, block, blocks),
                 to_blocks(m.q_segments, block, blocks)) for _, _, m in parts]
    chunk_blocks = max(1, query_chunk // block) if query_chunk else blocks
    if chunk_blocks >= blocks:
        out = _attend(q_blocks, q_fields, prepared, [m for _, _, m in parts], scale)
    else:
        out = _attend_in_chunks(q_blocks, q_fields, prepared, [m for _, _, m in parts], scale,
                                chunk_blocks)
    return from_blocks(out, t)


def _query_block(t: int, parts: Sequence[KVPart], query_chunk: int) -> int:
    """Queries per block: a band-friendly size when some part is windowed over its own
    sequence, else the query chunk (or all queries)."""
    reach = [sum(m.window) for k, _, m in parts if _bandable(k, m, t)]
    if reach:
        block = max(MIN_BAND_BLOCK, *reach)
        if block + max(reach) < t:  # the band is shorter than the sequence
            return block
    return query_chunk if query_chunk and t > query_chunk else t


def _bandable(k: jax.Array, mask: MaskSpec, t: int) -> bool:
    return mask.window is not None and k.shape[1] == t


def _band(x: jax.Array, block: int, blocks: int, left: int, right: int) -> jax.Array:
    """[B, T, ...] -> [B, blocks, block + left + right, ...]: for query block c, the entries at
    indices [c*block - left, (c+1)*block + right), zero outside the sequence."""
    span = block + left + right
    extra = -(-(left + right) // block)
    x = to_blocks(x, block, blocks + extra, left)
    return jnp.concatenate([x[:, j:j + blocks] for j in range(extra + 1)], axis=2)[:, :, :span]


def _arrange_part(k, v, mask: MaskSpec, t: int, block: int, blocks: int):
    """(k, v, kv_positions, kv_segments, banded) for blocked queries: banded parts carry a
    block axis [B, blocks, span, ...], the others stay [B, S, ...]."""
    if blocks > 1 and _bandable(k, mask, t):
        left, right = mask.window
        return tuple(_band(x, block, blocks, left, right)
                     for x in (k, v, mask.kv_positions, mask.kv_segments)) + (True,)
    return (k, v, mask.kv_positions, mask.kv_segments, False)


def _attend(q, q_fields, parts, masks: Sequence[MaskSpec], scale: float) -> jax.Array:
    """Blocked queries q [B, nb, C, N, H] against the arranged parts -> [B, nb, C, N, H]."""
    b, nb, c, n, h = q.shape
    kv_heads = parts[0][0].shape[-2]
    q = q.reshape(b, nb, c, kv_heads, n // kv_heads, h).transpose(0, 3, 1, 2, 4, 5)  # bkncgh
    biases = []
    for (_, _, kv_pos, kv_seg, banded), mask, (q_pos, q_seg) in zip(parts, masks, q_fields):
        kv_pos, kv_seg = ((kv_pos[:, :, None, :], kv_seg[:, :, None, :]) if banded else
                          (kv_pos[:, None, None, :], kv_seg[:, None, None, :]))
        visible = mask.visible(q_pos[..., None], q_seg[..., None], kv_pos, kv_seg)  # bncs
        biases.append(jnp.where(visible, 0.0, MASKED).astype(jnp.float32))
    out = _softmax_attention(tuple(p[4] for p in parts), scale, q, tuple(p[0] for p in parts),
                             tuple(p[1] for p in parts), tuple(biases))
    return out.transpose(0, 2, 3, 1, 4, 5).reshape(b, nb, c, n, h)


def _specs(banded: bool) -> tuple[str, str]:
    """(q·k -> scores, probs·v -> out) einsums; batch axes first, so no score-sized transposes."""
    if banded:
        return "bkncgh,bnskh->bkncgs", "bkncgs,bnskh->bkncgh"
    return "bkncgh,bskh->bkncgs", "bkncgs,bskh->bkncgh"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _softmax_attention(banded, scale, q, ks, vs, biases):
    """softmax(q·k·scale + bias) · v over all parts under one softmax, q [b,k,n,c,g,h].

    Computed part by part (no concatenated scores, no sliced probabilities): a shared max, exp
    per part, one total, probabilities rounded to the compute dtype before P·V (as the
    reference rounds them), the parts' P·V summed in float32. The backward is FlashAttention's
    (dS = P ∘ (dP − rowsum(dO ∘ O))): no reduction over keys, which XLA:CPU runs slowly.
    """
    return _softmax_attention_fwd(banded, scale, q, ks, vs, biases)[0]


def _softmax_attention_fwd(banded, scale, q, ks, vs, biases):
    scores = []
    for k, bias, band in zip(ks, biases, banded):
        s = jnp.einsum(_specs(band)[0], q, k)
        # Scale by the unrounded scalar, round to the compute dtype once (as the reference
        # does), then hide keys with an additive bias.
        s = (s.astype(jnp.float32) * scale).astype(q.dtype).astype(jnp.float32)
        scores.append(s + bias[:, None, :, :, None, :])
    top = functools.reduce(jnp.maximum, [s.max(axis=-1, keepdims=True) for s in scores])
    weights = [jnp.exp(s - top) for s in scores]
    total = sum(w.sum(axis=-1, keepdims=True) for w in weights)
    probs = tuple((w / total).astype(v.dtype) for w, v in zip(weights, vs))
    out = sum(jnp.einsum(_specs(band)[1], p, v, preferred_element_type=jnp.float32)
              for p, v, band in zip(probs, vs, banded)).astype(vs[0].dtype)
    return out, (q, ks, vs, biases, probs, out)


def _softmax_attention_bwd(banded, scale, residuals, d_out):
    q, ks, vs, biases, probs, out = residuals
    f32 = jnp.float32
    row = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)  # bkncg1
    dq, dks, dvs = 0.0, [], []
    for k, v, p, band in zip(ks, vs, probs, banded):
        score_spec, out_spec = _specs(band)
        kv_in = score_spec.split("->")[0].split(",")[1]
        dvs.append(jnp.einsum(f"bkncgs,bkncgh->{kv_in}", p, d_out.astype(v.dtype)))
        dp = jnp.einsum(f"bkncgh,{kv_in}->bkncgs", d_out.astype(v.dtype), v,
                        preferred_element_type=f32)
        ds = (p.astype(f32) * (dp - row) * scale).astype(q.dtype)
        dq = dq + jnp.einsum(f"bkncgs,{kv_in}->bkncgh", ds, k, preferred_element_type=f32)
        dks.append(jnp.einsum(f"bkncgs,bkncgh->{kv_in}", ds, q).astype(k.dtype))
    return (dq.astype(q.dtype), tuple(dks), tuple(x.astype(v.dtype) for x, v in zip(dvs, vs)),
            tuple(jnp.zeros_like(b) for b in biases))


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def _attend_in_chunks(q, q_fields, parts, masks, scale, chunk_blocks: int) -> jax.Array:
    """`_attend` over groups of `chunk_blocks` query blocks with lax.map, each group
    rematerialised in the backward pass (banded parts are split along with their queries)."""
    def split(x):  # [B, nb, ...] -> [groups, B, chunk_blocks, ...]
        return split_sequence(x, chunk_blocks)

    mapped = [tuple(split(x) for x in p[:4]) if p[4] else () for p in parts]

    @jax.checkpoint
    def attend_group(args):
        q_group, fields, banded_group = args
        group_parts = [g + (True,) if p[4] else p for p, g in zip(parts, banded_group)]
        return _attend(q_group, fields, group_parts, masks, scale)

    fields = [(split(pos), split(seg)) for pos, seg in q_fields]
    out = jax.lax.map(attend_group, (split(q), fields, mapped))
    return merge_sequence(out, q.shape[1])


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
        return self.output(dot_product_attention(q, parts, self.scale, self.query_chunk)), cache

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
