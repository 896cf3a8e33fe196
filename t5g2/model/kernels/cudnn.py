"""cuDNN's fused flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`,
for the masks cuDNN can express.

cuDNN masks by *index* and by per-row *lengths*: causal, a left sliding window, and padding as
"the first `length` queries/keys of each row are real". It has no segment ids. So it takes:

* one key/value part (self-attention: encoder global; decoder causal, global or with a causal
  sliding window; or a cross-only part over encoder keys);
* not a two-sided window (the encoder's local layers): jax's cuDNN call takes a left window only;
* not merged attention (two parts under one softmax): combining two calls by their log-sum-exp
  needs the gradient through each call's log-sum-exp, and both of jax's implementations return
  it without one (the cuDNN VJP drops the residual's cotangent, the `xla` one stops its
  gradient), so the combination's gradients would be silently wrong. `gpu_flash` takes merged
  attention natively;
* on the GPU: bfloat16/float16 inputs, head_dim a multiple of 8 up to 128 (256 on Hopper and
  later), as jax's cuDNN checks require.
Anything else raises `Unsupported` while tracing.

Whether a batch's segment ids are "one segment, then padding" per row (what lengths express) is
data, unknown while tracing. Each call therefore checks it on the device: when every row is one
run of a single segment id from index 0 followed by padding, with positions equal to index plus
one per-row constant where the part is causal or windowed, the cuDNN call runs on the rows'
lengths (exactly the `MaskSpec`'s mask); otherwise (packed rows) `lax.cond` takes the fallback
instead: t5g2's flash kernel (`gpu_flash`, which reads segment ids), or the XLA core where that
cannot take the part. Packed batches get the right numbers, never a wrong mask; both branches are
compiled.

`interpret=True` (CPU tests) runs this same code with jax's `implementation="xla"`, which takes
the same lengths, causal flag and window, and the fallback in interpret mode.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from t5g2.model import kernels
from t5g2.model.kernels import Unsupported, xla
from t5g2.model.kernels.sharded import over_batch_and_heads
from t5g2.model.masks import KVPart, MaskSpec

NAME = "cudnn"
BACKENDS = ("gpu",)

DTYPES = (jnp.bfloat16, jnp.float16)  # what cuDNN's flash attention takes (no float32)
HEAD_DIM_MULTIPLE = 8
MAX_HEAD_DIM = {True: 256, False: 128}  # by "Hopper (compute capability 9.0) or later"
# Query chunk of the XLA core when it is the fallback (the released configs'
# attention_query_chunk): bounds its scores to [chunk x keys] per head at 16K tokens.
FALLBACK_QUERY_CHUNK = 1024


def attend(q: jax.Array, parts: Sequence[KVPart], scale: float, *,
           interpret: bool = False) -> jax.Array:
    """Attention of q [B,T,N,H] over one key/value part by cuDNN where the batch's rows are
    lengths, else by the fallback (see the module docstring); `interpret` runs jax's XLA
    implementation of the same call and the fallback interpreted."""
    causal, window = index_mask(q, parts)
    if not interpret:
        check_device(q, parts[0][0])
    fused = functools.partial(_attend_shard, scale=scale, causal=causal, window=window,
                              implementation="xla" if interpret else "cudnn")
    exact = prefix_lengths(parts[0][2], causal or window is not None)[2]
    return jax.lax.cond(exact, lambda q, parts: over_batch_and_heads(fused, q, parts),
                        functools.partial(fallback, scale=scale, interpret=interpret),
                        q, list(parts))


def fallback(q: jax.Array, parts: Sequence[KVPart], *, scale: float,
             interpret: bool) -> jax.Array:
    """The attention of a batch lengths cannot express: t5g2's flash kernel where it takes the
    parts, else the XLA core."""
    try:
        return kernels.implementation("gpu_flash").attend(q, parts, scale, interpret=interpret)
    except Unsupported:
        return xla.attend(q, parts, scale, query_chunk=FALLBACK_QUERY_CHUNK)


def index_mask(q: jax.Array, parts: Sequence[KVPart]) -> tuple[bool, tuple[int, int] | None]:
    """(is_causal, local_window_size) of jax's call for the one part, or Unsupported."""
    if len(parts) != 1:
        raise Unsupported(
            f"cudnn takes one key/value part, not {len(parts)}: merged attention would combine "
            "calls by their log-sum-exp, which jax's cuDNN call returns without a gradient")
    k, _, mask = parts[0]
    if mask.segments_only:
        return False, None
    if k.shape[1] != q.shape[1] or not mask.contiguous:
        raise Unsupported("a causal or windowed part whose keys are not the queries' own "
                          "contiguous sequence cannot be masked by index")
    if mask.window is None:
        return True, None
    left, right = mask.window
    if right > 0 and not mask.causal:
        raise Unsupported(f"cuDNN takes a left window only, not the two-sided window "
                          f"{mask.window}")
    return True, (left, 0)  # causal, or a window ending at the query: causal either way


def check_device(q: jax.Array, k: jax.Array) -> None:
    """Unsupported for what cuDNN's flash attention cannot take on this GPU."""
    if q.dtype not in DTYPES or k.dtype != q.dtype:
        raise Unsupported(f"cuDNN attention takes bfloat16 or float16, not q {q.dtype} / "
                          f"k {k.dtype}")
    head_dim = q.shape[-1]
    capability = getattr(jax.devices()[0], "compute_capability", None)
    hopper = capability is not None and tuple(map(int, capability.split("."))) >= (9, 0)
    limit = MAX_HEAD_DIM[hopper]
    if head_dim % HEAD_DIM_MULTIPLE or head_dim > limit:
        raise Unsupported(f"cuDNN attention takes head_dim a multiple of {HEAD_DIM_MULTIPLE} "
                          f"up to {limit} on this GPU, not {head_dim}")


def prefix_lengths(mask: MaskSpec, index_masked: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(query lengths [B], key lengths [B], exact): whether every row is one segment from index
    0 followed by padding, on both sides with the same segment id, so that lengths express the
    mask exactly; `index_masked` (causal or windowed) also needs positions = index + one per-row
    constant on both sides and as many real keys as real queries (a sequence attending to itself:
    no question of how cuDNN aligns a causal mask between different lengths). Rows of padding
    queries only are never read, so they pass."""
    def runs(segments):
        real = segments != 0
        length = real.sum(axis=1, dtype=jnp.int32)
        first = segments[:, :1]
        prefix = jnp.arange(segments.shape[1])[None, :] < length[:, None]
        return length, first[:, 0], jnp.all(segments == jnp.where(prefix, first, 0), axis=1)

    q_len, q_id, q_ok = runs(mask.q_segments)
    kv_len, kv_id, kv_ok = runs(mask.kv_segments)
    rows = q_ok & kv_ok & (kv_len > 0) & (kv_id == q_id)
    if index_masked:
        def offset_ok(positions, segments, offset):
            shift = positions - jnp.arange(positions.shape[1])[None, :]
            return jnp.all((shift == offset[:, None]) | (segments == 0), axis=1)

        offset = mask.q_positions[:, 0]
        rows &= (offset_ok(mask.q_positions, mask.q_segments, offset)
                 & offset_ok(mask.kv_positions, mask.kv_segments, offset) & (q_len == kv_len))
    return q_len, kv_len, jnp.all(rows | (q_len == 0))


def library_attention(q, k, v, q_len, kv_len, *, scale: float, causal: bool,
                      window: tuple[int, int] | None, implementation: str) -> jax.Array:
    """jax.nn.dot_product_attention on rows of `q_len` real queries and `kv_len` real keys;
    jax's own "cannot take this" errors become Unsupported (they are raised while tracing)."""
    try:
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=causal, query_seq_lengths=q_len,
            key_value_seq_lengths=kv_len, local_window_size=window,
            implementation=implementation)
    except (NotImplementedError, RuntimeError) as why:  # shapes/hardware; cuDNN not found
        raise Unsupported(f"jax's cuDNN attention refused: {why}") from None


def _attend_shard(q, parts, *, scale, causal, window, implementation) -> jax.Array:
    (k, v, mask), = parts
    q_len, kv_len, _ = prefix_lengths(mask, causal or window is not None)
    return library_attention(q, k, v, q_len, kv_len, scale=scale, causal=causal, window=window,
                             implementation=implementation)
