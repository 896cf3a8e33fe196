"""Attention masks described, not materialised: query/key positions and segment ids plus static
causal/window flags. Every attention kernel reads the same description, so a fused kernel can
replace the XLA core without touching the layers. Segment id 0 is padding; a query only sees keys
of its own segment.
"""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class MaskSpec:
    """Which keys each query may see: same non-zero segment, plus optional causality and window.

    The window is in positions relative to the query: keys with -left <= k_pos - q_pos <= right.
    `contiguous`: the keys are the queries' own sequence, and inside each segment positions
    advance by exactly one per index (the packing contract of training batches). Kernels may then
    build causal and window masks from indices, band the keys or skip key blocks; without it
    (e.g. a generation cache, whose slots are not in index order) they must read positions.
    """

    q_positions: jax.Array  # [batch, q_len]
    q_segments: jax.Array  # [batch, q_len]
    kv_positions: jax.Array  # [batch, kv_len]
    kv_segments: jax.Array  # [batch, kv_len]
    causal: bool = struct.field(pytree_node=False, default=False)
    window: tuple[int, int] | None = struct.field(pytree_node=False, default=None)
    contiguous: bool = struct.field(pytree_node=False, default=False)

    @property
    def segments_only(self) -> bool:
        """Visibility depends on segment ids alone (no causality, no window)."""
        return not self.causal and self.window is None

    def dense(self) -> jax.Array:
        """The boolean mask [batch, q_len, kv_len]."""
        return self.visible(self.q_positions[:, :, None], self.q_segments[:, :, None],
                            self.kv_positions[:, None, :], self.kv_segments[:, None, :])

    def visible(self, q_pos, q_seg, kv_pos, kv_seg) -> jax.Array:
        """The mask for broadcastable query and key position/segment arrays."""
        return visible(q_pos, q_seg, kv_pos, kv_seg, causal=self.causal, window=self.window)


def visible(q_pos, q_seg, kv_pos, kv_seg, *, causal: bool, window: tuple[int, int] | None):
    """Whether each query sees each key (broadcastable arrays): `MaskSpec`'s rule, for kernels
    that carry the static flags apart from the arrays."""
    mask = (q_seg == kv_seg) & (kv_seg != 0)
    offset = kv_pos - q_pos
    if causal:
        mask &= offset <= 0
    if window is not None:
        left, right = window
        mask &= (offset >= -left) & (offset <= right)
    return mask


KVPart = tuple[jax.Array, jax.Array, MaskSpec]  # keys [B,S,K,H], values [B,S,K,H], their mask


def encoder_window(window: int) -> tuple[int, int]:
    """The reference's two-sided encoder window: W keys, (W+1)//2-1 to the left, W//2 right."""
    return ((window + 1) // 2 - 1, window // 2)


def decoder_window(window: int) -> tuple[int, int]:
    """Causal sliding window: W keys including the query itself."""
    return (window - 1, 0)
