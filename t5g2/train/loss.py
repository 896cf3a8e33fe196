"""Token-level cross-entropy on decoder targets, weighted (padding and packed gaps get 0)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                  z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(weighted sum of per-token losses, sum of weights); logits are upcast to float32.

    z_loss adds z_loss * log(Z)^2 per token, the PaLM/T5X stabiliser that keeps log Z near 0.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    per_token = log_z - target_logit + z_loss * jnp.square(log_z)
    weights = weights.astype(jnp.float32)
    return jnp.sum(per_token * weights), jnp.sum(weights)
