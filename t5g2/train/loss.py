"""Token-level cross-entropy on decoder targets, weighted (padding and packed gaps get 0)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from t5g2.chunks import split_sequence


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
    if not chunk or hidden.shape[1] <= chunk:
        return cross_entropy(logits_fn(hidden), targets, weights, z_loss)

    @jax.checkpoint
    def chunk_sums(args):
        h, t_chunk, w_chunk = args
        return cross_entropy(logits_fn(h), t_chunk, w_chunk, z_loss)

    chunks = tuple(split_sequence(x, chunk) for x in (hidden, targets, weights))
    sums = jax.lax.map(chunk_sums, chunks)
    return LossSums(*(jnp.sum(x) for x in sums))
