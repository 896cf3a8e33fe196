"""Token-level cross-entropy on decoder targets, weighted (padding and packed gaps get 0)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class LossSums(NamedTuple):
    """Sums over tokens; divide by `weight` for means (kept as sums so accumulation is exact)."""

    cross_entropy: jax.Array
    z_loss: jax.Array
    weight: jax.Array

    @property
    def total(self) -> jax.Array:
        return self.cross_entropy + self.z_loss


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                  z_loss: float = 0.0) -> LossSums:
    """Weighted sums of per-token cross-entropy and z-loss; logits are upcast to float32.

    z_loss adds z_loss * log(Z)^2 per token, the PaLM/T5X stabiliser that keeps log Z near 0.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    return LossSums(cross_entropy=jnp.sum((log_z - target_logit) * weights),
                    z_loss=jnp.sum(z_loss * jnp.square(log_z) * weights),
                    weight=jnp.sum(weights))


def chunked_cross_entropy(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array,
                          targets: jax.Array, weights: jax.Array, z_loss: float = 0.0,
                          chunk: int = 0) -> LossSums:
    """`cross_entropy(logits_fn(hidden), ...)` over chunks of `chunk` positions, each chunk's
    logits rematerialised in the backward pass: with a 262K vocabulary, logits [B, T, V] at 16K
    tokens would be 17 GB per sequence in float32; a chunk is T/chunk times smaller."""
    t = hidden.shape[1]
    if not chunk or t <= chunk:
        return cross_entropy(logits_fn(hidden), targets, weights, z_loss)
    chunks = -(-t // chunk)
    pad = chunks * chunk - t

    def to_chunks(x):  # [B, T, ...] -> [chunks, B, chunk, ...]; padding has weight 0
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(x.shape[0], chunks, chunk, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_sums(args):
        h, t_chunk, w_chunk = args
        return cross_entropy(logits_fn(h), t_chunk, w_chunk, z_loss)

    sums = jax.lax.map(chunk_sums, (to_chunks(hidden), to_chunks(targets), to_chunks(weights)))
    return LossSums(*(jnp.sum(x) for x in sums))
