"""Packed rows for attention tests: segment ids and positions as the packer writes them."""

import jax.numpy as jnp
import numpy as np


def packed_rows(rng, batch, length, segments, gaps=False):
    """Segment ids 1..segments in contiguous runs with 1-5 trailing padding tokens; positions
    restart at 0 per segment, advancing by 1 (or by 1-3 with gaps)."""
    seg = np.zeros((batch, length), np.int32)
    pos = np.zeros((batch, length), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(2, length - 8), segments - 1, replace=False))
        bounds = [0, *cuts, length - rng.integers(1, 6)]
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            steps = rng.integers(1, 4, b - a) if gaps else np.ones(b - a, np.int32)
            seg[row, a:b], pos[row, a:b] = s + 1, np.cumsum(steps) - steps[0]
    return jnp.asarray(pos), jnp.asarray(seg)
