"""The splash kernel (Pallas interpret mode on CPU) against the XLA reference: outputs and the
gradients of q and of every part's k and v, on packed, padded rows whose lengths are not
multiples of the block size, for every mask layout t5g2 builds, with GQA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5g2 import sharding
from t5g2.model.kernels import Unsupported, splash, xla
from t5g2.model.masks import MaskSpec, decoder_window, encoder_window

N, H, SCALE = 4, 128, 0.3  # query heads, head_dim (splash takes multiples of 128), q.k scale


def _ids(rows, length):
    """(positions, segments) [len(rows), length]: row b packs segments of lengths rows[b]
    (ids 1, 2, ...; positions restart at 0), then padding (segment 0)."""
    pos = np.zeros((len(rows), length), np.int32)
    seg = np.zeros((len(rows), length), np.int32)
    for b, lengths in enumerate(rows):
        start = 0
        for s, n in enumerate(lengths, 1):
            pos[b, start:start + n], seg[b, start:start + n] = np.arange(n), s
            start += n
    return jnp.asarray(pos), jnp.asarray(seg)


def _normal(key, *shape):
    return jax.random.normal(key, shape, jnp.float32)


def _inputs(case, kv_heads, seed=0):
    """q and the parts of one mask layout: query rows pack several segments, then padding;
    encoder rows pack segments with the same ids; no length is a multiple of 128."""
    keys = iter(jax.random.split(jax.random.key(seed), 6))
    t = 300 if case.endswith("local") else 150
    pos, seg = _ids([[120, 100, 50], [t - 10]] if t == 300 else [[60, 50], [140]], t)
    q = _normal(next(keys), 2, t, N, H)
    self_part = {
        "encoder_local": dict(window=encoder_window(100)),
        "encoder_global": dict(),
        "decoder_local": dict(causal=True, window=decoder_window(100)),
        "decoder_global": dict(causal=True),
        "merged_local": dict(causal=True, window=decoder_window(40)),
        "merged_global": dict(causal=True),
    }.get(case)
    parts = []
    if self_part is not None:
        k, v = (_normal(next(keys), 2, t, kv_heads, H) for _ in "kv")
        parts.append((k, v, MaskSpec(pos, seg, pos, seg, contiguous=True, **self_part)))
    if case.startswith("merged") or case == "cross":
        s = 200
        enc_pos, enc_seg = _ids([[100, 80], [170]], s)
        k, v = (_normal(next(keys), 2, s, kv_heads, H) for _ in "kv")
        parts.append((k, v, MaskSpec(pos, seg, enc_pos, enc_seg)))
    return q, parts


def _outputs_and_grads(attend, q, parts):
    """attend's output and the gradients of q and of each part's (k, v), for a loss that reads
    non-padding queries only (as the model's does)."""
    real = parts[0][2].q_segments[..., None, None] > 0
    weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)

    def loss(q, kvs):
        out = attend(q, [(k, v, m) for (k, v), (_, _, m) in zip(kvs, parts)], SCALE)
        return jnp.sum(jnp.where(real, out * weights, 0.0)), out

    kvs = [(k, v) for k, v, _ in parts]
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(q, kvs)
    return out, grads


def _assert_matches_reference(attend, q, parts):
    out, grads = _outputs_and_grads(attend, q, parts)
    ref_out, ref_grads = _outputs_and_grads(xla.attend, q, parts)
    real = np.asarray(parts[0][2].q_segments) > 0
    assert np.all(np.isfinite(np.asarray(out)))  # padding queries included
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref_out)[real], atol=2e-5)
    for ours, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=5e-5)


def _interpreted(q, parts, scale):
    return splash.attend(q, parts, scale, interpret=True)


@pytest.mark.parametrize("case, kv_heads", [
    ("encoder_local", 2), ("encoder_global", 1), ("decoder_local", 4), ("decoder_global", 2),
    ("merged_local", 2), ("merged_global", 1), ("cross", 2)])
def test_splash_equals_xla_reference(case, kv_heads):
    q, parts = _inputs(case, kv_heads)
    _assert_matches_reference(_interpreted, q, parts)


def test_splash_sharded_over_batch_and_heads_equals_reference():
    """Under a data x tensor mesh each device runs splash on its rows and heads (shard_map)."""
    q, parts = _inputs("merged_global", kv_heads=2)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])

    def sharded(q, parts, scale):
        with sharding.use_mesh(mesh):
            return _interpreted(q, parts, scale)

    _assert_matches_reference(sharded, q, parts)


def test_merged_mask_hides_future_decoder_keys_and_shows_all_encoder_keys():
    """The merged index mask, as splash plans its blocks from it: causal over the decoder's
    columns, a window where there is one, everything from the encoder's first column on."""
    mask = splash.IndexMask((4, 7), own=4, causal=True, window=(1, 0))
    expected = np.array([[1, 0, 0, 0, 1, 1, 1],
                         [1, 1, 0, 0, 1, 1, 1],
                         [0, 1, 1, 0, 1, 1, 1],
                         [0, 0, 1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(mask[:, :], expected)
    assert mask == splash.IndexMask((4, 7), own=4, causal=True, window=(1, 0))
    assert hash(mask) == hash(splash.IndexMask((4, 7), own=4, causal=True, window=(1, 0)))


UNSUPPORTED = {  # name: (q, self part, cross part) -> (q, parts splash cannot take)
    "non-contiguous causal part (a KV cache)": lambda q, own, cross: (q, [_loose(own)]),
    "non-contiguous window": lambda q, own, cross: (
        q, [_loose((*own[:2], own[2].replace(causal=False, window=(3, 3))))]),
    "three parts": lambda q, own, cross: (q, [_loose(own), own, cross]),
    "windowed second part": lambda q, own, cross: (
        q, [own, (*cross[:2], cross[2].replace(window=(2, 2)))]),
    "causal over other keys": lambda q, own, cross: (
        q, [(*cross[:2], cross[2].replace(causal=True, contiguous=True))]),
    "head_dim 64": lambda q, own, cross: (q[..., :64], [(own[0][..., :64], own[1][..., :64],
                                                         own[2])]),
}


def _loose(part):
    """The part with positions not promised to be contiguous."""
    return (*part[:2], part[2].replace(contiguous=False))


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_layouts_raise_while_tracing(name):
    q, (own, cross) = _inputs("merged_global", kv_heads=2)
    q, parts = UNSUPPORTED[name](q, own, cross)
    with pytest.raises(Unsupported):
        jax.eval_shape(lambda q, parts: _interpreted(q, parts, SCALE), q, parts)
