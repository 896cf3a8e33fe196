"""The cuDNN kernel (t5g2.model.kernels.cudnn) against the XLA reference, on CPU: interpret mode
runs the same code with jax's XLA implementation of `jax.nn.dot_product_attention`, so the masks,
the lengths, the GQA layout and the packed-batch fallback are exercised; what the GPU alone can
check (cuDNN itself) is not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5g2.model.kernels import Kernel, Unsupported, cudnn, dot_product_attention, xla
from t5g2.model.masks import MaskSpec, decoder_window, encoder_window

SCALE = 0.3


def ids(lengths_per_row, total):
    """(segments, positions) [B, total]: row b holds segments of the given lengths, numbered
    from 1, then padding; positions restart at 0 in each segment."""
    segments = np.zeros((len(lengths_per_row), total), np.int32)
    positions = np.zeros_like(segments)
    for b, lengths in enumerate(lengths_per_row):
        start = 0
        for s, n in enumerate(lengths, 1):
            segments[b, start:start + n] = s
            positions[b, start:start + n] = np.arange(n)
            start += n
    return jnp.asarray(segments), jnp.asarray(positions)


def inputs(q_rows, kv_rows=None, t=40, s=None, heads=4, kv_heads=2, head_dim=16, causal=False,
           window=None, seed=0):
    """q [B,T,N,H] and one part (k, v, MaskSpec) from per-row segment lengths."""
    kv_rows = q_rows if kv_rows is None else kv_rows
    s = t if s is None else s
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    b = len(q_rows)
    q = jax.random.normal(kq, (b, t, heads, head_dim), jnp.float32)
    k = jax.random.normal(kk, (b, s, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(kv, (b, s, kv_heads, head_dim), jnp.float32)
    q_seg, q_pos = ids(q_rows, t)
    kv_seg, kv_pos = ids(kv_rows, s)
    mask = MaskSpec(q_pos, q_seg, kv_pos, kv_seg, causal=causal, window=window,
                    contiguous=s == t)
    return q, (k, v, mask)


def loss_and_grads(attend, q, part):
    """Outputs and d(q, k, v) of a loss read at real queries only (padding outputs are
    unspecified)."""
    k, v, mask = part
    real = (mask.q_segments != 0)[:, :, None, None]
    cotangent = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)

    def loss(q, k, v):
        out = attend(q, [(k, v, mask)])
        return jnp.sum(jnp.where(real, out * cotangent, 0.0)), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return jnp.where(real, out, 0.0), grads


def assert_matches_reference(q, part):
    ours = loss_and_grads(lambda q, p: cudnn.attend(q, p, SCALE, interpret=True), q, part)
    ref = loss_and_grads(lambda q, p: xla.attend(q, p, SCALE), q, part)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (ours[0], *ours[1]), (ref[0], *ref[1])):
        assert np.all(np.isfinite(a)), name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


PADDED = [[40], [27], [13]]  # one segment per row, padding tails (lengths not block multiples)


@pytest.mark.parametrize("case", ["encoder_global", "decoder_global", "decoder_local"])
def test_self_attention_with_padding_matches_reference(case):
    causal, window = {"encoder_global": (False, None), "decoder_global": (True, None),
                      "decoder_local": (True, decoder_window(8))}[case]
    q, part = inputs(PADDED, causal=causal, window=window)
    assert bool(cudnn.prefix_lengths(part[2], causal)[2])  # the lengths path, not the fallback
    assert_matches_reference(q, part)


@pytest.mark.slow  # cross-only parts: the splash and gpu_flash tests, by default
def test_multi_query_and_cross_attention_over_other_keys():
    """One kv head for four query heads (the 270M's), and a cross-only part with S != T."""
    q, part = inputs([[30], [11]], [[24], [9]], t=33, s=24, kv_heads=1)
    assert_matches_reference(q, part)


def test_library_call_alone_masks_by_lengths():
    """The fused branch by itself (no fallback possible) equals the reference on padded rows:
    lengths, causality and the left window are what the MaskSpec says."""
    q, (k, v, mask) = inputs(PADDED, causal=True, window=decoder_window(5), kv_heads=1)
    q_len, kv_len, _ = cudnn.prefix_lengths(mask, True)
    ours = cudnn.library_attention(q, k, v, q_len, kv_len, scale=SCALE, causal=True,
                                   window=(4, 0), implementation="xla")
    ref = xla.attend(q, [(k, v, mask)], SCALE)
    real = (mask.q_segments != 0)[:, :, None, None]
    np.testing.assert_allclose(jnp.where(real, ours, 0), jnp.where(real, ref, 0),
                               rtol=1e-5, atol=1e-5)


def test_packed_segments_take_the_exact_fallback():
    """Several segments per row cannot be lengths: the check says so and the result is still
    the reference's (through the XLA core), gradients included."""
    packed = [[15, 20, 5], [27], [6, 6, 6]]
    for causal, window in ((False, None), (True, None), (True, decoder_window(8))):
        q, part = inputs(packed, causal=causal, window=window)
        assert not bool(cudnn.prefix_lengths(part[2], causal)[2])
        assert_matches_reference(q, part)


def test_exactness_check():
    """Which rows lengths express: one segment (any id) from index 0 then padding; positions
    shifted by a per-row constant are fine, positions that skip are not (causal parts only)."""
    q_seg, q_pos = ids([[5], [3], []], 8)
    mask = MaskSpec(q_pos, q_seg, q_pos, q_seg, causal=True, contiguous=True)
    assert bool(cudnn.prefix_lengths(mask, True)[2])
    assert cudnn.prefix_lengths(mask, True)[0].tolist() == [5, 3, 0]
    shifted = mask.replace(q_positions=q_pos + 7, kv_positions=q_pos + 7)
    assert bool(cudnn.prefix_lengths(shifted, True)[2])
    skipping = mask.replace(q_positions=q_pos * 2, kv_positions=q_pos * 2)
    assert not bool(cudnn.prefix_lengths(skipping, True)[2])
    assert bool(cudnn.prefix_lengths(skipping, False)[2])  # positions unused without causality
    relabelled = mask.replace(q_segments=q_seg * 3, kv_segments=q_seg * 3)
    assert bool(cudnn.prefix_lengths(relabelled, True)[2])
    other_id = mask.replace(kv_segments=q_seg * 2)
    assert not bool(cudnn.prefix_lengths(other_id, True)[2])
    hole = mask.replace(q_segments=q_seg.at[0, 2].set(0))
    assert not bool(cudnn.prefix_lengths(hole, True)[2])
    shorter_keys = mask.replace(kv_segments=q_seg.at[0, 4].set(0))  # 5 queries, 4 keys
    assert not bool(cudnn.prefix_lengths(shorter_keys, True)[2])
    assert bool(cudnn.prefix_lengths(shorter_keys, False)[2])  # fine without causality


def test_what_cudnn_cannot_take_is_unsupported():
    q, part = inputs(PADDED, window=encoder_window(8))  # two-sided
    with pytest.raises(Unsupported, match="left window"):
        cudnn.attend(q, [part], SCALE, interpret=True)
    q, dec = inputs(PADDED, causal=True)
    _, enc = inputs(PADDED, [[20], [24], [7]], t=40, s=24)
    with pytest.raises(Unsupported, match="log-sum-exp"):
        cudnn.attend(q, [dec, enc], SCALE, interpret=True)
    q, part = inputs(PADDED, causal=True)
    with pytest.raises(Unsupported, match="bfloat16"):  # the GPU path: no float32
        cudnn.attend(q, [part], SCALE)
    k, v, mask = part
    with pytest.raises(Unsupported, match="head_dim"):
        cudnn.attend(q[..., :12].astype(jnp.bfloat16),
                     [(k[..., :12].astype(jnp.bfloat16), v[..., :12].astype(jnp.bfloat16),
                       mask)], SCALE)
    with pytest.raises(Unsupported, match="contiguous"):
        cudnn.attend(q, [(k, v, mask.replace(contiguous=False))], SCALE, interpret=True)


def test_dispatch_falls_back_to_xla_for_merged_attention():
    """Through the registry on CPU: cudnn runs interpreted where it fits, and merged attention
    falls back to the XLA core with the same numbers."""
    q, dec = inputs(PADDED, causal=True, window=decoder_window(8))
    _, enc = inputs(PADDED, [[20], [24], [7]], t=40, s=24)
    for parts in ([dec], [dec, enc]):
        ours = dot_product_attention(q, parts, SCALE, Kernel("cudnn"))
        ref = xla.attend(q, parts, SCALE)
        real = (dec[2].q_segments != 0)[:, :, None, None]
        np.testing.assert_allclose(jnp.where(real, ours, 0), jnp.where(real, ref, 0),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # shard_map: the splash and gpu_flash mesh tests, by default
def test_sharded_over_batch_and_heads_equals_reference():
    """Under a data x tensor mesh the lengths branch runs per device on its rows and heads
    (forward and backward), and the batch check chooses it."""
    from t5g2 import sharding

    q, part = inputs([[40], [19]], causal=True, window=decoder_window(8))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
    with sharding.use_mesh(mesh):
        assert_matches_reference(q, part)
        traced = jax.make_jaxpr(lambda q: cudnn.attend(q, [part], SCALE, interpret=True))(q)
    assert "shard_map" in str(traced) and "cond" in str(traced)
