"""The XLA attention core: blocked einsums, correct on every backend and the reference every
fused kernel is tested against.

Queries are processed in blocks of a tile multiple (128 on accelerators, so blocks map onto MXU
and tensor-core tiles). A sliding-window part over the queries' own sequence is *banded*: each
query block scores only the keys its window reaches. This relies on positions increasing by at
least 1 per index inside a segment (true for unpadded, padded and packed rows), so a key skipped
is always a key the mask hides: the numbers are the same. Causal global layers score the whole
square here (unrolled query groups with static causal prefixes halved the FLOPs but made XLA keep
every group's temporaries live, more than doubling a 16K step's memory); the fused kernels skip.

One float32 softmax spans all key parts (merged attention). The custom VJP keeps q, k, v, the
output and one log-sum-exp per query row; the backward recomputes the probabilities and the mask
from positions and segment ids, so no score-sized mask, bias or probability outlives the forward.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import struct
from jax.ad_checkpoint import checkpoint_name

from t5g2.chunks import from_blocks, merge_sequence, split_sequence, to_blocks
from t5g2.model.masks import KVPart, MaskSpec, visible

MIN_BAND_BLOCK = 64  # queries per block of banded (sliding-window) attention, at least
ACCELERATOR_TILE = 128  # MXU / tensor-core tile: block and band sizes are multiples of it
CPU_TILE = 8  # a SIMD width: CPUs gain nothing from larger tiles, only wasted keys
MASKED = -0.5 * float(jnp.finfo(jnp.float32).max)  # score bias of hidden keys: exp() gives 0
SAVED_NAMES = ("attention_out", "attention_lse")  # what the backward needs besides q, k, v


@dataclasses.dataclass(frozen=True)
class Rule:
    """A part's static masking: its MaskSpec flags, and whether its keys come per query block
    (banded: [B, blocks, span, ...]) or whole ([B, S, ...])."""

    causal: bool
    window: tuple[int, int] | None
    banded: bool

    def visible(self, q_pos, q_seg, kv_pos, kv_seg):
        """The mask of blocked queries [B, nb, C] against this part's keys, [B, nb, C, S]."""
        kv_pos, kv_seg = ((kv_pos[:, :, None, :], kv_seg[:, :, None, :]) if self.banded else
                          (kv_pos[:, None, None, :], kv_seg[:, None, None, :]))
        return visible(q_pos[..., None], q_seg[..., None], kv_pos, kv_seg, causal=self.causal,
                       window=self.window)


def attend(q: jax.Array, parts: Sequence[KVPart], scale: float, *,
           query_chunk: int = 0) -> jax.Array:
    """Grouped-query attention of q [B,T,N,H] over the concatenation of key/value parts.

    Each part is (k [B,S,K,H], v [B,S,K,H], MaskSpec); all parts share the query positions and
    segments of the first. A query row with no visible key gets a uniform average (finite, never
    NaN); such rows exist only at padding, whose outputs nothing reads.

    query_chunk > 0 processes the query blocks in groups of about that many queries, each
    rematerialised in the backward pass, so the scores held at once are [B, heads, chunk, keys]
    instead of [B, heads, T, keys]: what makes 16K-token sequences fit.
    """
    t = q.shape[1]
    tile = _tile()
    block = _query_block(t, parts, query_chunk, tile)
    blocks = -(-t // block)
    arranged = [_arrange_part(k, v, m, t, block, blocks, tile) for k, v, m in parts]
    q_mask = parts[0][2]
    q_fields = (to_blocks(q_mask.q_positions, block, blocks),
                to_blocks(q_mask.q_segments, block, blocks))
    group = max(1, query_chunk // block) if query_chunk else blocks
    q_blocks = to_blocks(q, block, blocks)
    if group >= blocks:
        out = _attend(q_blocks, q_fields, arranged, scale)
    else:
        out = _attend_in_groups(q_blocks, q_fields, arranged, scale, group)
    return from_blocks(out, t)


def _tile() -> int:
    return ACCELERATOR_TILE if jax.default_backend() in ("gpu", "tpu") else CPU_TILE


def _round_up(n: int, tile: int) -> int:
    return -(-n // tile) * tile


def _query_block(t: int, parts: Sequence[KVPart], query_chunk: int, tile: int) -> int:
    """Queries per block: a band-friendly tile multiple when some part is windowed over its own
    sequence, else the query chunk (or all queries)."""
    reach = [sum(m.window) for k, _, m in parts if _bandable(k, m, t)]
    if reach:
        block = _round_up(max(MIN_BAND_BLOCK, *reach), tile)
        if block + max(reach) < t:  # the band is shorter than the sequence
            return block
    if query_chunk and t > query_chunk:
        return _round_up(query_chunk, tile) if query_chunk >= tile else query_chunk
    return t


def _bandable(k: jax.Array, mask: MaskSpec, t: int) -> bool:
    """A windowed part over the queries' own sequence (a cache part of the same length is not:
    its slots are not in index order)."""
    return mask.window is not None and mask.contiguous and k.shape[1] == t


def _band(x: jax.Array, block: int, blocks: int, left: int, span: int) -> jax.Array:
    """[B, T, ...] -> [B, blocks, span, ...]: for query block c, the entries at indices
    [c*block - left, c*block - left + span), zero outside the sequence."""
    extra = -(-(span - block) // block)
    x = to_blocks(x, block, blocks + extra, left)
    return jnp.concatenate([x[:, j:j + blocks] for j in range(extra + 1)], axis=2)[:, :, :span]


@struct.dataclass
class _Arranged:
    """One part's keys, values and key fields as the blocked queries read them."""

    k: jax.Array
    v: jax.Array
    kv_positions: jax.Array
    kv_segments: jax.Array
    rule: Rule = struct.field(pytree_node=False)

    @property
    def arrays(self) -> tuple[jax.Array, ...]:
        return (self.k, self.v, self.kv_positions, self.kv_segments)

    def with_arrays(self, arrays) -> "_Arranged":
        return _Arranged(*arrays, self.rule)


def _arrange_part(k, v, mask: MaskSpec, t: int, block: int, blocks: int, tile: int) -> _Arranged:
    """Banded parts carry a block axis [B, blocks, span, ...] (span: the window's reach past a
    block, rounded up to the tile); the others stay [B, S, ...]."""
    if blocks > 1 and _bandable(k, mask, t):
        left, right = mask.window
        span = _round_up(block + left + right, tile)
        arrays = [_band(x, block, blocks, left, span)
                  for x in (k, v, mask.kv_positions, mask.kv_segments)]
        return _Arranged(*arrays, Rule(mask.causal, mask.window, banded=True))
    return _Arranged(k, v, mask.kv_positions, mask.kv_segments,
                     Rule(mask.causal, mask.window, banded=False))


def _attend(q, q_fields, parts: Sequence[_Arranged], scale: float) -> jax.Array:
    """Blocked queries q [B, nb, C, N, H] against the arranged parts -> [B, nb, C, N, H]."""
    b, nb, c, n, h = q.shape
    kv_heads = parts[0].k.shape[-2]
    q = q.reshape(b, nb, c, kv_heads, n // kv_heads, h).transpose(0, 3, 1, 2, 4, 5)  # bkncgh
    out = _softmax_attention(tuple(p.rule for p in parts), scale, q, *q_fields,
                             tuple(p.arrays for p in parts))
    return out.transpose(0, 2, 3, 1, 4, 5).reshape(b, nb, c, n, h)


def _specs(banded: bool) -> tuple[str, str]:
    """(q·k -> scores, probs·v -> out) einsums; batch axes first, so no score-sized transposes."""
    if banded:
        return "bkncgh,bnskh->bkncgs", "bkncgs,bnskh->bkncgh"
    return "bkncgh,bskh->bkncgs", "bkncgs,bskh->bkncgh"


def _scores(rules, scale, q, q_pos, q_seg, parts):
    """Each part's masked float32 scores [b,k,n,c,g,s]: q·k in the compute dtype, scaled by the
    unrounded scalar and rounded to the compute dtype once (as the reference does), then keys
    the mask hides pushed to MASKED."""
    scores = []
    for rule, (k, _, kv_pos, kv_seg) in zip(rules, parts):
        s = jnp.einsum(_specs(rule.banded)[0], q, k)
        s = (s.astype(jnp.float32) * scale).astype(q.dtype).astype(jnp.float32)
        seen = rule.visible(q_pos, q_seg, kv_pos, kv_seg)[:, None, :, :, None, :]
        scores.append(s + jnp.where(seen, 0.0, MASKED))  # a bias broadcast into the add
    return scores


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _softmax_attention(rules, scale, q, q_pos, q_seg, parts):
    """softmax(q·k·scale, masked) · v over all parts under one softmax, q [b,k,n,c,g,h].

    Computed part by part (no concatenated scores): a shared max, exp per part, one total, the
    parts' P·V summed in float32. The
    backward is FlashAttention's (dS = P ∘ (dP − rowsum(dO ∘ O))) with P recomputed from the
    saved log-sum-exp.
    """
    return _softmax_attention_fwd(rules, scale, q, q_pos, q_seg, parts)[0]


def _softmax_attention_fwd(rules, scale, q, q_pos, q_seg, parts):
    scores = _scores(rules, scale, q, q_pos, q_seg, parts)
    top = functools.reduce(jnp.maximum, [s.max(axis=-1, keepdims=True) for s in scores])
    weights = [jnp.exp(s - top) for s in scores]
    total = sum(w.sum(axis=-1, keepdims=True) for w in weights)
    dtype = parts[0][1].dtype
    # Probabilities rounded to a narrower compute dtype are rounded normalised, as the reference
    # rounds them; in float32 nothing rounds, so normalise after P·V ([rows, head_dim] divisions
    # instead of score-sized ones).
    late = dtype == jnp.float32
    out = sum(jnp.einsum(_specs(rule.banded)[1], (w if late else w / total).astype(dtype), p[1],
                         preferred_element_type=jnp.float32)
              for w, p, rule in zip(weights, parts, rules))
    out = (out / total if late else out).astype(dtype)
    lse = top + jnp.log(total)
    # Named, so a remat policy can keep them (`SAVED_NAMES`) instead of recomputing the forward.
    out, lse = checkpoint_name(out, SAVED_NAMES[0]), checkpoint_name(lse, SAVED_NAMES[1])
    return out, (q, q_pos, q_seg, parts, out, lse)


def _softmax_attention_bwd(rules, scale, residuals, d_out):
    q, q_pos, q_seg, parts, out, lse = residuals
    f32 = jnp.float32
    row = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)  # bkncg1
    scores = _scores(rules, scale, q, q_pos, q_seg, parts)
    dq, d_parts = 0.0, []
    for s, rule, (k, v, _, _) in zip(scores, rules, parts):
        p = jnp.exp(s - lse).astype(v.dtype)
        kv_in = _specs(rule.banded)[0].split("->")[0].split(",")[1]
        dv = jnp.einsum(f"bkncgs,bkncgh->{kv_in}", p, d_out.astype(v.dtype))
        dp = jnp.einsum(f"bkncgh,{kv_in}->bkncgs", d_out.astype(v.dtype), v,
                        preferred_element_type=f32)
        ds = (p.astype(f32) * (dp - row) * scale).astype(q.dtype)
        dq = dq + jnp.einsum(f"bkncgs,{kv_in}->bkncgh", ds, k, preferred_element_type=f32)
        dk = jnp.einsum(f"bkncgs,bkncgh->{kv_in}", ds, q).astype(k.dtype)
        d_parts.append((dk, dv.astype(v.dtype), None, None))
    return dq.astype(q.dtype), None, None, tuple(d_parts)


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def _attend_in_groups(q, q_fields, parts: Sequence[_Arranged], scale, group: int) -> jax.Array:
    """`_attend` over groups of `group` query blocks with lax.map, each group rematerialised in
    the backward pass (banded parts are split along with their queries)."""
    def split(x):  # [B, nb, ...] -> [groups, B, group, ...]
        return split_sequence(x, group)

    mapped = [tuple(split(x) for x in p.arrays) if p.rule.banded else () for p in parts]

    @jax.checkpoint
    def attend_group(args):
        q_group, fields, banded_group = args
        group_parts = [p.with_arrays(g) if p.rule.banded else p
                       for p, g in zip(parts, banded_group)]
        return _attend(q_group, fields, group_parts, scale)

    fields = tuple(split(x) for x in q_fields)
    out = jax.lax.map(attend_group, (split(q), fields, mapped))
    return merge_sequence(out, q.shape[1])
