"""Rotary position embeddings (half-split layout), with linear position interpolation.

Local layers use theta 1e4; global layers use theta 1e6 and, in the released configs, a linear
factor of 8 (positions / 8), which is how 16K-token training reaches 128K-token inference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_tables(positions: jax.Array, head_dim: int, theta: float,
                scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [..., head_dim] in float32 for integer positions [...]."""
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (theta**exponent) / scale
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [batch, length, heads, head_dim] by tables [batch, length, head_dim].

    The tables are cast to x's dtype first and the rotation is done in that dtype, as the
    reference does.
    """
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin
