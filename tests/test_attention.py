"""The XLA attention core against a naive dense softmax: banded (sliding-window) blocks and query
groups must give the same outputs and gradients on packed rows, with CPU and accelerator tiles;
the backward keeps nothing score-sized."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from t5g2.chunks import from_blocks, merge_sequence, split_sequence, to_blocks
from t5g2.configlib import ConfigError
from t5g2.model import kernels
from t5g2.model.kernels import xla as attention
from t5g2.model.attention import (Kernel, MaskSpec, decoder_window, dot_product_attention,
                                  encoder_window)
from tests.reference import tiny_config
from tests.attention_rows import packed_rows


def _naive(q, parts, scale):
    k = jnp.concatenate([p[0] for p in parts], axis=1)
    v = jnp.concatenate([p[1] for p in parts], axis=1)
    mask = jnp.concatenate([p[2].dense() for p in parts], axis=-1)  # [B, T, S]
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    scores = jnp.where(mask[:, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", jnp.nan_to_num(probs), v)


CASES = {
    "encoder_local": dict(window=encoder_window(9), causal=False, cross=False),
    "decoder_local_merged": dict(window=decoder_window(9), causal=True, cross=True),
    "decoder_global_merged": dict(window=None, causal=True, cross=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
# tile 16 stands for the accelerators' 128 at 75 positions
@pytest.mark.parametrize("tile, query_chunk", [(8, 0), (8, 24), (16, 24)])
def test_blocked_attention_equals_dense_softmax(case, query_chunk, tile, monkeypatch):
    monkeypatch.setattr(attention, "MIN_BAND_BLOCK", 10)  # several bands in 75 positions
    monkeypatch.setattr(attention, "_tile", lambda: tile)
    spec = CASES[case]
    rng = np.random.default_rng(0)
    b, t, s, n, kh, h = 2, 75, 31, 4, 2, 8
    q, k, v, ck, cv = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in
                       [(b, t, n, h), (b, t, kh, h), (b, t, kh, h), (b, s, kh, h), (b, s, kh, h)])
    pos, seg = packed_rows(rng, b, t, 3)
    parts = [(k, v, MaskSpec(pos, seg, pos, seg, causal=spec["causal"], window=spec["window"],
                                  contiguous=True))]
    if spec["cross"]:
        enc_pos, enc_seg = packed_rows(rng, b, s, 3)
        parts.append((ck, cv, MaskSpec(pos, seg, enc_pos, enc_seg)))

    def loss(fn, q, k, v):
        p = [(k, v, parts[0][2])] + parts[1:]
        out = fn(q, p)
        return jnp.sum(jnp.where(seg[..., None, None] > 0, out, 0) * jnp.cos(out)), out

    def blocked(q, p):
        return dot_product_attention(q, p, 0.3, Kernel(query_chunk=query_chunk))

    def naive(q, p):
        return _naive(q, p, 0.3)

    (_, ours), g_ours = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(blocked, q, k, v)
    (_, ref), g_ref = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(naive, q, k, v)
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(ref)[real], atol=2e-6)
    for a, r in zip(g_ours, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5)
    banded = spec["window"] is not None
    block = attention._query_block(t, parts, query_chunk, tile)
    assert (block < t) == (banded or query_chunk > 0)
    assert block % tile == 0 or block == t


def test_band_covers_exactly_the_window_reach():
    x = jnp.arange(1, 24)[None, :]  # 23 positions, values = index + 1, 0 = outside
    bands = attention._band(x, block=5, blocks=5, left=3, span=16)  # reach 5 + 3 + 4, padded
    assert bands.shape == (1, 5, 16)
    for c in range(5):
        want = [i + 1 if 0 <= i < 23 else 0 for i in range(5 * c - 3, 5 * c + 13)]
        assert bands[0, c].tolist() == want


def test_blocks_pad_with_zeros_and_invert():
    x = np.arange(1, 12)[None, :, None] * np.array([1, -1])  # [1, 11, 2], no zeros inside
    blocks = to_blocks(jnp.asarray(x), block=4, left=2)  # 2 zeros + 11 entries -> 4 blocks of 4
    want = np.concatenate([np.zeros((1, 2, 2)), x, np.zeros((1, 3, 2))], axis=1).reshape(1, 4, 4, 2)
    np.testing.assert_array_equal(np.asarray(blocks), want)
    assert to_blocks(jnp.asarray(x), block=4, blocks=6).shape == (1, 6, 4, 2)
    np.testing.assert_array_equal(np.asarray(from_blocks(to_blocks(jnp.asarray(x), 4), 11)), x)
    chunks = split_sequence(jnp.asarray(x), 3)  # chunk axis first, as lax.map walks it
    assert chunks.shape == (4, 1, 3, 2)
    np.testing.assert_array_equal(np.asarray(chunks[1, 0, :, 0]), [4, 5, 6])
    np.testing.assert_array_equal(np.asarray(chunks[3, 0, :, 0]), [10, 11, 0])
    np.testing.assert_array_equal(np.asarray(merge_sequence(chunks, 11)), x)


def test_bfloat16_gradients_stay_within_bfloat16_rounding(monkeypatch):
    """The hand-written backward in bf16 against the float32 naive softmax's gradients."""
    monkeypatch.setattr(attention, "MIN_BAND_BLOCK", 10)
    rng = np.random.default_rng(1)
    b, t, s, n, kh, h = 2, 40, 17, 4, 2, 16
    q, k, v, ck, cv = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in
                       [(b, t, n, h), (b, t, kh, h), (b, t, kh, h), (b, s, kh, h), (b, s, kh, h)])
    pos, seg = packed_rows(rng, b, t, 2)
    enc_pos, enc_seg = packed_rows(rng, b, s, 2)
    self_mask = MaskSpec(pos, seg, pos, seg, causal=True, window=decoder_window(9),
                         contiguous=True)
    cross_mask = MaskSpec(pos, seg, enc_pos, enc_seg)
    weights = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) * (seg > 0)[..., None, None]

    def loss(fn, *args):
        q, k, v, ck, cv = args
        return jnp.sum(fn(q, [(k, v, self_mask), (ck, cv, cross_mask)]).astype(jnp.float32)
                       * weights)

    args = (q, k, v, ck, cv)
    ref = jax.grad(lambda *a: loss(lambda q, p: _naive(q, p, 0.25), *a), argnums=range(5))(*args)
    ours = jax.grad(lambda *a: loss(lambda q, p: dot_product_attention(q, p, 0.25), *a),
                    argnums=range(5))(*(x.astype(jnp.bfloat16) for x in args))
    for a, r in zip(ours, ref):
        a, r = np.asarray(a.astype(jnp.float32)), np.asarray(r)
        assert np.abs(a - r).max() <= 0.05 * np.abs(r).max(), np.abs(a - r).max() / np.abs(r).max()


def _causal_case(rng, t=96, s=40):
    b, n, kh, h = 1, 2, 1, 8
    q, k, v, ck, cv = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in
                       [(b, t, n, h), (b, t, kh, h), (b, t, kh, h), (b, s, kh, h), (b, s, kh, h)])
    pos, seg = packed_rows(rng, b, t, 2)
    enc_pos, enc_seg = packed_rows(rng, b, s, 2)
    return q, k, v, [(ck, cv, MaskSpec(pos, seg, enc_pos, enc_seg))], pos, seg


@pytest.mark.parametrize("query_chunk", [0, 32])
def test_backward_keeps_no_score_sized_residual(query_chunk, capsys):
    """What the forward saves for the backward is q, k, v, outputs, row statistics and the
    position/segment ids: nothing with a [queries x keys] extent."""
    q, k, v, cross, pos, seg = _causal_case(np.random.default_rng(3))
    parts = [(k, v, MaskSpec(pos, seg, pos, seg, causal=True, window=decoder_window(9),
                             contiguous=True))] + cross
    print_saved_residuals(lambda q, k, v: attention.attend(q, [(k, v, parts[0][2])] + cross, 0.5,
                                                           query_chunk=query_chunk), q, k, v)
    saved = capsys.readouterr().out
    shapes = re.findall(r"^\w+\[([\d,]*)\]", saved, flags=re.M)
    sizes = [int(np.prod([int(d) for d in shape.split(",") if d])) for shape in shapes]
    assert shapes and max(sizes) < 96 * 40, saved


def test_a_cache_part_as_long_as_the_queries_is_read_by_position():
    """A ring-buffer cache (slot = position mod length, so slots are not in index order) of the
    queries' length, windowed: not banded, not cut into causal groups, equal to the naive mask."""
    rng = np.random.default_rng(4)
    t, n, kh, h = 48, 2, 1, 8
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in [(1, t, n, h), (1, t, kh, h), (1, t, kh, h)])
    q_pos = jnp.arange(100, 100 + t)[None]  # queries after 100 cached positions
    kv_pos = jnp.asarray([[p + t * ((99 - p) // t) for p in range(t)]])  # last t of 0..99 by slot
    ones = jnp.ones((1, t), jnp.int32)
    parts = [(k, v, MaskSpec(q_pos, ones, kv_pos, ones, causal=True, window=decoder_window(60)))]
    ours = attention.attend(q, parts, 0.5, query_chunk=16)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(_naive(q, parts, 0.5)), atol=2e-6)


def test_a_kernel_asked_for_on_the_wrong_backend_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.attention_impl='splash' runs on tpu, not on "
                                          r"this gpu backend; use one of: auto, xla, cudnn, "
                                          r"gpu_flash"):
        kernels.check_backend("splash", "gpu")
    with pytest.raises(ConfigError, match=r"model.attention_impl='flash' is unknown; valid: auto"):
        tiny_config(attention_impl="flash")
    assert kernels.describe("auto", "tpu") == ("attention: auto on tpu: splash, then xla where a "
                                               "kernel cannot express a mask")
    assert kernels.describe("auto", "cpu") == "attention: xla on cpu"
    assert kernels.candidates("auto", "gpu") == ("cudnn", "gpu_flash")
