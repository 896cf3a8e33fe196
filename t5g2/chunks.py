"""Splitting the sequence axis into fixed-size chunks for memory-bounded loops (lax.map)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_sequence(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [ceil(T / chunk), B, chunk, ...], zero-padded at the end (so padded
    positions carry segment id / loss weight 0)."""
    chunks = -(-x.shape[1] // chunk)
    x = jnp.pad(x, [(0, 0), (0, chunks * chunk - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(x.shape[0], chunks, chunk, *x.shape[2:]).swapaxes(0, 1)


def merge_sequence(x: jax.Array, length: int) -> jax.Array:
    """Inverse of `split_sequence`: [chunks, B, chunk, ...] -> [B, length, ...]."""
    x = x.swapaxes(0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]
