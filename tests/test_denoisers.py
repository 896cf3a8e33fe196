"""UL2 denoisers on real text: T5's arithmetic, exact merge-back, budgets, realised rates,
uniform span compositions, determinism from (seed, index), and clear errors."""

import math

import numpy as np
import pytest

from t5g2.data.denoisers import (MIXTURES, UL2_MODE_TOKEN_NAMES, Denoiser, DenoiserError,
                                 Mixture, denoise, merge_back, mixture_from_config,
                                 random_spans_helper, random_spans_noise_mask, raw_length,
                                 rename_mode_tokens, sample_denoiser, spans_needed)
from t5g2.data.sources import open_documents
from t5g2.data.vocab import default_vocabulary

ALL_DENOISERS = [(preset, d) for preset, m in MIXTURES.items() for d in m.denoisers]
IDS = [f"{preset}-{d.name}" for preset, d in ALL_DENOISERS]
SPAN_DENOISERS = [(p, d) for p, d in ALL_DENOISERS if d.kind == "span"]
SPAN_IDS = [f"{p}-{d.name}" for p, d in SPAN_DENOISERS]
T5GEMMA2 = {d.name: d for d in MIXTURES["t5gemma2"].denoisers}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("t5g2-cache"))


@pytest.fixture(scope="module")
def vocab(cache_dir):
    needed = max(spans_needed(d, 16384, 16384) for _, d in ALL_DENOISERS)
    return default_vocabulary(vocab_size=512, num_sentinels=needed, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def stream(vocab, cache_dir):
    """The embedded corpus (the stdlib's docstrings) tokenized: real English text."""
    docs = open_documents("embedded", cache_dir=cache_dir)
    tokens = np.concatenate(vocab.encode_many([docs[i] for i in range(len(docs))]))
    assert len(tokens) > 200_000
    return tokens


def chunks(stream, length, count, seed=0):
    """`count` windows of `length` real tokens at random offsets."""
    starts = np.random.default_rng(seed).integers(0, len(stream) - length, count)
    return [stream[s:s + length] for s in starts]


def make(tokens, denoiser, vocab, index=0, seed=0, with_mode=True):
    mode_id = vocab.mode_id(denoiser.mode_token) if with_mode and denoiser.mode_token else None
    return denoise(tokens, denoiser, np.random.default_rng([seed, index]),
                   sentinel_ids=vocab.sentinel_ids, eos_id=vocab.eos_id, mode_id=mode_id)


def noise_runs(example, vocab, denoiser):
    """Lengths of the removed spans, read from the targets (sentinel k then span k)."""
    targets = example["targets"][:-1]
    at = np.flatnonzero(np.isin(targets, vocab.sentinel_ids))
    return np.diff(np.append(at, len(targets))) - 1


# ------------------------------------------------------------------------- T5's arithmetic

@pytest.mark.parametrize("inputs_length, mu, r, tokens, targets, spans", [
    (512, 3, .15, 568, 114, 28),
    (512, 64, .5, 1006, 512, 8),
    (2048, 3, .15, 2274, 456, 114),
    (2048, 32, .5, 3970, 2048, 62),
    (8192, 12, .5, 15122, 8192, 630),
    (16384, 3, .15, 18204, 3642, 910),
    (16384, 12, .5, 30246, 16384, 1260),
    (16384, 32, .15, 19168, 2966, 90),
    (16384, 32, .5, 31774, 16384, 496),
    (16384, 8, .15, 18858, 3184, 354),
])
def test_random_spans_helper_reproduces_t5_numbers(inputs_length, mu, r, tokens, targets, spans):
    assert random_spans_helper(inputs_length, r, mu) == (tokens, targets)
    no_mode = Denoiser("D", "span", mean_span_length=mu, noise_density=r)
    assert raw_length(no_mode, inputs_length, targets) == tokens
    assert spans_needed(no_mode, inputs_length, targets) == spans


def test_the_mode_token_takes_one_input_token_from_the_budget():
    r1 = T5GEMMA2["R1"]
    assert raw_length(r1, 16384, 16384) == random_spans_helper(16383, .15, 3)[0] == 18202


def test_t5gemma2_s_denoiser_lengths_at_16k():
    s = T5GEMMA2["S"]
    raw = raw_length(s, 16384, 16384)
    # targets = round(.75 L) + sentinel + EOS fills 16384; one more raw token would not fit
    assert round(.75 * raw) + 2 <= 16384 < round(.75 * (raw + 1)) + 2
    assert spans_needed(s, 16384, 16384) == 1


def test_random_prefix_split_fits_whatever_the_split():
    s = MIXTURES["ul2"].denoisers[-1]
    assert s.prefix_split == "random"
    assert raw_length(s, 512, 512) == 511          # [S] + 510 prefix + EOS at the longest
    assert raw_length(s, 512, 100) == 100          # 99-token suffix + EOS at the longest
    assert spans_needed(s, 512, 512) == 0


# -------------------------------------------------------------- properties on real text

@pytest.mark.parametrize("preset, denoiser", ALL_DENOISERS, ids=IDS)
def test_examples_merge_back_exactly_and_fill_their_budget(preset, denoiser, vocab, stream):
    inputs_length, targets_length = 512, 512
    raw = raw_length(denoiser, inputs_length, targets_length)
    needed = spans_needed(denoiser, inputs_length, targets_length)
    mode_id = vocab.mode_id(denoiser.mode_token)
    lengths_seen = set()
    for index, chunk in enumerate(chunks(stream, raw, 40)):
        ex = make(chunk, denoiser, vocab, index=index)
        inputs, targets = ex["inputs"], ex["targets"]
        assert inputs.dtype == targets.dtype == np.int32
        np.testing.assert_array_equal(
            merge_back(inputs, targets, vocab.sentinel_ids, eos_id=vocab.eos_id,
                       mode_id=mode_id), chunk)
        assert inputs[0] == mode_id and inputs[-1] == targets[-1] == vocab.eos_id
        assert len(inputs) <= inputs_length and len(targets) <= targets_length
        if denoiser.kind == "span":
            # the budget is filled exactly; T5's density-0.5 rule (targets == inputs) may give
            # back one input token
            slack = 1 if denoiser.noise_density == 0.5 else 0
            assert inputs_length - slack <= len(inputs) <= inputs_length
        used = np.isin(inputs, vocab.sentinel_ids)
        np.testing.assert_array_equal(inputs[used], vocab.sentinel_ids[:used.sum()])
        assert used.sum() == needed  # every full-length chunk uses the same number of spans
        lengths_seen.add((len(inputs), len(targets)))
    if denoiser.prefix_split == "random":
        assert len(lengths_seen) > 10  # the split point moves


@pytest.mark.parametrize("preset, denoiser", ALL_DENOISERS, ids=IDS)
def test_shorter_chunks_stay_within_the_lengths(preset, denoiser, vocab, stream):
    raw = raw_length(denoiser, 256, 256)
    rng = np.random.default_rng(1)
    for index, length in enumerate(rng.integers(2, raw + 1, 30)):
        chunk = stream[index * 300:index * 300 + length]
        ex = make(chunk, denoiser, vocab, index=index)
        assert len(ex["inputs"]) <= 256 and len(ex["targets"]) <= 256
        np.testing.assert_array_equal(
            merge_back(ex["inputs"], ex["targets"], vocab.sentinel_ids, eos_id=vocab.eos_id,
                       mode_id=vocab.mode_id(denoiser.mode_token)), chunk)


@pytest.mark.parametrize("preset, denoiser", SPAN_DENOISERS, ids=SPAN_IDS)
def test_realised_corruption_rate_and_mean_span_length(preset, denoiser, vocab, stream):
    raw = raw_length(denoiser, 16384, 16384)
    noise = spans = tokens = 0
    for index, chunk in enumerate(chunks(stream, raw, 8, seed=index_seed(denoiser))):
        runs = noise_runs(make(chunk, denoiser, vocab, index=index), vocab, denoiser)
        assert runs.min() >= 1
        noise, spans, tokens = noise + runs.sum(), spans + len(runs), tokens + len(chunk)
    assert noise / tokens == pytest.approx(denoiser.noise_density, rel=0.02)
    assert noise / spans == pytest.approx(denoiser.mean_span_length, rel=0.05)


def index_seed(denoiser):
    return sum(map(ord, denoiser.name))


def test_t5gemma2_s_denoiser_targets_the_last_three_quarters(vocab, stream):
    s = T5GEMMA2["S"]
    chunk = stream[:raw_length(s, 512, 512)]
    ex = make(chunk, s, vocab)
    target_tokens = len(ex["targets"]) - 2  # sentinel + EOS
    assert target_tokens == round(.75 * len(chunk))
    np.testing.assert_array_equal(ex["targets"][1:-1], chunk[-target_tokens:])
    np.testing.assert_array_equal(ex["inputs"][1:-2], chunk[:-target_tokens])
    assert ex["inputs"][-2] == ex["targets"][0] == vocab.sentinel_ids[0]


def test_random_prefix_split_is_uniform_over_all_split_points(vocab):
    s = MIXTURES["ul2"].denoisers[-1]
    chunk = np.arange(100, 110, dtype=np.int32)
    splits = [len(make(chunk, s, vocab, index=i)["inputs"]) - 2 for i in range(2000)]
    counts = np.bincount(splits, minlength=10)
    assert counts[0] == 0 and np.all(counts[1:] > 0)
    np.testing.assert_allclose(counts[1:] / 2000, 1 / 9, atol=0.03)


def test_noise_mask_structure_and_uniform_compositions():
    """10 noise tokens in 4 spans: every composition equally likely, so the first span has
    length j with probability C(10-j-1, 2) / C(9, 3); kept runs likewise (10 in 4)."""
    length, density, mu = 20, .5, 2.5
    first_noise, first_kept = [], []
    for i in range(4000):
        mask = random_spans_noise_mask(length, density, mu, np.random.default_rng([7, i]))
        assert mask.sum() == 10 and not mask[0] and mask[-1]
        starts = np.flatnonzero(np.diff(mask.astype(int)) == 1) + 1
        ends = np.flatnonzero(np.diff(mask.astype(int)) == -1) + 1
        assert len(starts) == 4
        first_kept.append(starts[0])
        first_noise.append(ends[0] - starts[0])
    expected = np.array([math.comb(10 - j - 1, 2) for j in range(1, 8)]) / math.comb(9, 3)
    for observed in (first_noise, first_kept):
        freq = np.bincount(observed, minlength=8)[1:8] / len(observed)
        np.testing.assert_allclose(freq, expected, atol=0.025)


def test_mask_of_tiny_and_empty_chunks_follows_t5():
    rng = np.random.default_rng(0)
    assert random_spans_noise_mask(0, .15, 3, rng).shape == (0,)
    np.testing.assert_array_equal(random_spans_noise_mask(1, .15, 3, rng), [False])
    np.testing.assert_array_equal(random_spans_noise_mask(2, .15, 3, rng), [False, True])
    assert not random_spans_noise_mask(50, 0.0, 3, rng).any()


# --------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("name", ["R1", "X1", "S"])
def test_examples_are_a_function_of_seed_and_index(name, vocab, stream):
    denoiser = T5GEMMA2[name]
    chunk = stream[:raw_length(denoiser, 512, 512)]
    first = [make(chunk, denoiser, vocab, index=i) for i in range(5)]
    again = [make(chunk, denoiser, vocab, index=i) for i in reversed(range(5))][::-1]
    for a, b in zip(first, again):
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(a[key], b[key])
    if name != "S":  # the t5gemma2 S split is fixed; span masks differ per index and seed
        assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])
        other_seed = make(chunk, denoiser, vocab, index=0, seed=1)
        assert not np.array_equal(first[0]["inputs"], other_seed["inputs"])


def test_sample_denoiser_follows_the_weights():
    mixture = MIXTURES["t5gemma2"]
    draws = [sample_denoiser(mixture, np.random.default_rng([3, i])) for i in range(4000)]
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, [1 / 8] * 4 + [1 / 2], atol=0.025)
    assert draws == [sample_denoiser(mixture, np.random.default_rng([3, i])) for i in range(4000)]


def test_mode_token_only_when_the_denoiser_has_one_and_its_id_is_given(vocab):
    chunk = np.arange(100, 140, dtype=np.int32)
    r1 = T5GEMMA2["R1"]
    without_id = make(chunk, r1, vocab, with_mode=False)
    with_id = make(chunk, r1, vocab)
    np.testing.assert_array_equal(with_id["inputs"][1:], without_id["inputs"])
    no_token = Denoiser("R", "span")
    ex = denoise(chunk, no_token, np.random.default_rng(0), sentinel_ids=vocab.sentinel_ids,
                 eos_id=vocab.eos_id, mode_id=vocab.mode_id("[R]"))
    assert ex["inputs"][0] == 100


# -------------------------------------------------------------------------------- errors

def test_too_few_sentinels_is_an_error_naming_the_count(vocab, stream):
    x1 = T5GEMMA2["X1"]
    chunk = stream[:raw_length(x1, 512, 512)]
    needed = spans_needed(x1, 512, 512)
    with pytest.raises(DenoiserError, match=f"made {needed} noise spans .* only {needed - 1} "
                                            f"sentinel ids"):
        denoise(chunk, x1, np.random.default_rng(0), sentinel_ids=vocab.sentinel_ids[:needed - 1],
                eos_id=vocab.eos_id, mode_id=None)


def test_targets_length_too_short_names_the_numbers():
    with pytest.raises(DenoiserError, match=r"denoiser X1 .*mean_span_length=12, noise_density=0.5"
                                            r".* inputs_length=512 takes 942 raw tokens and makes "
                                            r"targets of 511 tokens, more than targets_length=128; "
                                            r"use targets_length >= 511"):
        raw_length(T5GEMMA2["X1"], 512, 128)
    assert raw_length(T5GEMMA2["X1"], 512, 511) == 942


def test_lengths_too_short_for_any_example_are_errors():
    with pytest.raises(DenoiserError,
                       match="denoiser R1 .* inputs_length=2; use inputs_length >= 4"):
        raw_length(T5GEMMA2["R1"], 2, 64)
    with pytest.raises(DenoiserError, match="denoiser S .* needs inputs_length >= 4 and "
                                            "targets_length >= 3"):
        raw_length(T5GEMMA2["S"], 3, 64)
    with pytest.raises(DenoiserError, match="targets_length=0 must be an integer >= 1"):
        raw_length(T5GEMMA2["S"], 64, 0)
    with pytest.raises(DenoiserError, match="needs at least 2 raw tokens, got 1"):
        denoise(np.array([5]), T5GEMMA2["R1"], np.random.default_rng(0),
                sentinel_ids=np.array([9]), eos_id=1, mode_id=None)


def test_merge_back_rejects_malformed_examples(vocab):
    sentinels = vocab.sentinel_ids
    with pytest.raises(DenoiserError, match="do not end with EOS"):
        merge_back(np.array([5, 6]), np.array([1]), sentinels, eos_id=1)
    with pytest.raises(DenoiserError, match="not sentinel_ids"):
        merge_back(np.array([5, sentinels[1], 1]), np.array([sentinels[1], 7, 1]), sentinels,
                   eos_id=1)


# ------------------------------------------------------------------------- configuration

def test_presets():
    t5g2 = MIXTURES["t5gemma2"]
    assert [(d.kind, d.mean_span_length, d.noise_density, d.mode_token)
            for d in t5g2.denoisers[:4]] == [("span", 3, .15, "[R]"), ("span", 12, .5, "[X]"),
                                             ("span", 32, .15, "[X]"), ("span", 32, .5, "[X]")]
    assert t5g2.denoisers[4].prefix_split == "t5gemma2" and t5g2.denoisers[4].noise_density == .75
    assert t5g2.weights == (1, 1, 1, 1, 4)
    assert Denoiser("S", "prefix").noise_density == .75  # the default fraction depends on kind
    assert Denoiser("R", "span").noise_density == .15
    ul2 = MIXTURES["ul2"]
    assert [(d.mean_span_length, d.noise_density) for d in ul2.denoisers[:6]] == [
        (3, .15), (8, .15), (3, .5), (8, .5), (64, .15), (64, .5)]
    assert ul2.denoisers[6].prefix_split == "random" and len(set(ul2.weights)) == 1


def test_mixture_from_config_accepts_presets_lists_and_config_dicts():
    import ml_collections
    assert mixture_from_config("ul2") is MIXTURES["ul2"]
    renamed = mixture_from_config({"preset": "t5gemma2", "mode_tokens": "ul2"})
    assert [d.mode_token for d in renamed.denoisers] == ["[NLU]", "[NLG]", "[NLG]", "[NLG]",
                                                         "[S2S]"]
    assert renamed == rename_mode_tokens(MIXTURES["t5gemma2"], UL2_MODE_TOKEN_NAMES)
    entries = [dict(name="R", kind="span", mean_span_length=3, noise_density=.15,
                    mode_token="[R]", weight=2),
               ml_collections.ConfigDict(dict(name="S", kind="prefix", mode_token="[S]"))]
    mixture = mixture_from_config(entries)
    assert mixture == Mixture((Denoiser("R", "span", 3, .15, "[R]"),
                               Denoiser("S", "prefix", noise_density=.75, mode_token="[S]")),
                              (2.0, 1.0))


@pytest.mark.parametrize("cfg, message", [
    ("t5", r"unknown mixture preset 't5'; presets: \['t5gemma2', 'ul2'\]"),
    ([], "empty list"),
    ([dict(name="R", kind="spam")], r"entry 0 \('R'\): denoiser 'R': kind='spam' is not one of"),
    ([dict(name="R", kind="span", noise_density=1.2)], r"entry 0 \('R'\).*noise_density=1.2 must"),
    ([dict(name="R", kind="span", noise_density=0)], r"entry 0 \('R'\).*noise_density=0 must"),
    ([dict(name="R", kind="span", mean_span_length=0.5)], r"mean_span_length=0.5 must be a finite"),
    ([dict(name="R", kind="span"), dict(name="X", kind="span", weight=0)],
     r"entry 1 \('X'\): weight=0 must be a positive"),
    ([dict(name="R", kind="span", rate=.1)], r"entry 0 \('R'\): unknown field\(s\) \['rate'\]"),
    ([dict(kind="span")], r"entry 0 \('\?'\): missing field 'name'"),
    ([dict(name="S", kind="prefix", prefix_split="half")], r"prefix_split='half' is not one of"),
    ([dict(name="R", kind="span"), dict(name="R", kind="span")], "names .* must be distinct"),
    ([dict(name="X", kind="span", mean_span_length=1, noise_density=.6)],
     "fewer kept tokens than noise spans"),
    ({"preset": "ul2", "mode_tokens": "t5"}, "mode_tokens='t5' is not one of"),
    ({"mixture": "ul2"}, "a mapping needs 'preset'"),
    (3, "must be a preset name"),
])
def test_bad_mixture_configs_name_the_entry_and_field(cfg, message):
    with pytest.raises(DenoiserError, match=message):
        mixture_from_config(cfg)
