"""t5g2's fused flash-attention kernel for GPUs, written in Pallas (Triton lowering).

One kernel covers every mask T5Gemma 2 uses, because it reads the `MaskSpec` description itself:
query i sees key j iff their segments match (non-zero) and the part's causal/window test on
*positions* holds, computed tile by tile inside the kernel from positions and segment ids (so it
is exact for any positions, e.g. a generation cache's ring buffer). Merged attention is one
online softmax that runs over part 1's key blocks, then part 2's, ... with one running max and
sum per query row; each part keeps its own static causal/window flags.

Block skipping: on a part whose keys are the queries' own sequence with the packing contract
(`MaskSpec.contiguous`), key blocks entirely outside the causal/window band are never visited
(dynamic loop bounds by index). Inside a segment positions advance with the index, so a key
outside the index band is never visible; keys of another segment are invisible anyway. Other
parts visit every key block and rely on the mask alone.

Forward and backward are a `jax.custom_vjp`: the forward keeps (out, logsumexp) per query row,
the backward recomputes probabilities from q, k and the logsumexp (no score-sized residuals) in
a dq kernel (grid over query blocks) and a dk/dv kernel per part (grid over key blocks, summing
over the query heads that share a key/value head). Accumulation is float32; inputs may be
float32, bfloat16 or float16; the output has q's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from t5g2.model.kernels import Unsupported
from t5g2.model.kernels.sharded import over_batch_and_heads
from t5g2.model.kernels.xla import MASKED
from t5g2.model.masks import KVPart, MaskSpec

NAME = "gpu_flash"
BACKENDS = ("gpu",)

# Tiles are powers of two (Triton's are). 64 x 32 keeps head_dim 256 tiles (q, the float32
# accumulators, and k/v staged in shared memory over 2 pipeline stages) within one H100/H200 SM.
BLOCK_Q = 64  # queries per tile
BLOCK_K = 32  # keys per tile
MIN_TILE = 16  # the smallest side of a Triton dot tile
MAX_HEAD_DIM = 256  # wider rows no longer fit a tile's registers
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class _Part:
    """One key part as the kernels see it: its mask flags (arrays dropped) and whether key
    blocks outside its causal/window band are skipped."""

    flags: MaskSpec
    banded: bool

    @property
    def reach(self) -> tuple[int | None, int | None]:
        """(left, right): how many indices before / after a query its visible keys can lie,
        None for unbounded; right is at most 0 when causal."""
        left, right = self.flags.window if self.flags.window is not None else (None, None)
        if self.flags.causal:
            right = 0 if right is None else min(right, 0)
        return left, right


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static configuration of one attention call (hashable: a custom_vjp static arg)."""

    scale: float
    block_q: int
    block_k: int
    parts: tuple[_Part, ...]
    interpret: bool

    def compiler_params(self, head_dim: int):
        return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def attend(q: jax.Array, parts: Sequence[KVPart], scale: float, *, interpret: bool = False,
           block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> jax.Array:
    """Grouped-query attention of q [B,T,N,H] over the key parts under one float32 softmax.

    Raises `Unsupported` at trace time for inputs the kernel cannot take. `block_q`/`block_k`
    (powers of two, at least 16) size the tiles; tests use small ones.
    """
    _check(q, parts, block_q, block_k)
    try:
        scale = float(scale)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise Unsupported("gpu_flash needs a static scale (a Python number)") from None
    local = functools.partial(_attend_local, scale=scale, interpret=interpret,
                              block_q=block_q, block_k=block_k)
    return over_batch_and_heads(local, q, parts)


def _check(q, parts, block_q: int, block_k: int) -> None:
    """Raises Unsupported (one sentence) for what the kernel cannot express."""
    for block in (block_q, block_k):
        if block < MIN_TILE or block & (block - 1):
            raise Unsupported(f"gpu_flash tiles must be powers of two >= {MIN_TILE}, got {block}")
    if not parts:
        raise Unsupported("gpu_flash needs at least one key part")
    if q.ndim != 4 or q.dtype not in DTYPES:
        raise Unsupported(f"gpu_flash takes q [B,T,N,H] in {DTYPES}, got {q.shape} {q.dtype}")
    b, t, n, h = q.shape
    if h > MAX_HEAD_DIM:
        raise Unsupported(f"gpu_flash takes head_dim <= {MAX_HEAD_DIM}, got {h}")
    for k, v, mask in parts:
        if k.shape != v.shape or k.ndim != 4 or k.shape[0] != b or k.shape[3] != h:
            raise Unsupported(f"gpu_flash needs k and v [B,S,K,H] matching q {q.shape}, "
                              f"got {k.shape} and {v.shape}")
        if n % k.shape[2]:
            raise Unsupported(f"gpu_flash needs query heads ({n}) a multiple of kv heads "
                              f"({k.shape[2]})")
        if mask.window is not None and min(mask.window) < 0:
            raise Unsupported(f"gpu_flash takes windows with non-negative sides, got "
                              f"{mask.window}")


def _attend_local(q, parts, *, scale, interpret, block_q, block_k):
    """The kernel on one shard: pads lengths to whole tiles (segment 0: never visible) and the
    head dimension to a power of two (zeros: scores and outputs unchanged), then slices back."""
    b, t, n, h = q.shape
    width = max(MIN_TILE, pl.next_power_of_2(h))
    bq = min(block_q, max(MIN_TILE, pl.next_power_of_2(t)))
    bk = min(block_k, max(MIN_TILE, pl.next_power_of_2(max(k.shape[1] for k, _, _ in parts))))
    padded_t = _round_up(t, bq)
    fields, kvs, layout = [], [], []
    for k, v, mask in parts:
        s = k.shape[1]
        padded_s = _round_up(s, bk)
        fields.append((_pad(mask.q_positions, padded_t), _pad(mask.q_segments, padded_t)))
        kvs.append((_pad(k, padded_s, width), _pad(v, padded_s, width),
                    _pad(mask.kv_positions, padded_s), _pad(mask.kv_segments, padded_s)))
        flags = mask.replace(q_positions=None, q_segments=None, kv_positions=None,
                             kv_segments=None)
        banded = mask.contiguous and s == t and not mask.segments_only
        layout.append(_Part(flags, banded))
    plan = _Plan(scale, bq, bk, tuple(layout), interpret)
    out = _flash(plan, _pad(q, padded_t, width), tuple(fields), tuple(kvs))
    return out[:, :t, :, :h]


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _pad(x: jax.Array, length: int, width: int | None = None) -> jax.Array:
    """Zero-pads axis 1 to `length` and, for [B,T,heads,H] arrays, the last axis to `width`."""
    pads = [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    if width is not None:
        pads[-1] = (0, width - x.shape[-1])
    return jnp.pad(x, pads)


# ---- which tiles are visited (shared by the forward and both backward kernels) ----

def _key_blocks(part: _Part, q_block, block_q: int, block_k: int, key_blocks: int):
    """[first, end) key blocks that query block `q_block` visits: on banded parts the blocks
    that meet the index band [query - left, query + right], else all of them."""
    left, right = part.reach
    if not part.banded:
        return 0, key_blocks
    start = q_block * block_q
    first = 0 if left is None else lax.div(jnp.maximum(start - left, 0), block_k)
    end = key_blocks if right is None else jnp.minimum(
        lax.div(start + block_q - 1 + right, block_k) + 1, key_blocks)
    return first, end


def _query_blocks(part: _Part, k_block, block_q: int, block_k: int, query_blocks: int):
    """[first, end) query blocks that visit key block `k_block`: exactly the pairs
    `_key_blocks` visits, seen from the key side."""
    left, right = part.reach
    if not part.banded:
        return 0, query_blocks
    start = k_block * block_k
    first = 0 if right is None else lax.div(jnp.maximum(start - right, 0), block_q)
    end = query_blocks if left is None else jnp.minimum(
        lax.div(start + block_k - 1 + left, block_q) + 1, query_blocks)
    return first, end


def _scores(plan: _Plan, part: _Part, q, q_pos, q_seg, k, kv_pos, kv_seg):
    """Scaled float32 scores of a query tile against a key tile, MASKED where hidden (a large
    finite negative: exp gives 0, and a row with no visible key stays finite)."""
    s = pl.dot(q, k, trans_b=True) * plan.scale
    visible = part.flags.visible(q_pos[:, None], q_seg[:, None], kv_pos[None, :],
                                 kv_seg[None, :])
    return jnp.where(visible, s, MASKED)


# ---- forward ----

def _forward_kernel(q_ref, *refs, plan: _Plan):
    """One (query block, batch, head): online softmax over every part's visited key blocks.
    refs: per part (q_pos, q_seg, k, v, kv_pos, kv_seg), then out and logsumexp."""
    *part_refs, o_ref, lse_ref = refs
    bq, bk = plan.block_q, plan.block_k
    q_block = pl.program_id(0)
    q = q_ref[...]
    acc = jnp.zeros(q.shape, jnp.float32)
    top = jnp.full((bq,), MASKED, jnp.float32)
    total = jnp.zeros((bq,), jnp.float32)
    for p, part in enumerate(plan.parts):
        q_pos_ref, q_seg_ref, k_ref, v_ref, kv_pos_ref, kv_seg_ref = part_refs[6 * p:6 * p + 6]
        q_pos, q_seg = q_pos_ref[...], q_seg_ref[...]

        def body(j, carry, part=part, q_pos=q_pos, q_seg=q_seg, k_ref=k_ref, v_ref=v_ref,
                 kv_pos_ref=kv_pos_ref, kv_seg_ref=kv_seg_ref):
            acc, top, total = carry
            keys = pl.ds(j * bk, bk)
            s = _scores(plan, part, q, q_pos, q_seg, k_ref[keys, :], kv_pos_ref[keys],
                        kv_seg_ref[keys])
            new_top = jnp.maximum(top, s.max(axis=-1))
            rescale = jnp.exp(top - new_top)
            probs = jnp.exp(s - new_top[:, None])
            v = v_ref[keys, :]
            acc = acc * rescale[:, None] + pl.dot(probs.astype(v.dtype), v)
            return acc, new_top, total * rescale + probs.sum(axis=-1)

        first, end = _key_blocks(part, q_block, bq, bk, k_ref.shape[0] // bk)
        acc, top, total = lax.fori_loop(first, end, body, (acc, top, total))
    total = jnp.where(total == 0, 1.0, total)  # no block visited: output 0, finite
    o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)
    lse_ref[...] = top + jnp.log(total)


def _forward(plan: _Plan, q, fields, kvs):
    """(out [B,T,N,H], logsumexp [B,N,T] float32) on padded inputs."""
    b, t, n, h = q.shape
    bq = plan.block_q
    part_specs, part_args = _per_query_block_part_inputs(plan, n, fields, kvs)
    return pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan),
        grid=(t // bq, b, n),
        in_specs=[_query_tile_spec(plan, h), *part_specs],
        out_specs=[_query_tile_spec(plan, h), _row_stats_spec(plan)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        compiler_params=plan.compiler_params(h),
        interpret=plan.interpret,
        name="t5g2_flash_forward",
    )(q, *part_args)


# Grids of the forward and dq kernels: (query block, batch, query head).

def _query_tile_spec(plan: _Plan, h: int) -> pl.BlockSpec:
    """A [block_q, H] tile of a [B,T,N,H] array (q, out, d_out, dq)."""
    return pl.BlockSpec((None, plan.block_q, None, h), lambda i, b, n: (b, i, n, 0))


def _row_stats_spec(plan: _Plan) -> pl.BlockSpec:
    """A [block_q] tile of a per-row statistic [B,N,T] (logsumexp, rowsum(dO ∘ O))."""
    return pl.BlockSpec((None, None, plan.block_q), lambda i, b, n: (b, n, i))


def _per_query_block_part_inputs(plan: _Plan, query_heads: int, fields, kvs):
    """(BlockSpecs, arrays) of every part for a query-block kernel, 6 per part: the query
    block's (q_pos, q_seg) [block_q] and the whole (k, v) [S, H] and (kv_pos, kv_seg) [S] of
    the kv head that query head n reads."""
    rows = pl.BlockSpec((None, plan.block_q), lambda i, b, n: (b, i))
    specs, args = [], []
    for (q_pos, q_seg), (k, v, kv_pos, kv_seg) in zip(fields, kvs):
        s, kv_heads, h = k.shape[1:]
        group = query_heads // kv_heads
        keys = pl.BlockSpec((None, s, None, h), lambda i, b, n, g=group: (b, 0, lax.div(n, g), 0))
        key_rows = pl.BlockSpec((None, s), lambda i, b, n: (b, 0))
        specs += [rows, rows, keys, keys, key_rows, key_rows]
        args += [q_pos, q_seg, k, v, kv_pos, kv_seg]
    return specs, args


# ---- backward ----

def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, *refs, plan: _Plan):
    """dq of one (query block, batch, head) over every part's visited key blocks."""
    *part_refs, dq_ref = refs
    bq, bk = plan.block_q, plan.block_k
    q_block = pl.program_id(0)
    q, d_out, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    dq = jnp.zeros(q.shape, jnp.float32)
    for p, part in enumerate(plan.parts):
        q_pos_ref, q_seg_ref, k_ref, v_ref, kv_pos_ref, kv_seg_ref = part_refs[6 * p:6 * p + 6]
        q_pos, q_seg = q_pos_ref[...], q_seg_ref[...]

        def body(j, dq, part=part, q_pos=q_pos, q_seg=q_seg, k_ref=k_ref, v_ref=v_ref,
                 kv_pos_ref=kv_pos_ref, kv_seg_ref=kv_seg_ref):
            keys = pl.ds(j * bk, bk)
            k = k_ref[keys, :]
            s = _scores(plan, part, q, q_pos, q_seg, k, kv_pos_ref[keys], kv_seg_ref[keys])
            d_s, _ = _score_grads(plan, s, lse, delta, d_out, v_ref[keys, :])
            return dq + pl.dot(d_s.astype(k.dtype), k)

        first, end = _key_blocks(part, q_block, bq, bk, k_ref.shape[0] // bk)
        dq = lax.fori_loop(first, end, body, dq)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _score_grads(plan: _Plan, s, lse, delta, d_out, v):
    """(dL/d(q·k), P) of a tile: P ∘ (dO·Vᵀ − rowsum(dO ∘ O)) · scale, with the probabilities
    P recomputed from the forward's logsumexp."""
    probs = jnp.exp(s - lse[:, None])
    d_probs = pl.dot(d_out, v, trans_b=True)
    return probs * (d_probs - delta[:, None]) * plan.scale, probs


def _dkv_kernel(q_ref, do_ref, lse_ref, delta_ref, q_pos_ref, q_seg_ref, k_ref, v_ref,
                kv_pos_ref, kv_seg_ref, dk_ref, dv_ref, *, plan: _Plan, part: _Part):
    """dk, dv of one (key block, batch, kv head) of one part: over the query heads sharing the
    kv head (q_ref [T, group, H]) and the query blocks that visit this key block."""
    bq, bk = plan.block_q, plan.block_k
    group = q_ref.shape[1]
    k, v, kv_pos, kv_seg = k_ref[...], v_ref[...], kv_pos_ref[...], kv_seg_ref[...]
    first, end = _query_blocks(part, pl.program_id(0), bq, bk, q_ref.shape[0] // bq)

    def over_queries(i, carry, g):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, d_out = q_ref[rows, g, :], do_ref[rows, g, :]
        s = _scores(plan, part, q, q_pos_ref[rows], q_seg_ref[rows], k, kv_pos, kv_seg)
        d_s, probs = _score_grads(plan, s, lse_ref[g, rows], delta_ref[g, rows], d_out, v)
        dv = dv + pl.dot(probs.astype(d_out.dtype), d_out, trans_a=True)
        dk = dk + pl.dot(d_s.astype(q.dtype), q, trans_a=True)
        return dk, dv

    def over_group(g, carry):
        return lax.fori_loop(first, end, functools.partial(over_queries, g=g), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group, over_group, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(plan: _Plan, residuals, d_out):
    """(dq, per part (dk, dv)) on padded inputs."""
    q, fields, kvs, out, lse = residuals
    b, t, n, h = q.shape
    bq, bk = plan.block_q, plan.block_k
    delta = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32), out.astype(jnp.float32))
    q_spec, stats_spec = _query_tile_spec(plan, h), _row_stats_spec(plan)
    part_specs, part_args = _per_query_block_part_inputs(plan, n, fields, kvs)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        grid=(t // bq, b, n),
        in_specs=[q_spec, q_spec, stats_spec, stats_spec, *part_specs],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plan.compiler_params(h),
        interpret=plan.interpret,
        name="t5g2_flash_dq",
    )(q, d_out, lse, delta, *part_args)
    d_kvs = []
    for part, (q_pos, q_seg), (k, v, kv_pos, kv_seg) in zip(plan.parts, fields, kvs):
        s, kv_heads = k.shape[1], k.shape[2]
        group = n // kv_heads
        # Grid: (key block, batch, kv head); the query side is the head's whole group.
        group_spec = pl.BlockSpec((None, t, group, h), lambda j, b, c: (b, 0, c, 0))
        group_stat_spec = pl.BlockSpec((None, group, t), lambda j, b, c: (b, c, 0))
        all_rows_spec = pl.BlockSpec((None, t), lambda j, b, c: (b, 0))
        key_tile_spec = pl.BlockSpec((None, bk, None, h), lambda j, b, c: (b, j, c, 0))
        key_row_spec = pl.BlockSpec((None, bk), lambda j, b, c: (b, j))
        dk, dv = pl.pallas_call(
            functools.partial(_dkv_kernel, plan=plan, part=part),
            grid=(s // bk, b, kv_heads),
            in_specs=[group_spec, group_spec, group_stat_spec, group_stat_spec,
                      all_rows_spec, all_rows_spec, key_tile_spec, key_tile_spec,
                      key_row_spec, key_row_spec],
            out_specs=[key_tile_spec, key_tile_spec],
            out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                       jax.ShapeDtypeStruct(v.shape, v.dtype)],
            compiler_params=plan.compiler_params(h),
            interpret=plan.interpret,
            name="t5g2_flash_dkv",
        )(q, d_out, lse, delta, q_pos, q_seg, k, v, kv_pos, kv_seg)
        d_kvs.append((dk, dv, None, None))
    return dq, tuple(d_kvs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plan: _Plan, q, fields, kvs):
    """Attention on padded inputs: q [B,T,N,H]; fields per part (q_pos, q_seg) [B,T]; kvs per
    part (k, v [B,S,K,H], kv_pos, kv_seg [B,S])."""
    return _forward(plan, q, fields, kvs)[0]


def _flash_fwd(plan: _Plan, q, fields, kvs):
    out, lse = _forward(plan, q, fields, kvs)
    return out, (q, fields, kvs, out, lse)


def _flash_bwd(plan: _Plan, residuals, d_out):
    dq, d_kvs = _backward(plan, residuals, d_out)
    return dq, None, d_kvs


_flash.defvjp(_flash_fwd, _flash_bwd)
