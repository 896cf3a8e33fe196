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
4. Packed and padded batches (the MFU numerator): exactly their segments counted one by one, and
   the pairs the masks allow on the packed rows; full rows as before. The training loop's MFU
   over the batches it really trained on, and StepTimer's per-step, all-process accounting.
"""

import dataclasses
import importlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jcore

from t5g2.model import ModelConfig, T5Gemma2
from t5g2.model.kernels import xla as attention
from t5g2.model.attention import MaskSpec, decoder_window, encoder_window
from t5g2.model.flops import (batch_forward_flops, batch_train_flops, decoder_self_pairs,
                              vision_forward_flops,
                              encoder_pairs, forward_flops, segment_lengths, train_flops,
                              window_pairs)
from t5g2.train.metrics import StepTimer, sum_over_processes
from tests.reference import tiny_config, tiny_vision_config
from tests.test_metrics import FakeClock

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


# ------------------------------------------------------------------ packed and padded batches

ENC_LEN, DEC_LEN = 24, 20
# Per row: (leading padding encoder, decoder), then its segments (encoder, decoder tokens), ids
# 1, 2, ... in order; the rest of the row is padding. Segments longer than the window (4), a
# decoder-only and an encoder-only segment, left padding, an all-padding row, a full row.
ROWS = [
    ((0, 0), [(5, 3), (11, 9), (2, 1)]),
    ((2, 1), [(13, 7), (0, 4), (6, 0)]),
    ((0, 0), []),
    ((0, 0), [(ENC_LEN, DEC_LEN)]),
]
SEGMENTS = [seg for _, segs in ROWS for seg in segs]


def _side(lead: int, lengths: list[int], total: int) -> tuple[np.ndarray, np.ndarray]:
    ids = [0] * lead + [i + 1 for i, n in enumerate(lengths) for _ in range(n)]
    pos = [0] * lead + [p for n in lengths for p in range(n)]
    pad = total - len(ids)
    assert pad >= 0
    return np.array(ids + [0] * pad, np.int32), np.array(pos + [0] * pad, np.int32)


def _packed_batch(rows=ROWS) -> dict[str, np.ndarray]:
    """Segment ids and positions of the batch contract for `rows`, built by hand."""
    out = {k: [] for k in ("encoder_segment_ids", "encoder_positions", "decoder_segment_ids",
                           "decoder_positions")}
    for (lead_enc, lead_dec), segs in rows:
        for side, lead, lengths, total in (("encoder", lead_enc, [s for s, _ in segs], ENC_LEN),
                                           ("decoder", lead_dec, [t for _, t in segs], DEC_LEN)):
            ids, pos = _side(lead, lengths, total)
            out[f"{side}_segment_ids"].append(ids)
            out[f"{side}_positions"].append(pos)
    return {k: np.stack(v) for k, v in out.items()}


def _packed_config(cross_attention):
    # 7 layers: local x5, global, local; window 4 < every long segment.
    return tiny_config(cross_attention=cross_attention, num_layers=7, sliding_window=4)


def test_segment_lengths_of_a_packed_batch():
    batch = _packed_batch()
    enc, dec = segment_lengths(batch)
    assert sorted(zip(enc.tolist(), dec.tolist())) == sorted(SEGMENTS)
    # Any ids name segments, not only 1, 2, ...: the same segments.
    sparse = {k: v * 1000 + 7 * (v > 0) if k.endswith("segment_ids") else v
              for k, v in batch.items()}
    enc, dec = segment_lengths(sparse)
    assert sorted(zip(enc.tolist(), dec.tolist())) == sorted(SEGMENTS)


@pytest.mark.parametrize("useful_only", [True, False])
@pytest.mark.parametrize("cross_attention", MODES)
def test_packed_batch_is_the_sum_of_its_segments(cross_attention, useful_only):
    cfg = _packed_config(cross_attention)
    batch = _packed_batch()
    # The reference: each segment alone, one by one, as one full example.
    expected = sum(train_flops(cfg, s, t, useful_only=useful_only) for s, t in SEGMENTS)
    assert batch_train_flops(cfg, batch, useful_only=useful_only) == expected
    padded = len(ROWS) * train_flops(cfg, ENC_LEN, DEC_LEN, useful_only=useful_only)
    assert expected < 0.75 * padded  # the batch is a quarter padding: the counts differ


@pytest.mark.parametrize("cross_attention", MODES)
def test_packed_batch_pairs_match_the_model_masks(cross_attention):
    """Attention parts against the pairs the model's own masks allow on the packed rows (per
    segment, windowed, causal, cross attention within a segment); matmul parts against the
    number of real tokens."""
    cfg = _packed_config(cross_attention)
    enc, dec = cfg.encoder, cfg.decoder
    b = _packed_batch()
    got = batch_forward_flops(cfg, b)

    def visible(q, k, causal=False, window=None):
        spec = MaskSpec(jnp.asarray(b[f"{q}_positions"]), jnp.asarray(b[f"{q}_segment_ids"]),
                        jnp.asarray(b[f"{k}_positions"]), jnp.asarray(b[f"{k}_segment_ids"]),
                        causal=causal, window=window)
        return int(spec.dense().sum())

    def per_pair(s):
        return 2 * 2 * s.num_heads * s.head_dim

    enc_pairs = sum(visible("encoder", "encoder", window=None if enc.is_global(i) else
                            encoder_window(enc.sliding_window)) for i in range(enc.num_layers))
    dec_pairs = sum(visible("decoder", "decoder", causal=True, window=None if dec.is_global(i)
                            else decoder_window(dec.sliding_window))
                    for i in range(dec.num_layers))
    cross_layers = (dec.num_layers if cross_attention == "merged"
                    else sum(cfg.decoder_has_cross))
    assert got["encoder_attention"] == per_pair(enc) * enc_pairs
    assert got["decoder_self_attention"] == per_pair(dec) * dec_pairs
    assert got["decoder_cross_attention"] == (per_pair(dec) * cross_layers
                                              * visible("decoder", "encoder"))
    # Matmuls are per token: a one-token example's count times the real tokens.
    s_tokens = int((b["encoder_segment_ids"] > 0).sum())
    t_tokens = int((b["decoder_segment_ids"] > 0).sum())
    one_enc, one_dec = forward_flops(cfg, 1, 0), forward_flops(cfg, 0, 1)
    assert got["encoder_matmuls"] == s_tokens * one_enc["encoder_matmuls"]
    assert got["decoder_matmuls"] == t_tokens * one_dec["decoder_matmuls"]
    assert got["lm_head"] == t_tokens * one_dec["lm_head"]
    assert got["decoder_cross_matmuls"] == (s_tokens * one_enc["decoder_cross_matmuls"]
                                            + t_tokens * one_dec["decoder_cross_matmuls"])
    assert got["total"] == sum(v for k, v in got.items() if k != "total")


@pytest.mark.parametrize("useful_only", [True, False])
def test_full_unpacked_rows_count_as_before(useful_only):
    cfg = _packed_config("merged")
    rows = 3
    full = {f"{side}_segment_ids": np.ones((rows, n), np.int32)
            for side, n in (("encoder", ENC_LEN), ("decoder", DEC_LEN))}
    # The count before packing was taken into account: every row a full-length example.
    old = rows * train_flops(cfg, ENC_LEN, DEC_LEN, useful_only=useful_only)
    assert batch_train_flops(cfg, full, useful_only=useful_only) == old
    padding_only = {k: np.zeros_like(v) for k, v in full.items()}
    assert batch_train_flops(cfg, padding_only, useful_only=useful_only) == 0


def test_batches_from_the_packer_and_the_padder():
    """The pipeline's own layouts (grain's first-fit packer, one padded example per row) count
    exactly their examples."""
    import grain

    from t5g2.data.packing import to_batch_contract, unpacked_batch

    cfg = _packed_config("merged")
    lengths = [(5, 3), (11, 9), (2, 1), (13, 7), (6, 4), (24, 20), (9, 12), (1, 1)]
    examples = [{"inputs": np.arange(3, 3 + s, dtype=np.int32),
                 "targets": np.arange(3, 3 + t, dtype=np.int32)} for s, t in lengths]
    expected = sum(train_flops(cfg, s, t) for s, t in lengths)

    padded = unpacked_batch(examples, encoder_length=ENC_LEN, decoder_length=DEC_LEN, start_id=2)
    assert batch_train_flops(cfg, padded) == expected

    ds = grain.experimental.FirstFitPackIterDataset(
        grain.MapDataset.source(examples).to_iter_dataset(),
        length_struct={"inputs": ENC_LEN, "targets": DEC_LEN}, num_packing_bins=4,
        shuffle_bins=False)
    rows = list(ds)
    packed = to_batch_contract({k: np.stack([r[k] for r in rows]) for k in rows[0]}, start_id=2)
    assert len(rows) < len(examples)  # several examples share a row
    assert batch_train_flops(cfg, packed) == expected


def test_segment_lengths_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same rows"):
        segment_lengths({"encoder_segment_ids": np.ones((2, 4), np.int32),
                         "decoder_segment_ids": np.ones((3, 4), np.int32)})
    with pytest.raises(ValueError, match=">= 0"):
        segment_lengths({"encoder_segment_ids": -np.ones((2, 4), np.int32),
                         "decoder_segment_ids": np.ones((2, 4), np.int32)})


# ------------------------------------------------------------------ MFU over real tokens

def test_step_timer_counts_the_flops_added_per_step():
    clock = FakeClock()
    timer = StepTimer(tokens_per_step=100, padded_flops_per_step=50.0, peak_flops_per_s=100.0,
                      clock=clock)
    timer.add_flops(1e6)  # the compiling step: dropped by start
    timer.start(1)
    for flops in (10.0, 20.0, 30.0, 40.0):
        timer.add_flops(flops)
    clock.now += 2.0
    assert timer.measure(5) == pytest.approx({  # 4 steps in 2 s, 100 FLOPs
        "step_time_s": 0.5, "tokens_per_s": 200.0, "model_flops_per_s": 50.0, "mfu": 0.5,
        "mfu_padded": 1.0})
    timer.add_flops(5.0)
    clock.now += 1.0
    assert timer.measure(6)["model_flops_per_s"] == pytest.approx(5.0)  # a new window
    clock.now += 1.0
    assert "model_flops_per_s" not in timer.measure(7)  # a step nobody counted: no figure
    with pytest.raises(ValueError, match="one or the other"):
        StepTimer(tokens_per_step=1, flops_per_step=1.0).add_flops(1.0)


def test_step_timer_sums_the_flops_of_all_processes():
    """Each process adds its own rows' FLOPs; every window's total goes through the collective
    exactly once per measure with steps in it, whatever the clock says (a collective skipped by
    one process would hang the others)."""
    calls = []

    def two_processes(value):  # the other process did twice this one's work
        calls.append(value)
        return value + 2 * value

    clock = FakeClock()
    timer = StepTimer(tokens_per_step=100, peak_flops_per_s=60.0,
                      sum_across_processes=two_processes, clock=clock)
    assert timer.measure(1) == {} and calls == []  # no window: nothing to sum on any process
    timer.add_flops(10.0)
    timer.add_flops(10.0)
    clock.now += 1.0
    got = timer.measure(3)  # 2 steps in 1 s, 3 x 20 FLOPs in all
    assert (got["model_flops_per_s"], got["mfu"]) == pytest.approx((60.0, 1.0))
    assert calls == [20.0]
    timer.add_flops(10.0)  # no time passed: nothing reported, but the collective still ran
    assert timer.measure(4) == {} and calls == [20.0, 10.0]
    assert timer.measure(4) == {} and calls == [20.0, 10.0]  # no steps since: no collective


def test_sum_over_processes_single_process():
    assert sum_over_processes(1.5e15) == pytest.approx(1.5e15, rel=1e-7)


def test_training_loop_logs_the_mfu_of_real_tokens(tmp_path, cache_dir):
    """The main job's loop (UL2 rows: packed, padded): mfu / mfu_padded of every logged window
    is its batches' real FLOPs over their full-length count, from the same batches drawn again."""
    from configs import tiny
    from t5g2.train import loop
    from t5g2.train.config import TrainConfig

    config = tiny.get_config()
    config.model.encoder.num_layers = config.model.decoder.num_layers = 1  # compiles fast
    config.train.update(steps=4, log_every=2, batch_size=8, encoder_length=64, decoder_length=64)
    config.checkpoint.enabled = False
    config.peak_flops_per_device = 1e9
    config.data.ul2.cache_dir = cache_dir
    loop.train(config, str(tmp_path))
    logged = {m["step"]: m for m in map(json.loads,
                                        (tmp_path / "metrics.jsonl").read_text().splitlines())}

    model_cfg = ModelConfig.from_config_dict(config.model)
    train_cfg = TrainConfig.from_config_dict(config.train)
    source = loop.make_source(config, model_cfg, train_cfg)
    real = [batch_train_flops(model_cfg, next(source)) for _ in range(4)]
    source.close()
    padded = 8 * train_flops(model_cfg, 64, 64)
    assert "mfu" not in logged[1]  # the compiling step: no window
    for first, last in ((2, 2), (3, 4)):  # the windows ending at steps 2 and 4
        expected = sum(real[first - 1:last]) / (last - first + 1) / padded
        assert logged[last]["mfu"] / logged[last]["mfu_padded"] == pytest.approx(expected,
                                                                                 rel=1e-9)
        assert expected < 0.95  # these rows hold padding: the two figures differ


def test_vision_count_equals_traced_matmuls():
    """The tower and projector's forward (all dots, the patch embedding included) for one image;
    a batch counts the images its placeholders hold, not its image slots."""
    cfg = tiny_vision_config(num_layers=3, sliding_window_pattern=2)
    model = T5Gemma2(cfg, rngs=nnx.Rngs(0))
    size = cfg.vision.image_size
    images = jnp.zeros((1, 1, size, size, 3), jnp.float32)
    traced = _dot_flops(jax.make_jaxpr(lambda x: model.vision(x, jnp.float32))(images).jaxpr)
    forward = vision_forward_flops(cfg.vision, cfg.encoder.d_model)
    assert sum(forward.values()) == traced
    t = cfg.vision.tokens_per_image
    tokens = np.full((2, 3 * t), 5)
    tokens[0, :2 * t] = cfg.image_token_id  # two images in row 0, none in row 1
    batch = {"encoder_input_tokens": tokens, "encoder_images": np.zeros((2, 3, size, size, 3)),
             "encoder_segment_ids": np.ones_like(tokens),
             "decoder_segment_ids": np.ones((2, 4), np.int64)}
    text_only = {k: v for k, v in batch.items() if k != "encoder_images"}
    extra = batch_train_flops(cfg, batch) - batch_train_flops(cfg, text_only)
    # Frozen (the default): forward only, for the two real images.
    assert extra == 2 * sum(forward.values())
    trained = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, trainable="all"))
    assert batch_train_flops(trained, batch) - batch_train_flops(trained, text_only) == 2 * (
        2 * forward["patch_embedding"] + 3 * (forward["tower"] + forward["projector"]))
