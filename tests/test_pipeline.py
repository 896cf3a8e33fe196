"""The grain UL2 pipeline on real text: the batch contract, nothing lost or invented, determinism,
exact resume (0 and 2 worker processes), disjoint shares for 2 JAX processes, and clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from t5g2.configlib import ConfigError

from t5g2.data.denoisers import MIXTURES, merge_back
from t5g2.data.packing import CONTRACT_KEYS
from t5g2.data.pipeline import (PipelineConfig, PipelineConfigError, Ul2Source, document_tokens,
                                sentinels_needed)
from t5g2.data.sources import SourceError, open_documents
from t5g2.data.vocab import VocabularyError, default_vocabulary

REPO = Path(__file__).resolve().parent.parent
LENGTHS = dict(encoder_length=64, decoder_length=64)
VOCAB_SIZE = 512


@pytest.fixture(scope="module")
def short_documents(documents, tmp_path_factory):
    """Paragraphs as documents (~20-150 tokens, like a chunk): chunks often span several."""
    paragraphs = [line for doc in documents[:40] for line in doc.split("\n")]
    path = tmp_path_factory.mktemp("short") / "paragraphs.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return open_documents("text", str(path))


@pytest.fixture(scope="module")
def vocab(cache_dir):
    needed = sentinels_needed(MIXTURES["t5gemma2"], **LENGTHS)
    return default_vocabulary(vocab_size=VOCAB_SIZE, num_sentinels=needed, cache_dir=cache_dir)


def config(cache_dir, **overrides):
    fields = dict(LENGTHS, batch_size=4, seed=0, vocab_size=VOCAB_SIZE, cache_dir=cache_dir)
    return PipelineConfig(**{**fields, **overrides})


def source(cfg, documents, vocab, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return Ul2Source(cfg, documents=documents, vocab=vocab, **kw)


def take(src, n):
    return [next(src) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def segments(batch, side, key):
    """[(row, segment id, tokens)] of one side of a contract batch, row-major."""
    seg = batch[f"{side}_segment_ids"]
    return [(r, s, batch[key][r][seg[r] == s])
            for r in range(seg.shape[0]) for s in np.unique(seg[r]) if s]


def raw_chunks(batches, vocab):
    """Every packed example merged back to the raw tokens it was made from."""
    mode_ids = {vocab.mode_id(t) for t in vocab.mode_tokens}
    chunks = []
    for batch in batches:
        inputs = segments(batch, "encoder", "encoder_input_tokens")
        targets = segments(batch, "decoder", "decoder_target_tokens")
        assert [(r, s) for r, s, _ in inputs] == [(r, s) for r, s, _ in targets]
        for (_, _, i), (_, _, t) in zip(inputs, targets):
            mode = int(i[0]) if int(i[0]) in mode_ids else None
            chunks.append(merge_back(i, t, vocab.sentinel_ids, eos_id=vocab.eos_id,
                                     mode_id=mode))
    return chunks


def assert_tile_the_stream(chunks, stream_docs):
    """The chunks, in some order, are consecutive pieces of the token stream from its start."""
    total = sum(len(c) for c in chunks)
    parts, size, i = [], 0, 0
    while size < total:
        parts.append(stream_docs[i])
        size += len(parts[-1])
        i += 1
    stream = np.concatenate(parts)
    position, left = 0, list(chunks)
    while left:
        found = [k for k, c in enumerate(left)
                 if np.array_equal(stream[position:position + len(c)], c)]
        assert found, f"no chunk continues the stream at token {position}"
        position += len(left.pop(found[0]))
    assert position == total
    return i  # documents touched


# ----------------------------------------------------------------------------- the contract

def test_batches_follow_the_contract(cache_dir, documents, vocab):
    batches = take(source(config(cache_dir), documents, vocab), 4)
    for batch in batches:
        assert set(batch) == set(CONTRACT_KEYS)
        for key, value in batch.items():
            assert value.shape == (4, 64), key
            assert value.dtype == (np.float32 if key == "decoder_loss_weights" else np.int32), key
        for side in ("encoder", "decoder"):
            seg, pos = batch[f"{side}_segment_ids"], batch[f"{side}_positions"]
            for r in range(seg.shape[0]):
                real = seg[r][seg[r] > 0]
                assert real[0] == 1 and np.all(np.diff(real) >= 0) and np.all(np.diff(real) <= 1)
                assert np.all(seg[r][len(real):] == 0)  # padding only at the end
                for s in np.unique(real):
                    np.testing.assert_array_equal(pos[r][seg[r] == s],
                                                  np.arange((seg[r] == s).sum()))
                assert not pos[r][seg[r] == 0].any()
        for enc, dec in zip(batch["encoder_segment_ids"], batch["decoder_segment_ids"]):
            assert set(enc[enc > 0]) == set(dec[dec > 0])  # the same examples on both sides
        for (_, _, dec_in), (_, _, target) in zip(
                segments(batch, "decoder", "decoder_input_tokens"),
                segments(batch, "decoder", "decoder_target_tokens")):
            np.testing.assert_array_equal(dec_in, np.concatenate([[vocab.bos_id], target[:-1]]))
            assert target[-1] == vocab.eos_id
        np.testing.assert_array_equal(batch["decoder_loss_weights"],
                                      batch["decoder_segment_ids"] > 0)
        assert not batch["decoder_input_tokens"][batch["decoder_segment_ids"] == 0].any()


def test_examples_merge_back_into_the_token_stream_with_nothing_lost(cache_dir, documents, vocab):
    src = source(config(cache_dir), documents, vocab)
    batches = take(src, 6)
    chunks = raw_chunks(batches, vocab)
    stream = document_tokens(documents, vocab, seed=0)
    touched = assert_tile_the_stream(chunks, stream)
    # documents are long (~1500 tokens) next to a chunk (<= ~110 tokens): chunks cut through them
    assert touched < len(chunks)
    consumed = src.consumed()
    total = sum(len(c) for c in chunks)
    assert consumed["tokens"] == total
    assert consumed["examples"] == len(chunks)
    ends = np.cumsum([len(stream[i]) for i in range(touched)])
    assert consumed["documents"] == np.sum(ends <= total)  # documents read to their end


def test_a_document_longer_than_any_example_is_split_across_examples(cache_dir, documents,
                                                                     vocab, tmp_path):
    path = tmp_path / "one_long_document.txt"
    path.write_text("\n".join(documents[:10]), encoding="utf-8")  # no blank line: one document
    long_document = open_documents("text", str(path))
    assert len(long_document) == 1 and len(vocab.encode(long_document[0])) > 20 * 128
    src = source(config(cache_dir), long_document, vocab)
    batches = take(src, 6)
    chunks = raw_chunks(batches, vocab)
    assert assert_tile_the_stream(chunks, document_tokens(long_document, vocab, seed=0)) == 1
    assert src.consumed()["documents"] == 0 and len(chunks) >= 24


def test_all_denoisers_are_used_with_their_mode_tokens(cache_dir, documents, vocab):
    batches = take(source(config(cache_dir), documents, vocab), 8)
    firsts = [int(i[0]) for b in batches for _, _, i in segments(b, "encoder",
                                                                  "encoder_input_tokens")]
    counts = {t: firsts.count(vocab.mode_id(t)) for t in vocab.mode_tokens}
    assert sum(counts.values()) == len(firsts)  # every example starts with a mode token
    assert all(counts.values()), counts  # [R], [X] and [S] all occur
    assert counts["[S]"] > counts["[R]"]  # S has weight 4 of 8, R 1 of 8


def test_unpacked_mode_puts_one_example_per_row(cache_dir, documents, vocab):
    batches = take(source(config(cache_dir, pack=False), documents, vocab), 3)
    for batch in batches:
        assert batch["encoder_segment_ids"].max() == batch["decoder_segment_ids"].max() == 1
    assert_tile_the_stream(raw_chunks(batches, vocab), document_tokens(documents, vocab, seed=0))


# ---------------------------------------------------------------------- determinism, resume

def test_same_seed_same_batches_other_seed_other_batches(cache_dir, documents, vocab):
    first = take(source(config(cache_dir), documents, vocab), 3)
    assert_same(first, take(source(config(cache_dir), documents, vocab), 3))
    other = take(source(config(cache_dir, seed=1), documents, vocab), 3)
    assert not np.array_equal(first[0]["encoder_input_tokens"], other[0]["encoder_input_tokens"])


def test_resume_from_any_batch_gives_exactly_the_next_batches(cache_dir, short_documents,
                                                              vocab):
    cfg = config(cache_dir)
    src = source(cfg, short_documents, vocab)
    states, batches = [], []
    for _ in range(12):
        states.append(json.loads(json.dumps(src.get_state())))  # JSON-able
        batches.append(next(src))
    assert src.consumed()["documents"] > 20  # restored inside, at and across document ends
    for step, state in enumerate(states[:-1]):
        restored = source(cfg, short_documents, vocab)
        restored.set_state(state)
        assert_same(take(restored, 2), batches[step:step + 2])
    assert max(len(json.dumps(s)) for s in states) < 4000  # positions, not buffered tokens


def test_workers_and_threads_change_neither_batches_nor_resume(cache_dir, short_documents, vocab):
    reference = take(source(config(cache_dir, read_threads=0), short_documents, vocab), 7)
    cfg = config(cache_dir, num_workers=2, read_threads=2)
    src = source(cfg, short_documents, vocab)
    try:
        first = take(src, 4)
        state = json.loads(json.dumps(src.get_state()))
        rest = take(src, 3)
    finally:
        src.close()
    assert_same(first + rest, reference)  # the same batches as without workers
    restored = source(cfg, short_documents, vocab)
    try:
        restored.set_state(state)
        assert_same(take(restored, 3), rest)
    finally:
        restored.close()


def test_a_state_only_restores_into_the_same_pipeline(cache_dir, documents, vocab):
    src = source(config(cache_dir), documents, vocab)
    next(src)
    state = src.get_state()
    with pytest.raises(ValueError, match="different pipeline: seed=0 \\(now 5\\)"):
        source(config(cache_dir, seed=5), documents, vocab).set_state(state)
    with pytest.raises(ValueError, match="num_workers=0 \\(now 2;"):
        source(config(cache_dir, num_workers=2), documents, vocab).set_state(state)
    with pytest.raises(ValueError, match="shards=2, but this run's data order was saved with 1"):
        source(config(cache_dir, shards=2), documents, vocab).set_state(state)
    with pytest.raises(ValueError, match=r"process 1 of 2 needs data shard\(s\) \[1\] of 2; the "
                                         r"saved states hold \[0\]"):
        process_0 = source(config(cache_dir), documents, vocab, process_count=2)
        source(config(cache_dir), documents, vocab, process_index=1,
               process_count=2).set_state(process_0.get_state())


def _global_batches(sources, n):
    """The next n global batches of processes `sources` (in process order): their rows stacked."""
    per_process = [take(src, n) for src in sources]
    return [{k: np.concatenate([b[i][k] for b in per_process]) for k in per_process[0][0]}
            for i in range(n)]


def test_a_position_continues_exactly_on_any_process_count(cache_dir, short_documents, vocab):
    """Saved by 3 processes (3 data shards): 1, 2 (rows straddling shards) and 6 processes (two
    per shard) continue with exactly the global batches the 3 would have made next."""
    cfg = config(cache_dir, batch_size=6)
    saving = [source(cfg, short_documents, vocab, process_index=p, process_count=3)
              for p in range(3)]
    _global_batches(saving, 3)
    states = [json.loads(json.dumps(src.get_state())) for src in saving]
    expected = _global_batches(saving, 2)  # the 3 processes' own next batches
    assert not np.array_equal(expected[0]["encoder_input_tokens"][:2],
                              expected[0]["encoder_input_tokens"][2:4])  # the shards differ
    for count in (1, 2, 6):
        resumed = [source(cfg, short_documents, vocab, process_index=p, process_count=count)
                   for p in range(count)]
        for src in resumed:
            src.restore_position(states)
            assert src.shards == 3
        assert_same(_global_batches(resumed, 2), expected)
    shared = [s.get_state() for s in resumed]  # 6 processes: each shard's position twice
    shared[1]["positions"]["0"] = states[0]["positions"]["0"]  # one of them stale
    with pytest.raises(ValueError, match="different positions of data shard 0"):
        source(cfg, short_documents, vocab).restore_position(shared)


def test_shards_fix_the_global_batches_whatever_the_process_count(cache_dir, short_documents,
                                                                   vocab):
    three = [source(config(cache_dir, batch_size=6), short_documents, vocab, process_index=p,
                    process_count=3) for p in range(3)]
    one = source(config(cache_dir, batch_size=6, shards=3), short_documents, vocab)
    assert_same(take(one, 2), _global_batches(three, 2))
    with pytest.raises(PipelineConfigError, match="batch_size=4 .* not divisible by shards=3"):
        source(config(cache_dir, shards=3), short_documents, vocab)


def test_a_pre_shard_state_restores_as_its_process_shard(cache_dir, short_documents, vocab):
    """A state this pipeline saved before shards existed (format 1: one pipeline per process)."""
    cfg = config(cache_dir)
    src = source(cfg, short_documents, vocab, process_index=1, process_count=2)
    take(src, 2)
    state = src.get_state()
    old = {k: v for k, v in state.items() if k not in ("shards", "positions")}
    old.update(format=1, process_index=1, process_count=2, iterator=state["positions"]["1"])
    restored = source(cfg, short_documents, vocab, process_index=1, process_count=2)
    restored.set_state(old)
    assert_same(take(restored, 2), take(src, 2))


# ---------------------------------------------------------------------------- JAX processes

def test_two_processes_read_disjoint_shares_of_one_stream(cache_dir, documents, vocab):
    single = document_tokens(documents, vocab, seed=0)
    shares = [document_tokens(documents, vocab, seed=0, process_index=p, process_count=2)
              for p in (0, 1)]
    n = len(documents)
    for i in range(n):  # one epoch: every document exactly once, alternating between processes
        np.testing.assert_array_equal(shares[i % 2][i // 2], single[i])
    cfg = config(cache_dir)
    for p in (0, 1):
        src = source(cfg, documents, vocab, process_index=p, process_count=2)
        batches = take(src, 3)
        assert batches[0]["encoder_input_tokens"].shape == (2, 64)  # the local half of 4
        assert_tile_the_stream(raw_chunks(batches, vocab), shares[p])


_TWO_PROCESS_SCRIPT = """
import json, sys
import numpy as np
from t5g2 import distributed
distributed.initialize()
import jax
from t5g2.data.pipeline import PipelineConfig, Ul2Source
cfg = PipelineConfig.from_mapping(json.loads(sys.argv[1]))
src = Ul2Source(cfg)  # process index and count from JAX
batches = [next(src) for _ in range(2)]
np.savez(sys.argv[2], process=[jax.process_index(), jax.process_count()],
         **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
"""


def test_two_real_jax_processes_get_the_simulated_shares(cache_dir, documents, vocab, tmp_path):
    from tests.test_multihost import _env, _free_port
    cfg = config(cache_dir)
    fields = {k: v for k, v in cfg.describe().items()}
    cluster = dict(T5G2_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", T5G2_NUM_PROCESSES="2")
    procs = [subprocess.Popen(
        [sys.executable, "-c", _TWO_PROCESS_SCRIPT, json.dumps(fields), str(tmp_path / f"{p}.npz")],
        cwd=REPO, env=_env(1, **cluster, T5G2_PROCESS_ID=str(p)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for p in (0, 1)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-3000:]
    for p in (0, 1):
        got = np.load(tmp_path / f"{p}.npz")
        assert list(got["process"]) == [p, 2]
        want = take(source(cfg, documents, vocab, process_index=p, process_count=2), 2)
        for i, batch in enumerate(want):
            for key, value in batch.items():
                np.testing.assert_array_equal(got[f"{i}/{key}"], value, err_msg=key)


# ---------------------------------------------------------------------------- bad input

def test_too_few_sentinels_fail_before_any_batch(cache_dir, documents):
    small = default_vocabulary(vocab_size=VOCAB_SIZE, num_sentinels=2, cache_dir=cache_dir)
    with pytest.raises(VocabularyError, match="needs \\d+ sentinels but the vocabulary has 2"):
        source(config(cache_dir), documents, small)
    with pytest.raises(VocabularyError, match="but the vocabulary has 3"):
        Ul2Source(config(cache_dir, num_sentinels=3), documents=documents, process_index=0,
                  process_count=1)


@pytest.mark.parametrize("lengths, message", [
    ((64, 8), "encoder_length=64, decoder_length=8: denoiser R1 .* makes targets of 14 tokens, "
              "more than targets_length=8; use targets_length >= 14"),
    ((2, 64), "encoder_length=2, decoder_length=64: denoiser R1 .* use inputs_length >= 4"),
])
def test_lengths_too_small_for_a_denoiser_are_named(cache_dir, documents, vocab, lengths,
                                                    message):
    cfg = config(cache_dir, encoder_length=lengths[0], decoder_length=lengths[1])
    with pytest.raises(PipelineConfigError, match=message):
        source(cfg, documents, vocab)
    with pytest.raises(PipelineConfigError, match=message):  # before building a vocabulary
        Ul2Source(cfg, documents=documents, process_index=0, process_count=1)


@pytest.mark.parametrize("field, value, message", [
    ("encoder_length", 0, "encoder_length=0 must be an integer >= 1"),
    ("batch_size", 3, "batch_size=3 \\(global\\) is not divisible by the 2 JAX processes"),
    ("num_workers", -1, "num_workers=-1 must be an integer >= 0"),
    ("packing_bins", 0, "packing_bins=0 must be an integer >= 1"),
])
def test_bad_configs_name_the_field(cache_dir, field, value, message):
    with pytest.raises(PipelineConfigError, match=message):
        config(cache_dir, **{field: value}).validate(process_count=2)


def test_unknown_config_keys_are_named():
    with pytest.raises(ConfigError, match="unknown field\\(s\\) data.ul2.batchsize; valid: "):
        PipelineConfig.from_mapping(dict(batchsize=8))
    cfg = PipelineConfig.from_mapping(dict(source_paths=["a.txt"], batch_size=2))
    assert cfg.source_paths == ("a.txt",) and cfg.batch_size == 2


def test_bad_documents_are_named_or_skipped_and_counted(cache_dir, tmp_path, vocab):
    corpus = open(open_documents("embedded", cache_dir=cache_dir).paths[0], "rb").read()
    good = corpus.split(b"\n\n")[:12]
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"\n\n".join(good[:8] + [b"bad \xff byte here", b"   "] + good[8:]))
    base = dict(source_kind="text", source_paths=(str(path),))
    with pytest.raises(SourceError, match="mixed.txt: line \\d+: not valid UTF-8"):
        Ul2Source(config(cache_dir, **base), vocab=vocab, process_index=0, process_count=1)
    src = Ul2Source(config(cache_dir, **base, on_bad="skip"), vocab=vocab, process_index=0,
                    process_count=1)
    assert src.documents.skipped == {"non_utf8": 1}
    batches = take(src, 3)
    assert_tile_the_stream(raw_chunks(batches, vocab),
                           document_tokens(src.documents, vocab, seed=0))
