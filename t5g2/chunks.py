"""The sequence axis cut into fixed-size blocks: chunks for memory-bounded loops (lax.map) and
the query blocks and key bands of blocked attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_blocks(x: jax.Array, block: int, blocks: int | None = None, left: int = 0) -> jax.Array:
    """[B, T, ...] -> [B, blocks, block, ...]: `left` zeros, x's T entries, then zeros up to
    blocks * block (by default the fewest blocks that hold them all). Zeros are segment id 0 and
    loss weight 0, so padded positions are never seen nor counted."""
    if blocks is None:
        blocks = -(-(left + x.shape[1]) // block)
    x = jnp.pad(x, [(0, 0), (left, blocks * block - left - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(x.shape[0], blocks, block, *x.shape[2:])


def from_blocks(x: jax.Array, length: int) -> jax.Array:
    """Inverse of `to_blocks` without left padding: [B, blocks, block, ...] -> [B, length, ...]."""
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def split_sequence(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [ceil(T / chunk), B, chunk, ...], zero-padded at the end: the chunk axis
    leads, as lax.map walks it."""
    return to_blocks(x, chunk).swapaxes(0, 1)


def merge_sequence(x: jax.Array, length: int) -> jax.Array:
    """Inverse of `split_sequence`: [chunks, B, chunk, ...] -> [B, length, ...]."""
    return from_blocks(x.swapaxes(0, 1), length)
