"""Cached generation: every step's logits equal a full teacher-forced recompute, greedy output
equals Hugging Face `generate`, sampling is reproducible and draws from the right distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5g2.configlib import ConfigError
from t5g2.generate import Sampling, filtered_logits, generate, pick
from t5g2.model import T5Gemma2
from t5g2.model.params import abstract_model, load_params, param_shapes
from tests.reference import tiny_config

WINDOW = 4
# One scanned (local, global) period and a local tail layer; window 4, so the decoded sequences
# below run well past it.
SMALL = dict(num_layers=3, sliding_window_pattern=2, sliding_window=WINDOW)
TOL = 1e-5
NEVER = -1  # an eos id no step can emit: every row runs max_new_tokens steps


def _random_model(cfg, seed=0) -> T5Gemma2:
    """Every parameter random, O(1) activations and logits (the default init gives near-zero
    logits, against which a comparison would prove little); built abstractly, so no init runs."""
    model = abstract_model(cfg)
    rng = np.random.default_rng(seed)
    std = cfg.decoder.d_model ** -0.5
    load_params(model, {name: rng.standard_normal(s.shape) * (std if len(s.shape) >= 2 else 0.3)
                        for name, s in param_shapes(model).items()})
    return model


def _encoder_batch(cfg, lengths=(10, 6, 3), seed=0):
    rng = np.random.default_rng(seed)
    enc = np.zeros((len(lengths), max(lengths)), np.int64)
    for row, n in enumerate(lengths):
        enc[row, :n] = rng.integers(3, cfg.eoi_token_id, size=n)
    return enc, (enc != cfg.pad_id).astype(np.int32)


def _pad_left(tokens, segment_ids):
    """Right-padded rows moved to the right end of the row: their padding (0) now leads."""
    return np.stack([np.roll(row, row.size - int(n))
                     for row, n in zip(tokens, np.asarray(segment_ids).sum(axis=1))])


def _recomputed_logits(model, enc, enc_seg, prompt, tokens):
    """Teacher-forced logits [B, N, V] for each generated token, from `decode` on the whole
    prefix (prompt + the tokens generated before it), without any cache."""
    cfg = model.config
    prompt_len = (prompt != cfg.pad_id).sum(axis=1)
    n = tokens.shape[1]
    seqs = [np.concatenate([p[:m], t[:-1]]) for p, m, t in zip(prompt, prompt_len, tokens)]
    full = np.full((len(seqs), max(map(len, seqs))), cfg.pad_id, np.int64)
    seg = np.zeros(full.shape, np.int32)
    for row, s in enumerate(seqs):
        full[row, :len(s)], seg[row, :len(s)] = s, 1
    logits = np.asarray(_teacher_forced(model, enc, enc_seg, full, seg))
    index = prompt_len[:, None] - 1 + np.arange(n)[None, :]
    return np.take_along_axis(logits, index[:, :, None], axis=1)


@nnx.jit
def _teacher_forced(model, enc, enc_seg, dec, dec_seg):
    encoded = model.encode(enc, enc_seg)
    return model.logits(model.decode(dec, encoded, enc_seg, segment_ids=dec_seg))


CROSS_VARIANTS = {
    "merged_tied": dict(),
    "merged_untied": dict(tie_embeddings=False),
    "separate_untied": dict(cross_attention="separate", tie_embeddings=False),
    "global_only_tied": dict(cross_attention="global_only"),
}


@pytest.mark.parametrize("variant", sorted(CROSS_VARIANTS))
def test_cached_steps_equal_full_recompute(variant):
    cfg = tiny_config(**SMALL, **CROSS_VARIANTS[variant])
    model = _random_model(cfg, seed=1)
    enc, enc_seg = _encoder_batch(cfg)
    # Decoder prefixes of 1 (bos only), 6 (> window) and 3 tokens, right-padded.
    prompt = np.zeros((3, 6), np.int64)
    prompt[:, 0] = cfg.bos_id
    prompt[1, 1:6] = [11, 12, 13, 14, 15]
    prompt[2, 1:3] = [21, 22]
    out = generate(model, enc, encoder_segment_ids=enc_seg, decoder_prompt=prompt,
                   max_new_tokens=9, eos_id=NEVER, return_logits=True)
    ref = _recomputed_logits(model, enc, enc_seg, prompt, out.tokens)
    assert np.abs(ref).max() > 1.0  # not a comparison of near-zero numbers
    assert np.abs(out.logits - ref).max() <= TOL
    np.testing.assert_array_equal(out.tokens, ref.argmax(-1))  # greedy picks the argmax
    # The same batch padded on the left (encoder inputs and decoder prompts): the same logits,
    # every row's tokens at positions 0, 1, ... as in the right-padded recompute.
    left = generate(model, _pad_left(enc, enc_seg), decoder_prompt=_pad_left(prompt, prompt != 0),
                    max_new_tokens=9, eos_id=NEVER, return_logits=True)
    assert np.abs(left.logits - ref).max() <= TOL
    # Local layers keep a ring of the window, global layers every position.
    cache = jax.eval_shape(lambda: model.new_decode_cache(jnp.zeros((3, 10, 64)), 6 + 9))
    local, global_ = cache["periods"][0].self_kv, cache["periods"][1].self_kv
    assert local.ring and local.k.shape[2] == WINDOW
    assert not global_.ring and global_.k.shape[2] == 15


def test_bos_only_start_and_eos_stop_per_row():
    cfg = tiny_config(**SMALL)
    model = _random_model(cfg, seed=2)
    enc, enc_seg = _encoder_batch(cfg, seed=3)
    free = generate(model, enc, max_new_tokens=8, eos_id=NEVER, return_logits=True)
    ref = _recomputed_logits(model, enc, enc_seg, np.full((3, 1), cfg.bos_id), free.tokens)
    assert np.abs(free.logits - ref).max() <= TOL
    # Make row 0's 4th token the EOS: row 0 stops there (then pad), the others run on
    # unchanged up to their own first occurrence of that token.
    eos = int(free.tokens[0, 3])
    out = generate(model, enc, max_new_tokens=8, eos_id=eos, return_logits=True)  # same compile
    for row in range(3):
        hits = np.flatnonzero(free.tokens[row] == eos)
        stop = int(hits[0]) + 1 if hits.size else 8
        assert out.lengths[row] == stop
        np.testing.assert_array_equal(out.tokens[row, :stop], free.tokens[row, :stop])
        assert np.all(out.tokens[row, stop:] == cfg.pad_id)


def test_greedy_equals_hugging_face_generate():
    import torch

    from t5g2.convert import hf_t5gemma2
    from tests.reference import hf_t5gemma2_model, t5g2_model

    cfg = tiny_config(**SMALL)
    hf = hf_t5gemma2_model(cfg, seed=4)
    model = t5g2_model(cfg, hf_t5gemma2.from_hf_state_dict(hf.state_dict(), cfg))
    n = 10
    # Two padded batches of one shape (one compile): prompts shorter and longer than the window.
    for seed in (5, 6):
        enc, enc_seg = _encoder_batch(cfg, (12, 7, 3, 1 + seed), seed)
        with torch.no_grad():
            ref = hf.generate(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc_seg),
                              max_new_tokens=n, do_sample=False).numpy()
        assert np.all(ref[:, 0] == cfg.bos_id)  # HF starts the decoder with bos
        ref = ref[:, 1:]
        ref = np.pad(ref, ((0, 0), (0, n - ref.shape[1])), constant_values=cfg.pad_id)
        out = generate(model, enc, encoder_segment_ids=enc_seg, max_new_tokens=n)
        np.testing.assert_array_equal(out.tokens, ref)


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    cfg = tiny_config(**SMALL)
    model = _random_model(cfg, seed=8)
    enc, enc_seg = _encoder_batch(cfg, seed=9)
    hot = Sampling(temperature=3.0)
    a = generate(model, enc, max_new_tokens=8, sampling=hot, key=jax.random.key(1))
    b = generate(model, enc, max_new_tokens=8, sampling=hot, key=jax.random.key(1))
    c = generate(model, enc, max_new_tokens=8, sampling=hot, key=jax.random.key(2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)  # the key does drive the choice
    greedy = generate(model, enc, max_new_tokens=8, return_logits=True)  # compiled already
    top1 = generate(model, enc, max_new_tokens=8, sampling=Sampling(temperature=1.0, top_k=1),
                    key=jax.random.key(3))
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)


def _draws(logits, sampling, n=4000, seed=0):
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    tokens = np.asarray(pick(rows, jax.random.key(seed), sampling))
    return np.bincount(tokens, minlength=len(logits)) / n


def test_one_steps_samples_follow_the_tempered_softmax():
    logits = np.array([2.0, 1.5, 0.3, 0.0, -0.5, -1.0, -2.0, 1.0])
    for temperature in (0.7, 1.0, 2.0):
        expected = np.exp(logits / temperature)
        expected /= expected.sum()
        freq = _draws(logits, Sampling(temperature=temperature))
        # Total variation over 8 outcomes from 4000 draws: about 0.02 by chance.
        assert 0.5 * np.abs(freq - expected).sum() < 0.04, temperature


def test_top_p_keeps_exactly_the_nucleus_and_top_k_the_k_best():
    probs = np.array([0.06, 0.40, 0.04, 0.25, 0.15, 0.10])
    logits = np.log(probs)
    # Sorted: 0.40, 0.25 (0.65 < 0.7), 0.15 (reaches 0.8): the nucleus is {1, 3, 4}.
    kept = np.isfinite(np.asarray(filtered_logits(jnp.asarray(logits[None]),
                                                  Sampling(temperature=1.0, top_p=0.7))))[0]
    assert set(np.flatnonzero(kept)) == {1, 3, 4}
    nucleus = np.where(kept, probs, 0) / probs[kept].sum()
    freq = _draws(logits, Sampling(temperature=1.0, top_p=0.7), seed=1)
    assert set(np.flatnonzero(freq)) <= {1, 3, 4}
    assert 0.5 * np.abs(freq - nucleus).sum() < 0.04
    kept_k = np.isfinite(np.asarray(filtered_logits(jnp.asarray(logits[None]),
                                                    Sampling(temperature=1.0, top_k=2))))[0]
    assert set(np.flatnonzero(kept_k)) == {1, 3}


def test_bad_inputs_are_clear_errors():
    cfg = tiny_config(**SMALL)
    model = abstract_model(cfg)  # every error is raised before the model runs
    enc = np.full((2, 5), 7)
    with pytest.raises(ConfigError, match=r"shape \(0, 5\)"):
        generate(model, np.zeros((0, 5), np.int64), max_new_tokens=4)
    for bad in (0, -3):
        with pytest.raises(ConfigError, match=f"max_new_tokens={bad}"):
            generate(model, enc, max_new_tokens=bad)
    with pytest.raises(ConfigError, match="encoder input length=5 exceeds max_positions=4"):
        generate(model, enc, max_new_tokens=2, max_positions=4)
    with pytest.raises(ConfigError, match="decoder prompt length \\+ max_new_tokens=7 exceeds"):
        generate(model, enc, max_new_tokens=6, max_positions=6)
    with pytest.raises(ConfigError, match="encoder input row 1 is empty"):
        generate(model, np.array([[5, 6], [0, 0]]), max_new_tokens=2)
    with pytest.raises(ConfigError, match="decoder prompt row 1 has padding between its tokens"):
        generate(model, enc, decoder_prompt=np.array([[2, 5, 0], [2, 0, 5]]), max_new_tokens=2)
    with pytest.raises(ConfigError, match="encoder input row 0 has padding between"):
        generate(model, np.array([[5, 0, 6], [0, 5, 6]]), max_new_tokens=2)
    with pytest.raises(ConfigError, match="needs a PRNG key"):
        generate(model, enc, max_new_tokens=2, sampling=Sampling(temperature=1.0))
    with pytest.raises(ConfigError, match="top_p=0"):
        Sampling(temperature=1.0, top_p=0)


def test_generation_under_a_sharded_mesh_matches_one_device():
    """Batch over data x fsdp, kv heads over tensor (8 CPU devices): the same tokens and logits,
    for a batch of 5 rows that the 4 batch shards do not divide (filled, then cut)."""
    from t5g2.sharding import make_mesh, use_mesh

    cfg = tiny_config(**SMALL)
    model = _random_model(cfg, seed=10)
    enc, enc_seg = _encoder_batch(cfg, (10, 6, 3, 8, 5), seed=11)
    plain = generate(model, enc, max_new_tokens=6, return_logits=True)
    with use_mesh(make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        sharded = generate(model, enc, max_new_tokens=6, return_logits=True)
    np.testing.assert_array_equal(sharded.tokens, plain.tokens)
    assert np.abs(sharded.logits - plain.logits).max() <= TOL
