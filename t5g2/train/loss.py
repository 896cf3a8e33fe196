"""Token-level cross-entropy on decoder targets, weighted (padding and packed gaps get 0)."""

from __future__ import annotations

from typing import NamedTuple

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
