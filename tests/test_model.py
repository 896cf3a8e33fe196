"""Model properties: every ablation trains, segments are isolated, remat is exact, configs fail
clearly."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tiny
from t5g2.model import ConfigError, ModelConfig, T5Gemma2, kernels
from t5g2.model.params import (abstract_model, flat_params, load_params, logical_axes,
                               param_shapes)
from t5g2.model.transformer import insert_image_features
from t5g2.train import checkpoint
from t5g2.train.loss import cross_entropy
from tests.reference import SMALL_STACK, tiny_config



def _batch(cfg, seed=0, batch=2, enc_len=12, dec_len=10):
    rng = np.random.default_rng(seed)
    enc = rng.integers(3, cfg.eoi_token_id, size=(batch, enc_len))
    dec = rng.integers(3, cfg.eoi_token_id, size=(batch, dec_len))
    enc[:, 3] = dec[:, 4] = cfg.eoi_token_id
    dec[:, 0] = cfg.bos_id
    enc[1, -3:] = dec[1, -2:] = cfg.pad_id  # padding on both sides
    targets = rng.integers(3, cfg.eoi_token_id, size=(batch, dec_len))
    return jnp.asarray(enc), jnp.asarray(dec), jnp.asarray(targets), jnp.asarray(dec != 0)


def _loss(model, enc, dec, targets, weights):
    logits = model(enc, dec, encoder_segment_ids=(enc != 0).astype(jnp.int32),
                   decoder_segment_ids=(dec != 0).astype(jnp.int32))
    sums = cross_entropy(logits, targets, weights)
    return sums.total / sums.weight


@pytest.mark.parametrize("cross_attention", ["merged", "separate", "global_only"])
@pytest.mark.parametrize("tie", [True, False])
def test_every_ablation_runs_forward_and_backward(cross_attention, tie):
    cfg = tiny_config(cross_attention=cross_attention, tie_embeddings=tie, **SMALL_STACK)
    model = T5Gemma2(cfg, rngs=nnx.Rngs(0))
    loss, grads = nnx.jit(nnx.value_and_grad(_loss))(model, *_batch(cfg))
    assert np.isfinite(float(loss))
    assert abs(float(loss) - np.log(cfg.vocab_size)) < 1.0  # near-uniform at init
    flat = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
    assert set(flat) == set(flat_params(model))
    for name, g in flat.items():  # every parameter, cross-attention included, gets a gradient
        assert np.all(np.isfinite(g)), name
        assert np.abs(g).max() > 0, name


@pytest.mark.parametrize("option", [dict(remat="full"), dict(remat="save_dots"),
                                    pytest.param(dict(scan_layers=False), marks=pytest.mark.slow)],
                         ids=str)
def test_execution_options_change_memory_and_speed_not_numbers(option):
    cfg = tiny_config(num_layers=5)  # two scanned (local, global) periods and a tail
    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder,
                                                               sliding_window_pattern=2))
    batch = _batch(cfg)
    results = []
    for variant in ({}, option):
        model = T5Gemma2(dataclasses.replace(cfg, **variant), rngs=nnx.Rngs(0))
        loss, grads = nnx.jit(nnx.value_and_grad(_loss))(model, *batch)
        results.append((float(loss), jax.tree.leaves(nnx.to_pure_dict(grads))))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(results[0][1], results[1][1]):  # equal up to float32 reassociation
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max() + 1e-7


# separate with -m slow: every kernel test checks packed segments of cross parts
@pytest.mark.parametrize("cross_attention", ["merged",
                                             pytest.param("separate", marks=pytest.mark.slow)])
def test_packed_examples_do_not_see_each_other(cross_attention):
    """Two examples packed in one row (segment ids, restarting positions) get their own logits."""
    cfg = tiny_config(cross_attention=cross_attention, **SMALL_STACK)
    model = T5Gemma2(cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(5)
    # (encoder, decoder) lengths; both longer than the window 8 at least once
    lens = [(11, 9), (7, 6)]
    alone, encs, decs = [], [], []
    for s, t in lens:
        enc = rng.integers(3, 400, size=(1, s))
        dec = rng.integers(3, 400, size=(1, t))
        dec[0, 0] = cfg.bos_id
        alone.append(np.asarray(model(enc, dec))[0])
        encs.append(enc[0]), decs.append(dec[0])

    def pack(parts, total):
        tokens, seg, pos = (np.zeros((1, total), np.int32) for _ in range(3))
        start = 0
        for i, p in enumerate(parts):
            tokens[0, start:start + len(p)] = p
            seg[0, start:start + len(p)] = i + 1
            pos[0, start:start + len(p)] = np.arange(len(p))
            start += len(p)
        return tokens, seg, pos

    enc, enc_seg, enc_pos = pack(encs, 20)
    dec, dec_seg, dec_pos = pack(decs, 17)
    packed = np.asarray(model(enc, dec, encoder_segment_ids=enc_seg, encoder_positions=enc_pos,
                              decoder_segment_ids=dec_seg, decoder_positions=dec_pos))[0]
    np.testing.assert_allclose(packed[:9], alone[0], atol=1e-5)
    np.testing.assert_allclose(packed[9:15], alone[1], atol=1e-5)


@pytest.mark.slow  # separate cross-attention: test_every_ablation_runs... by default
def test_unbalanced_stacks_with_separate_cross_attention():
    base = tiny_config(cross_attention="separate", tie_embeddings=False, **SMALL_STACK)
    cfg = dataclasses.replace(base, encoder=dataclasses.replace(base.encoder, d_model=48))
    cfg.validate()
    model = T5Gemma2(cfg, rngs=nnx.Rngs(0))
    enc, dec, _, _ = _batch(cfg)
    assert model(enc, dec).shape == (2, 10, cfg.vocab_size)


def test_every_parameter_has_logical_axes():
    model = T5Gemma2(tiny_config(tie_embeddings=False, cross_attention="separate"),
                     rngs=nnx.Rngs(0))
    flat = flat_params(model)
    known = {"layers", "embed", "vocab", "heads", "kv_heads", "head_dim", "mlp"}
    for name, axes in logical_axes(model).items():
        assert len(axes) == flat[name].ndim and set(axes) <= known, (name, axes)
        assert ("periods" in name) == (axes[0] == "layers"), (name, axes)


def test_parameters_and_checkpoint_arrays_are_named_by_module_path():
    """One naming: '/' for parameters, '.' for checkpoint arrays (their on-disk names)."""
    model = abstract_model(tiny_config(**SMALL_STACK))
    names = set(param_shapes(model))
    assert {"embed/table", "embed/eoi", "decoder/final_norm/scale",
            "encoder/layers/periods/layers/0/attn/q"} <= names
    params = nnx.state(model, nnx.Param)
    assert set(checkpoint.flatten(params)) == {name.replace("/", ".") for name in names}
    moments = checkpoint.flatten(jax.eval_shape(optax.adam(1e-3).init, params))
    assert {"0.count", "0.mu.embed.table", "0.nu.encoder.layers.periods.layers.0.attn.q"} <= set(
        moments)


def test_load_params_rejects_wrong_keys_and_shapes():
    model = T5Gemma2(tiny_config(**SMALL_STACK), rngs=nnx.Rngs(0))
    flat = flat_params(model)
    with pytest.raises(ValueError, match="missing"):
        load_params(model, {k: v for k, v in flat.items() if k != "embed/eoi"})
    with pytest.raises(ValueError, match=r"embed/eoi: shape \(3,\)"):
        load_params(model, {**flat, "embed/eoi": np.zeros(3, np.float32)})


def _config_dict(**model_fields):
    cd = tiny.get_config().model
    for key, value in model_fields.items():
        target = cd
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return cd


@pytest.mark.parametrize("fields, message", [
    ({"encoder.num_kv_heads": 3},
     r"model\.encoder\.num_heads=4 is not divisible by model\.encoder\.num_kv_heads=3"),
    ({"cross_attention": "interleaved"},
     r"model\.cross_attention='interleaved' is unknown; valid: merged, separate, global_only"),
    ({"encoder.d_model": 96, "tie_embeddings": False},
     r"model\.encoder\.d_model=96 != model\.decoder\.d_model=64: merged attention"),
    ({"encoder.d_model": 96, "cross_attention": "separate"},
     r"model\.encoder\.d_model=96 != model\.decoder\.d_model=64: tied embeddings"),
    ({"decoder.head_dim": 15}, r"model\.decoder\.head_dim=15 must be even"),
    ({"decoder.num_layers": 0}, r"model\.decoder\.num_layers=0 must be a positive integer"),
    ({"dtype": "float8"}, r"model\.dtype='float8' is unknown"),
    ({"remat": "some"}, r"model\.remat='some' is unknown; valid: none, full, save_dots"),
    ({"bos_id": 600}, r"model\.bos_id=600 is outside the vocabulary \[0, 512\)"),
])
def test_bad_configs_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_config_dict(_config_dict(**fields))


def test_unknown_field_is_named():
    cd = tiny.get_config().model
    cd.unlock()
    cd.encoder.num_layer = 3
    with pytest.raises(ConfigError, match=r"unknown field\(s\) model\.encoder\.num_layer"):
        ModelConfig.from_config_dict(cd)


def test_image_features_fill_each_rows_placeholders_in_order():
    cfg = tiny_config(**SMALL_STACK)
    model = T5Gemma2(cfg, rngs=nnx.Rngs(0))
    img = cfg.image_token_id
    # Two tokens per image; row 0 holds two images, row 1 one (its second slot unused).
    tokens = np.array([[5, img, img, 6, img, img], [img, img, 7, 8, 9, 10]])
    features = np.arange(2 * 2 * 2 * 64, dtype=np.float32).reshape(2, 2, 2, 64)
    x = model.embed(jnp.asarray(tokens), jnp.float32)
    out = np.asarray(insert_image_features(x, tokens, features, img))
    np.testing.assert_array_equal(out[0, [1, 2, 4, 5]], features[0].reshape(4, 64))
    np.testing.assert_array_equal(out[1, [0, 1]], features[1, 0])
    np.testing.assert_array_equal(out[0, [0, 3]], np.asarray(x)[0, [0, 3]])
    np.testing.assert_array_equal(out[1, 2:], np.asarray(x)[1, 2:])
    with pytest.raises(ValueError, match="row 0 has 3 image placeholder tokens: expected a "
                                         "multiple of 2 tokens per image, for at most 2 images"):
        insert_image_features(x, tokens[:, :5], features, img)


# separate with -m slow: tests/test_attention.py checks query groups of every part kind
@pytest.mark.parametrize("cross_attention", ["merged",
                                             pytest.param("separate", marks=pytest.mark.slow)])
def test_chunked_attention_gives_the_same_numbers(cross_attention):
    """Query chunks (with a ragged last chunk) change memory, not logits or gradients."""
    cfg = tiny_config(cross_attention=cross_attention, **SMALL_STACK)
    batch = _batch(cfg, enc_len=13, dec_len=11)
    results = []
    for chunk in (0, 4):
        model = T5Gemma2(dataclasses.replace(cfg, attention_query_chunk=chunk), rngs=nnx.Rngs(0))
        loss, grads = nnx.jit(nnx.value_and_grad(_loss))(model, *batch)
        results.append((float(loss), jax.tree.leaves(nnx.to_pure_dict(grads))))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max() + 1e-7


# gpu_flash by default; splash and cudnn (each equal to xla in its own tests) with -m slow
@pytest.mark.parametrize("impl", [pytest.param("splash", marks=pytest.mark.slow), "gpu_flash",
                                  pytest.param("cudnn", marks=pytest.mark.slow)])
def test_every_attention_kernel_gives_the_same_model(impl, monkeypatch, caplog):
    """The whole model (merged attention, local and global layers, padding) with a fused kernel
    run interpreted: the loss and every gradient equal the XLA core's. Splash and gpu_flash take
    every attention of the model; cuDNN takes what it can and says once why it leaves the rest."""
    monkeypatch.setattr(kernels, "_LOGGED", set())
    # one local and one global layer per stack; splash's head_dim: a multiple of 128
    cfg = tiny_config(head_dim=128, num_layers=2, sliding_window_pattern=2)
    batch = _batch(cfg, enc_len=21, dec_len=14)
    results = []
    for variant in ("xla", impl):
        model = T5Gemma2(dataclasses.replace(cfg, attention_impl=variant), rngs=nnx.Rngs(0))
        with caplog.at_level(logging.WARNING, logger=kernels.__name__):
            loss, grads = nnx.jit(nnx.value_and_grad(_loss))(model, *batch)
        results.append((float(loss), jax.tree.leaves(nnx.to_pure_dict(grads))))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max() + 1e-7
    fallbacks = [r.getMessage() for r in caplog.records if "using xla" in r.getMessage()]
    if impl == "cudnn":  # two-sided windows and merged attention are not cuDNN's
        assert len(fallbacks) == 2 and all("cudnn cannot run" in m for m in fallbacks), fallbacks
    else:
        assert not fallbacks
    assert any(f"{impl} runs in Pallas interpret mode" in r.getMessage() for r in caplog.records)
