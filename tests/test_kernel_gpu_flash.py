"""gpu_flash (t5g2's Pallas flash kernel, run in interpret mode on CPU) against the xla reference:
outputs and q/k/v gradients at non-padding queries for every mask T5Gemma 2 uses, packed rows,
lengths that are not tile multiples, GQA, and positions that do not follow indices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5g2 import sharding
from t5g2.model.kernels import Kernel, Unsupported, dot_product_attention, gpu_flash, xla
from t5g2.model.masks import MaskSpec, decoder_window, encoder_window
from tests.attention_rows import packed_rows

TILE = 16  # small tiles: several query and key blocks in short sequences
SCALE = 0.3


def _normal(rng, *shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _grads(attend, q, parts, q_seg):
    """(out, grads of q and of every part's k, v) of a loss read at non-padding queries only."""
    def loss(q, kvs):
        out = attend(q, [(k, v, m) for (k, v), (_, _, m) in zip(kvs, parts)])
        real = jnp.where(q_seg[..., None, None] > 0, out, 0)
        return jnp.sum(real * jnp.cos(out)), out

    kvs = [(k, v) for k, v, _ in parts]
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(q, kvs)
    return out, grads


def _assert_matches_reference(q, parts, q_seg, atol=3e-5, **tiles):
    tiles = {"block_q": TILE, "block_k": TILE, **tiles}
    out, grads = _grads(lambda q, p: gpu_flash.attend(q, p, SCALE, interpret=True, **tiles),
                        q, parts, q_seg)
    ref, ref_grads = _grads(lambda q, p: xla.attend(q, p, SCALE), q, parts, q_seg)
    real = np.asarray(q_seg) > 0
    assert out.dtype == q.dtype
    assert np.isfinite(np.asarray(out)).all()  # padding rows too: never NaN
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=atol)
    for ours, theirs in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=atol)


# (causal, window, kv heads, merged with an encoder part); N = 4 query heads everywhere.
CASES = {
    "encoder_local": (False, encoder_window(20), 2, False),
    "encoder_global": (False, None, 1, False),
    "decoder_local": (True, decoder_window(24), 1, False),
    "decoder_global": (True, None, 2, False),
    "merged_global": (True, None, 2, True),
    "merged_local": (True, decoder_window(24), 1, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_flash_equals_xla_reference(case):
    """Packed rows (3 segments + padding), T=75 and S=53: neither a tile multiple."""
    causal, window, kv_heads, merged = CASES[case]
    rng = np.random.default_rng(sorted(CASES).index(case))
    b, t, s, n, h = 2, 75, 53, 4, 32
    q, k, v = _normal(rng, b, t, n, h), _normal(rng, b, t, kv_heads, h), _normal(rng, b, t,
                                                                                 kv_heads, h)
    pos, seg = packed_rows(rng, b, t, 3)
    parts = [(k, v, MaskSpec(pos, seg, pos, seg, causal=causal, window=window, contiguous=True))]
    if merged:  # encoder keys: the same documents (segment ids), their own padding
        enc_pos, enc_seg = packed_rows(rng, b, s, 3)
        parts.append((_normal(rng, b, s, kv_heads, h), _normal(rng, b, s, kv_heads, h),
                      MaskSpec(pos, seg, enc_pos, enc_seg)))
    _assert_matches_reference(q, parts, seg)


def test_positions_not_following_indices_are_masked_exactly():
    """contiguous=False: positions with gaps (a window of 12 positions covers fewer indices),
    so the mask must come from positions, not indices."""
    rng = np.random.default_rng(7)
    b, t, n, h = 2, 70, 4, 16
    pos, seg = packed_rows(rng, b, t, 2, gaps=True)
    q, k, v = _normal(rng, b, t, n, h), _normal(rng, b, t, 2, h), _normal(rng, b, t, 2, h)
    for causal, window in [(True, decoder_window(12)), (False, encoder_window(12))]:
        mask = MaskSpec(pos, seg, pos, seg, causal=causal, window=window)
        _assert_matches_reference(q, [(k, v, mask)], seg)


def test_generation_cache_part_merged_with_new_tokens():
    """A ring-buffer cache (slot = position mod 32, some slots empty) then the 5 new tokens'
    own keys, causal local, under one softmax: the cache's keys are in no index order."""
    rng = np.random.default_rng(3)
    b, t, slots, n, h, window = 2, 5, 32, 4, 16, decoder_window(20)
    start = np.array([40, 9])  # row 0 wrapped around the ring, row 1 did not
    q_pos = jnp.asarray(start[:, None] + np.arange(t), jnp.int32)
    q_seg = jnp.ones((b, t), jnp.int32)
    cache_pos = np.zeros((b, slots), np.int32)
    cache_seg = np.zeros((b, slots), np.int32)
    for row, first in enumerate(start):
        written = np.arange(max(0, first - slots), first)
        cache_pos[row, written % slots], cache_seg[row, written % slots] = written, 1
    cache = MaskSpec(q_pos, q_seg, jnp.asarray(cache_pos), jnp.asarray(cache_seg),
                     causal=True, window=window)
    own = MaskSpec(q_pos, q_seg, q_pos, q_seg, causal=True, window=window, contiguous=True)
    q = _normal(rng, b, t, n, h)
    parts = [(_normal(rng, b, slots, 1, h), _normal(rng, b, slots, 1, h), cache),
             (_normal(rng, b, t, 1, h), _normal(rng, b, t, 1, h), own)]
    _assert_matches_reference(q, parts, q_seg)


def test_default_tiles_head_dim_256_and_cross_only():
    """The production tiles (64) and head_dim (256) on a classic cross-attention part."""
    rng = np.random.default_rng(5)
    b, t, s, n, h = 1, 40, 70, 2, 256
    pos, seg = packed_rows(rng, b, t, 2)
    enc_pos, enc_seg = packed_rows(rng, b, s, 2)
    parts = [(_normal(rng, b, s, 1, h), _normal(rng, b, s, 1, h),
              MaskSpec(pos, seg, enc_pos, enc_seg))]
    _assert_matches_reference(_normal(rng, b, t, n, h), parts, seg, atol=5e-5,
                              block_q=gpu_flash.BLOCK_Q, block_k=gpu_flash.BLOCK_K)


def test_bfloat16_inputs_accumulate_in_float32():
    """bf16 q/k/v: bf16 output close to the float32 reference on the same (rounded) inputs,
    and every output and gradient finite, padding rows included."""
    rng = np.random.default_rng(11)
    b, t, n, h = 2, 48, 4, 32
    pos, seg = packed_rows(rng, b, t, 2)
    q, k, v = (_normal(rng, b, t, heads, h).astype(jnp.bfloat16) for heads in (n, 2, 2))
    mask = MaskSpec(pos, seg, pos, seg, causal=True, window=decoder_window(16), contiguous=True)
    attend = lambda q, p: gpu_flash.attend(q, p, SCALE, interpret=True, block_q=TILE,  # noqa
                                           block_k=TILE)
    out, grads = _grads(attend, q, [(k, v, mask)], seg)
    assert out.dtype == jnp.bfloat16
    assert all(bool(jnp.isfinite(x.astype(jnp.float32)).all())
               for x in [out, *jax.tree.leaves(grads)])
    as_f32 = [(k.astype(jnp.float32), v.astype(jnp.float32), mask)]
    ref = xla.attend(q.astype(jnp.float32), as_f32, SCALE)
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32))[real],
                               np.asarray(ref)[real], atol=2e-2)


def test_sharded_over_batch_and_heads_equals_reference():
    """Under a data x tensor mesh each device runs the kernel (forward and backward) on its
    rows and heads."""
    rng = np.random.default_rng(13)
    b, t, n, h = 2, 40, 4, 16
    pos, seg = packed_rows(rng, b, t, 2)
    q, k, v = _normal(rng, b, t, n, h), _normal(rng, b, t, 2, h), _normal(rng, b, t, 2, h)
    parts = [(k, v, MaskSpec(pos, seg, pos, seg, causal=True, contiguous=True))]
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
    with sharding.use_mesh(mesh):
        _assert_matches_reference(q, parts, seg)
        traced = jax.make_jaxpr(lambda q: gpu_flash.attend(q, parts, SCALE, interpret=True))(q)
    assert "shard_map" in str(traced)


@pytest.mark.parametrize("causal,window", [(True, None), (True, (5, 0)), (False, (9, 10)),
                                           (False, (0, 17)), (True, (40, 3))])
@pytest.mark.parametrize("block_q,block_k", [(16, 16), (16, 32), (32, 16)])
def test_skipped_blocks_hold_no_band_pair_and_both_sides_agree(causal, window, block_q, block_k):
    """Block skipping on a contiguous part: the key blocks a query block visits contain every
    index pair of the causal/window band, the dk/dv side visits exactly the same tile pairs,
    and tiles wholly outside the band are skipped."""
    part = gpu_flash._Part(MaskSpec(None, None, None, None, causal=causal, window=window),
                           banded=True)
    length = 96
    nq, nk = length // block_q, length // block_k
    left, right = window or (length, 0)
    right = min(right, 0) if causal else right
    band = {(i, j) for i in range(length) for j in range(length) if -left <= j - i <= right}
    needed = {(i // block_q, j // block_k) for i, j in band}
    by_query = {(i, j) for i in range(nq)
                for j in range(*map(int, gpu_flash._key_blocks(part, i, block_q, block_k, nk)))}
    by_key = {(i, j) for j in range(nk)
              for i in range(*map(int, gpu_flash._query_blocks(part, j, block_q, block_k, nq)))}
    assert by_query == by_key == needed
    assert len(needed) < nq * nk  # something is skipped


def test_dispatch_runs_gpu_flash_interpreted_on_cpu_and_falls_back_when_unsupported():
    """model.attention_impl=gpu_flash on CPU: the kernel in interpret mode (default tiles); a
    head_dim it does not take (512): Unsupported while tracing, so the xla core answers."""
    rng = np.random.default_rng(17)
    b, t, n = 1, 40, 4
    pos, seg = packed_rows(rng, b, t, 2)
    for h in (16, 512):
        q, k, v = (_normal(rng, b, t, heads, h) for heads in (n, 2, 2))
        parts = [(k, v, MaskSpec(pos, seg, pos, seg, causal=True, contiguous=True))]
        out = dot_product_attention(q, parts, SCALE, Kernel("gpu_flash"))
        ref = xla.attend(q, parts, SCALE)
        real = np.asarray(seg) > 0
        np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=3e-5)


@pytest.mark.parametrize("change,reason", [
    (dict(kv_heads=3), "multiple of kv heads"),
    (dict(h=512), "head_dim"),
    (dict(window=(-1, 4)), "non-negative"),
    (dict(block_q=24), "powers of two"),
])
def test_unsupported_inputs_raise_while_tracing(change, reason):
    spec = dict(kv_heads=2, h=16, window=None, block_q=TILE)
    spec.update(change)
    b, t, n = 1, 16, 4
    q = jnp.zeros((b, t, n, spec["h"]))
    k = jnp.zeros((b, t, spec["kv_heads"], spec["h"]))
    ids = jnp.ones((b, t), jnp.int32)
    parts = [(k, k, MaskSpec(ids, ids, ids, ids, window=spec["window"]))]
    with pytest.raises(Unsupported, match=reason):
        jax.eval_shape(lambda q: gpu_flash.attend(q, parts, 1.0, interpret=True,
                                                  block_q=spec["block_q"]), q)


def test_every_kernel_lowers_to_valid_triton_ir_for_cuda(monkeypatch):
    """No GPU needed: the forward, dq and per-part dk/dv kernels of a merged bf16 head_dim 256
    GQA attention lower through Pallas' Triton lowering for CUDA, and each module verifies."""
    from jax._src.pallas.triton import lowering

    modules = []
    lower = lowering.lower_jaxpr_to_triton_module

    def keep(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module)
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", keep)
    b, t, s, n, h = 1, 100, 70, 4, 256
    q, k, enc = (jnp.zeros((b, length, heads, h), jnp.bfloat16)
                 for length, heads in [(t, n), (t, 2), (s, 2)])
    pos, enc_pos = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
    own = MaskSpec(pos, pos, pos, pos, causal=True, window=decoder_window(40), contiguous=True)
    cross = MaskSpec(pos, pos, enc_pos, enc_pos)

    def loss(q, k, v, ek, ev):
        out = gpu_flash.attend(q, [(k, v, own), (ek, ev, cross)], SCALE)
        return out.astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    grad.trace(q, k, k, enc, enc).lower(lowering_platforms=("cuda",))
    names = sorted(str(m.operation.attributes["sym_name"]).strip('"') for m in modules)
    assert names == ["t5g2_flash_dkv", "t5g2_flash_dkv", "t5g2_flash_dq", "t5g2_flash_forward"]
    assert all(m.operation.verify() for m in modules)
