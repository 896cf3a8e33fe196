"""Pallas splash attention (TPU) for t5g2's masks: encoder and decoder self-attention, local or
global, merged attention and cross attention, forward and backward.

Splash takes one key sequence, one static mask over [queries, keys] given by indices, and segment
ids; t5g2's parts map onto that as follows:

* The key/value parts are concatenated along the sequence, each padded to a multiple of the
  block size with segment 0, and their key segment ids with them. Merged attention is then one
  softmax over [decoder keys | encoder keys], as the reference computes it.
* The static mask is `IndexMask`: the first part's causality and window, by index, over its own
  columns, and every column of the later parts visible. It is computed inside the kernel from
  iotas (no [T, S] array exists anywhere) and lets splash skip the key blocks it hides.
* Segment ids do the rest: padding, packing, and which encoder keys a decoder query sees.

Indices stand in for positions only under `MaskSpec.contiguous` (inside a segment, positions
advance by one per index), so a causal or windowed part must be contiguous and must be the
queries' own sequence; everything else raises `Unsupported`, and dispatch falls back to `xla`.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from t5g2.model.kernels import Unsupported
from t5g2.model.kernels.sharded import over_batch_and_heads
from t5g2.model.masks import KVPart, MaskSpec

NAME = "splash"
BACKENDS = ("tpu",)

LANES = 128  # splash's sequence blocks and head_dim are multiples of the TPU's 128 lanes
BLOCKS = (512, 256, 128)  # sequence block sizes tried, largest first


class IndexMask(mask_lib._ComputableMask):
    """Causal and/or windowed attention by index over the first `own` key columns (the queries'
    own sequence); every column from `own` on (the parts after it) is visible.

    The window is (left, right) as in `MaskSpec`: keys with -left <= key - query <= right.
    Splash's public masks cannot say "every column from `own` on" without a dense array; a
    `_ComputableMask` subclass is what splash evaluates inside the kernel instead of loading.
    """

    def __init__(self, shape: tuple[int, int], own: int, causal: bool,
                 window: tuple[int, int] | None):
        if not causal and window is None:
            raise ValueError("IndexMask needs causality or a window; use FullMask otherwise")
        self.own, self.causal, self.window = own, causal, window
        super().__init__(shape, self.visible)

    def visible(self, q, kv):
        """The mask at query indices q and key indices kv (broadcastable numpy arrays while
        splash plans its blocks, int32 tiles inside the kernel)."""
        conditions = []
        if self.causal:
            conditions.append(kv <= q)
        if self.window is not None:
            left, right = self.window
            conditions += [kv >= q - left, kv <= q + right]
        mask = functools.reduce(lambda a, b: a & b, conditions)
        return mask | (kv >= self.own) if self.own < self.shape[1] else mask

    def _key(self):
        return (self.shape, self.own, self.causal, self.window)

    def __eq__(self, other: object):
        return type(other) is type(self) and other._key() == self._key()

    def __hash__(self):
        return hash((type(self),) + self._key())


def attend(q: jax.Array, parts: Sequence[KVPart], scale: float, *,
           interpret: bool = False) -> jax.Array:
    """Attention of q [B,T,N,H] over the concatenated parts, one softmax, with splash.

    Raises `Unsupported` (while tracing) for parts splash cannot express."""
    check(q, parts)
    local = functools.partial(_attend_shard, scale=scale, interpret=interpret)
    return over_batch_and_heads(local, q, parts)


def check(q: jax.Array, parts: Sequence[KVPart]) -> None:
    """Unsupported unless the parts are [self part (maybe causal/windowed), optionally one
    segments-only part], or one segments-only part, with a head_dim splash takes."""
    if len(parts) not in (1, 2):
        raise Unsupported(f"splash takes one or two key/value parts, not {len(parts)}")
    head_dim = q.shape[-1]
    if head_dim % LANES:
        raise Unsupported(f"splash needs head_dim a multiple of {LANES}, not {head_dim}")
    (k, _, first), *rest = parts
    if not first.segments_only:
        if k.shape[1] != q.shape[1]:
            raise Unsupported("a causal or windowed part whose keys are not the queries' own "
                              "sequence")
        if not first.contiguous:
            raise Unsupported("a causal or windowed part whose positions are not contiguous "
                              "(e.g. a KV cache): splash masks by index")
    if any(not m.segments_only for _, _, m in rest):
        raise Unsupported("a causal or windowed part after the first")


def _attend_shard(q: jax.Array, parts: Sequence[KVPart], *, scale: float,
                  interpret: bool) -> jax.Array:
    """`attend` on one device's batch rows and heads."""
    t = q.shape[1]
    t_pad = _round_up(t, LANES)
    lengths = [_round_up(k.shape[1], LANES) for k, _, _ in parts]
    masks = [m for _, _, m in parts]
    block_q = _block(t_pad)
    block_kv = _block(math.gcd(*lengths))
    kernel = _kernel(q.shape[2], _static_mask(masks[0], t_pad, lengths), block_q, block_kv,
                     interpret)

    q = (q.astype(jnp.float32) * scale).astype(q.dtype)  # splash does not scale
    q = _pad(q, t_pad).transpose(0, 2, 1, 3)  # [B, N, T, H]
    k, v = (jnp.concatenate([_pad(p[i], n) for p, n in zip(parts, lengths)], axis=1)
            .transpose(0, 2, 1, 3) for i in (0, 1))  # [B, K, S, H]
    segments = splash.SegmentIds(
        q=_pad(masks[0].q_segments, t_pad),
        kv=jnp.concatenate([_pad(m.kv_segments, n) for m, n in zip(masks, lengths)], axis=1))
    out = jax.vmap(kernel)(q, k, v, segments)
    return out.transpose(0, 2, 1, 3)[:, :t]


def _static_mask(first: MaskSpec, t_pad: int, lengths: Sequence[int]) -> mask_lib.Mask:
    """The index mask over [padded queries, all padded keys]."""
    shape = (t_pad, sum(lengths))
    if first.segments_only:
        return mask_lib.FullMask(shape)
    return IndexMask(shape, own=lengths[0], causal=first.causal, window=first.window)


def _kernel(heads: int, mask: mask_lib.Mask, block_q: int, block_kv: int, interpret: bool):
    """The splash kernel for one mask on every head (query heads n see kv head n // (N // K))."""
    blocks = splash.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        block_q_dq=block_q, block_kv_dq=block_kv)
    return splash.make_splash_mha(mask_lib.MultiHeadMask([mask] * heads), block_sizes=blocks,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def _block(length: int) -> int:
    """The largest block size that divides `length` (a multiple of LANES)."""
    return next(b for b in BLOCKS if length % b == 0)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad(x: jax.Array, length: int) -> jax.Array:
    """x [B, L, ...] zero-padded (segment 0 for ids) along axis 1 to `length`."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad)
