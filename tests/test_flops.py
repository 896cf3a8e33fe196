"""Model FLOPs (t5g2.model.flops) checked against the model itself, three ways.

1. Exactly, against the matmuls the model traces: every `dot_general` in the forward's jaxpr
   (scan bodies times their trip count) must add up to the dense count to the FLOP, for every
   cross-attention mode and tying, with two scanned periods and a tail.
2. Against XLA's own `cost_analysis()` of the compiled forward. XLA also counts elementwise ops
   (norms, softmax, GELU, RoPE), so its count is a little above ours: it must lie in
   [1.00, 1.03] x ours (measured 1.010-1.011 at these dims, where head_dim and d_model are large
   next to the elementwise work per token and per score). XLA counts a `while` body once, not
   times its trip count (12 layers count as 6), so these configs have exactly one scanned period.
3. By hand, and against the model's own `MaskSpec`, for the visible (query, key) pairs of the
   useful-only count: window clipping at the edges, causality.
"""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jcore

from t5g2.model import ModelConfig, T5Gemma2, attention
from t5g2.model.attention import MaskSpec, decoder_window, encoder_window
from t5g2.model.flops import (decoder_self_pairs, encoder_pairs, forward_flops, train_flops,
                              window_pairs)
from tests.reference import tiny_config

MODES = ("merged", "separate", "global_only")


def _forward_fn(cfg: ModelConfig, enc_len: int, dec_len: int):
    """The pure forward (state, enc, dec) -> logits and its abstract arguments (no memory)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: T5Gemma2(cfg, rngs=nnx.Rngs(0))))

    def forward(state, enc, dec):
        return nnx.merge(graphdef, state)(enc, dec)

    args = (state, jax.ShapeDtypeStruct((1, enc_len), jnp.int32),
            jax.ShapeDtypeStruct((1, dec_len), jnp.int32))
    return forward, args


def _dot_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general, sub-jaxprs included, scan bodies x length."""
    total = 0
    for eqn in jaxpr.eqns:
        assert eqn.primitive.name not in ("cond", "while"), eqn.primitive  # no fixed count
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
                lhs[c] for c in lhs_contract)
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for p in eqn.params.values():
            if isinstance(p, jcore.ClosedJaxpr):
                total += times * _dot_flops(p.jaxpr)
            elif isinstance(p, jcore.Jaxpr):
                total += times * _dot_flops(p)
    return total


@pytest.mark.parametrize("cross_attention", MODES)
@pytest.mark.parametrize("tie", [True, False])
def test_dense_count_equals_traced_matmuls(cross_attention, tie):
    # 13 layers: two scanned periods (5 local + 1 global) and a one-layer tail; lengths past the
    # window (8) and unequal, so a swapped S / T would show.
    cfg = tiny_config(cross_attention=cross_attention, tie_embeddings=tie, num_layers=13)
    forward, args = _forward_fn(cfg, 24, 16)
    traced = _dot_flops(jax.make_jaxpr(forward)(*args).jaxpr)
    assert forward_flops(cfg, 24, 16, useful_only=False)["total"] == traced


def _xla_flops(cfg, enc_len, dec_len) -> float:
    forward, args = _forward_fn(cfg, enc_len, dec_len)
    cost = jax.jit(forward).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0]
    return cost["flops"]


@pytest.mark.parametrize("cross_attention", MODES)
@pytest.mark.parametrize("tie", [True, False])
def test_dense_count_agrees_with_xla_cost_analysis(cross_attention, tie, monkeypatch):
    monkeypatch.setattr(attention, "MIN_BAND_BLOCK", 10**9)  # dense: every key of every query
    # 7 layers: one scanned period (trip count 1) holding the global layer, one unscanned tail.
    cfg = tiny_config(cross_attention=cross_attention, tie_embeddings=tie, num_layers=7,
                      d_model=256, ffn_dim=256, head_dim=256)
    enc_len, dec_len = 128, 96
    xla = _xla_flops(cfg, enc_len, dec_len)
    dense = forward_flops(cfg, enc_len, dec_len, useful_only=False)["total"]
    useful = forward_flops(cfg, enc_len, dec_len)["total"]
    assert 1.0 <= xla / dense <= 1.03, xla / dense
    assert xla / useful > 1.10  # the check tells the two counts apart (window 8 << lengths)


def test_banded_local_attention_computes_less_than_dense():
    # Encoder 512 keys, window 8: local layers score 64-query blocks against 71 keys, not 512.
    cfg = tiny_config(num_layers=7, d_model=256, ffn_dim=256, head_dim=256)
    enc_len, dec_len = 512, 256
    xla = _xla_flops(cfg, enc_len, dec_len)
    dense = forward_flops(cfg, enc_len, dec_len, useful_only=False)["total"]
    useful = forward_flops(cfg, enc_len, dec_len)["total"]
    assert useful < xla < 0.8 * dense, (useful, xla, dense)


def test_window_pairs_by_hand():
    # Encoder, W=8: 3 keys left, 4 right. n=6, query i sees keys max(0,i-3)..min(5,i+4):
    # 5, 6, 6, 6, 5, 4.
    assert encoder_window(8) == (3, 4)
    assert window_pairs(6, 3, 4) == 5 + 6 + 6 + 6 + 5 + 4
    # W=5: 2 left, 2 right; n=4: 3, 4, 4, 3.
    assert encoder_window(5) == (2, 2)
    assert window_pairs(4, 2, 2) == 3 + 4 + 4 + 3
    # A window wider than the sequence sees everything.
    assert window_pairs(3, 10, 10) == 9
    # Decoder, W=3 keys including the query: 1, 2, 3, 3, 3.
    assert decoder_window(3) == (2, 0)
    assert window_pairs(5, 2, 0) == 1 + 2 + 3 + 3 + 3
    assert window_pairs(0, 3, 4) == 0


def test_attention_counts_by_hand():
    # 2 layers per stack (local, global), W=2, 4 heads x head_dim 16, S=4, T=3.
    cfg = tiny_config(num_layers=2, sliding_window_pattern=2, sliding_window=2)
    per_pair = 2 * 2 * 4 * 16
    # Encoder W=2: 0 left, 1 right -> 2, 2, 2, 1 = 7 (local); 16 (global).
    assert encoder_pairs(cfg.encoder, 4, 0) == 7
    assert encoder_pairs(cfg.encoder, 4, 1) == 16
    # Decoder W=2, causal: 1, 2, 2 = 5 (local); 1, 2, 3 = 6 (global).
    assert decoder_self_pairs(cfg.decoder, 3, 0) == 5
    assert decoder_self_pairs(cfg.decoder, 3, 1) == 6
    useful = forward_flops(cfg, 4, 3)
    assert useful["encoder_attention"] == per_pair * (7 + 16)
    assert useful["decoder_self_attention"] == per_pair * (5 + 6)
    assert useful["decoder_cross_attention"] == per_pair * 2 * (3 * 4)
    dense = forward_flops(cfg, 4, 3, useful_only=False)
    assert dense["encoder_attention"] == per_pair * 2 * 16
    assert dense["decoder_self_attention"] == per_pair * 2 * 9
    assert dense["decoder_cross_attention"] == per_pair * 2 * 12  # T*(T+S) in all, per layer
    for key in ("encoder_matmuls", "decoder_matmuls", "decoder_cross_matmuls", "lm_head"):
        assert useful[key] == dense[key]
    # global_only: the cross block sits in the global layer (1) only.
    g = forward_flops(tiny_config(num_layers=2, sliding_window_pattern=2, sliding_window=2,
                                  cross_attention="global_only"), 4, 3)
    assert g["decoder_cross_attention"] == per_pair * 3 * 4
    d, h = 64, 4 * 16  # q/o width 4 x 16, k/v width 2 x 16
    assert g["decoder_cross_matmuls"] == 2 * 3 * d * 2 * h + 2 * 4 * d * 2 * (h // 2)


@pytest.mark.parametrize("length", [1, 5, 8, 9, 20])
@pytest.mark.parametrize("window", [1, 2, 5, 8])
def test_pair_counts_match_the_model_masks(length, window):
    pos = jnp.arange(length)[None]
    seg = jnp.ones_like(pos)
    cfg = tiny_config(num_layers=6, sliding_window=window)

    def visible(causal, w):
        return int(MaskSpec(pos, seg, pos, seg, causal=causal, window=w).dense().sum())

    assert encoder_pairs(cfg.encoder, length, 0) == visible(False, encoder_window(window))
    assert encoder_pairs(cfg.encoder, length, 5) == visible(False, None)
    assert decoder_self_pairs(cfg.decoder, length, 0) == visible(True, decoder_window(window))
    assert decoder_self_pairs(cfg.decoder, length, 5) == visible(True, None)


def test_270m_long_context():
    cd = importlib.import_module("configs.t5g2_270m").get_config()
    cfg = ModelConfig.from_config_dict(cd.model)
    useful = forward_flops(cfg, 16384, 16384)
    dense = forward_flops(cfg, 16384, 16384, useful_only=False)
    assert useful["total"] < dense["total"]
    assert useful["total"] == sum(v for k, v in useful.items() if k != "total")
    assert train_flops(cfg, 16384, 16384) == 3 * useful["total"]
    assert train_flops(cfg, 16384, 16384, useful_only=False) == 3 * dense["total"]
