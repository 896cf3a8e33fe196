"""Vocabulary: deterministic training, round trips, sentinel and mode ids, seqio, Gemma models."""

import os
import pickle

import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2

from t5g2.data import vocab as vocab_lib
from t5g2.data.corpus import embedded_corpus_path
from t5g2.data.vocab import (UL2_MODE_TOKENS, Vocabulary, VocabularyError, default_vocabulary,
                             train_sentencepiece, unused_piece)

NUM_SENTINELS = 100
GEMMA_UNUSED = 300


@pytest.fixture(scope="module")
def training_texts(documents):
    """The first ~300 KB of the corpus; the rest is held-out text for the round trips."""
    texts, size = [], 0
    for doc in documents:
        texts.append(doc)
        size += len(doc)
        if size > 300_000:
            return texts
    raise AssertionError("embedded corpus smaller than 300 KB")


@pytest.fixture(scope="module")
def model_file(training_texts, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("spm") / "tiny")
    return train_sentencepiece(training_texts, prefix, vocab_size=512)


@pytest.fixture(scope="module")
def vocab(model_file):
    return Vocabulary.from_file(model_file, num_sentinels=NUM_SENTINELS)


@pytest.fixture(scope="module")
def gemma_like_file(training_texts, tmp_path_factory):
    """A Gemma 3-style model: reserved <unused0>..<unused299> pieces, "[R]" etc. not pieces."""
    prefix = str(tmp_path_factory.mktemp("spm") / "gemma_like")
    return train_sentencepiece(training_texts[:40], prefix, vocab_size=700, mode_tokens=(),
                               user_defined_symbols=[unused_piece(k) for k in range(GEMMA_UNUSED)])


def piece_types(model_file):
    proto = sentencepiece_model_pb2.ModelProto.FromString(open(model_file, "rb").read())
    return [p.type for p in proto.pieces]


def test_training_is_deterministic(training_texts, model_file, tmp_path):
    again = train_sentencepiece(training_texts, str(tmp_path / "other_name"), vocab_size=512)
    assert again == str(tmp_path / "other_name.model")
    assert open(again, "rb").read() == open(model_file, "rb").read()
    assert os.listdir(tmp_path) == ["other_name.model"]  # written atomically, no leftovers


def test_round_trip_on_held_out_text(vocab, documents):
    held_out = documents[len(documents) // 2:]
    unusual = ["naïve café — 数字 ∑ 😀 \t tabs  and  spaces\n", " leading space"]
    texts = held_out[::7] + unusual
    for text in texts:
        ids = vocab.encode(text)
        assert ids.dtype == np.int32 and ids.size > 0
        assert ids.min() >= 0 and ids.max() < vocab.sp_size  # sentinels are never produced
        assert vocab.unk_id not in ids  # byte fallback: everything encodes
        assert vocab.decode(ids) == text
    many = vocab.encode_many(texts[:3])
    assert all(np.array_equal(a, vocab.encode(t)) for a, t in zip(many, texts[:3]))


def test_ids_follow_gemma_and_t5_conventions(vocab, model_file):
    assert (vocab.pad_id, vocab.eos_id, vocab.bos_id, vocab.unk_id) == (0, 1, 2, 3)
    assert vocab.extra_ids == NUM_SENTINELS and vocab.size == vocab.sp_size + NUM_SENTINELS
    assert vocab.sp_size == 512
    assert vocab.sentinel_ids.dtype == np.int32
    assert vocab.sentinel_ids.tolist() == [vocab.size - 1 - k for k in range(NUM_SENTINELS)]
    # Mode tokens are user-defined pieces: never merged into ordinary text pieces.
    types = piece_types(model_file)
    mode_ids = [vocab.mode_id(t) for t in ("[R]", "[X]", "[S]")]
    assert mode_ids == [4, 5, 6]
    assert all(types[i] == sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
               for i in mode_ids)
    assert [vocab.encode(t).tolist() for t in ("[R]", "[X]", "[S]")] == [[i] for i in mode_ids]
    assert vocab.encode("go [S] now").tolist().count(vocab.mode_id("[S]")) == 1
    with pytest.raises(VocabularyError, match=r"mode token '\[NLU\]' is not in this vocabulary"):
        vocab.mode_id("[NLU]")


def test_decode_names_sentinels_and_checks_range(vocab):
    ids = [*vocab.encode("The cat"), vocab.sentinel_ids[0], *vocab.encode(" sat"),
           vocab.sentinel_ids[99], vocab.eos_id, vocab.pad_id]
    assert vocab.decode(np.asarray(ids)) == "The cat<extra_id_0> sat<extra_id_99>"
    with pytest.raises(VocabularyError, match=f"cannot decode id {vocab.size}: ids must be in "
                                              f"\\[0, {vocab.size}\\)"):
        vocab.decode([vocab.size])


def test_require_sentinels_names_needed_and_available(vocab):
    vocab.require_sentinels(NUM_SENTINELS, "R at 512")  # exactly enough: fine
    with pytest.raises(VocabularyError, match="R1 at inputs 16384 needs 910 sentinels but the "
                                              "vocabulary has 100"):
        vocab.require_sentinels(910, "R1 at inputs 16384")


def test_agrees_with_seqio(vocab, model_file, documents):
    seqio = pytest.importorskip("seqio")
    theirs = seqio.SentencePieceVocabulary(model_file, extra_ids=NUM_SENTINELS,
                                           reverse_extra_ids=True)
    ours = vocab.seqio_vocabulary()
    assert (ours.sentencepiece_model_file, ours.extra_ids) == (model_file, NUM_SENTINELS)
    assert theirs.vocab_size == vocab.size
    assert (theirs.pad_id, theirs.eos_id, theirs.unk_id) == (vocab.pad_id, vocab.eos_id,
                                                             vocab.unk_id)
    sentinel_ids = [theirs.tokenizer.piece_to_id(f"▁<extra_id_{k}>")
                    for k in range(NUM_SENTINELS)]
    assert sentinel_ids == vocab.sentinel_ids.tolist()
    for text in [*documents[::25], "[R]", "[X]", "[S]", "[X] Optional[X] text"]:
        ids = vocab.encode(text)
        assert list(theirs.encode(text)) == ids.tolist()
        assert theirs.decode(ids.tolist()) == vocab.decode(ids)


def test_mode_tokens_must_be_single_pieces(model_file):
    with pytest.raises(VocabularyError, match=r"mode token '\[NLU\]' is not a single piece of "
                                              f"{model_file}"):
        Vocabulary.from_file(model_file, num_sentinels=4, mode_tokens=UL2_MODE_TOKENS)
    with pytest.raises(VocabularyError, match="must be distinct non-empty strings"):
        Vocabulary.from_file(model_file, num_sentinels=4, mode_tokens=("[R]", "[R]"))


def test_ul2_mode_tokens_when_trained_with_them(training_texts, tmp_path):
    path = train_sentencepiece(training_texts[:40], str(tmp_path / "ul2"), vocab_size=400,
                               mode_tokens=UL2_MODE_TOKENS)
    v = Vocabulary.from_file(path, num_sentinels=8, mode_tokens=UL2_MODE_TOKENS)
    assert [v.encode(t).tolist() for t in UL2_MODE_TOKENS] == [[4], [5], [6]]


def test_gemma_style_sentinels_are_unused_pieces(gemma_like_file):
    v = Vocabulary.from_file(gemma_like_file, num_sentinels=200)
    assert v.extra_ids == 0 and v.size == v.sp_size == 700
    sp = v._sp
    assert v.sentinel_ids.tolist() == [sp.piece_to_id(unused_piece(k)) for k in range(200)]
    # "[R]" is no piece of this model: mode tokens take <unused299>, <unused298>, ... in order.
    assert [sp.id_to_piece(v.mode_id(t)) for t in ("[R]", "[X]", "[S]")] == [
        "<unused299>", "<unused298>", "<unused297>"]
    assert not set(v.sentinel_ids.tolist()) & {v.mode_id(t) for t in ("[R]", "[X]", "[S]")}
    assert v.decode([v.sentinel_ids[5]]) == "<unused5>"
    # Exactly as many as exist: 297 sentinels + 3 mode tokens.
    assert Vocabulary.from_file(gemma_like_file, num_sentinels=297).num_sentinels == 297
    with pytest.raises(VocabularyError, match="has 300 <unusedN> pieces but 298 sentinels \\+ 3 "
                                              "mode tokens need 301"):
        Vocabulary.from_file(gemma_like_file, num_sentinels=298)


def test_gemma_style_single_piece_modes_and_a_gap_in_the_numbering(training_texts, tmp_path):
    # Like T5Gemma 2's tokenizer, which lacks <unused99>: sentinels are the <unusedN> by N.
    numbers = [n for n in range(21) if n != 7]
    path = train_sentencepiece(training_texts[:40], str(tmp_path / "g"), vocab_size=400,
                               user_defined_symbols=[unused_piece(n) for n in reversed(numbers)])
    v = Vocabulary.from_file(path, num_sentinels=20)  # all 20 unused pieces are sentinels
    assert [v._sp.id_to_piece(int(i)) for i in v.sentinel_ids] == [unused_piece(n)
                                                                   for n in numbers]
    assert [v.mode_id(t) for t in ("[R]", "[X]", "[S]")] == [4, 5, 6]  # already single pieces


def test_vocabulary_pickles_for_worker_processes(vocab):
    copy = pickle.loads(pickle.dumps(vocab))
    text = "Workers rebuild the processor from the model bytes."
    assert np.array_equal(copy.encode(text), vocab.encode(text))
    assert np.array_equal(copy.sentinel_ids, vocab.sentinel_ids) and copy.size == vocab.size


def test_bad_models_and_sizes_are_named(tmp_path, training_texts):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(VocabularyError, match=f"{junk} is not a sentencepiece model"):
        Vocabulary.from_file(str(junk), num_sentinels=1)
    with pytest.raises(VocabularyError, match="cannot read sentencepiece model"):
        Vocabulary.from_file(str(tmp_path / "missing.model"), num_sentinels=1)
    with pytest.raises(VocabularyError, match="vocab_size=200 is too small: 4 special ids, 3 user "
                                              "symbols and 256 byte pieces need at least 264"):
        train_sentencepiece(training_texts, str(tmp_path / "small"), vocab_size=200)
    with pytest.raises(VocabularyError, match="Vocabulary size too high"):
        train_sentencepiece(["tiny text"], str(tmp_path / "big"), vocab_size=5000)
    with pytest.raises(VocabularyError, match="num_sentinels=-1 must be an integer >= 0"):
        Vocabulary.from_file(str(junk), num_sentinels=-1)


def test_default_vocabulary_trains_once_and_caches(cache_dir, monkeypatch):
    first = default_vocabulary(vocab_size=1024, num_sentinels=16, cache_dir=cache_dir)
    assert first.model_file.startswith(cache_dir) and first.sp_size == 1024
    text = open(embedded_corpus_path(cache_dir), encoding="utf-8").read()[:2000]
    assert first.decode(first.encode(text)) == text

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the model is cached")

    monkeypatch.setattr(vocab_lib, "train_sentencepiece", no_training)
    again = default_vocabulary(vocab_size=1024, num_sentinels=32, cache_dir=cache_dir)
    assert again.model_file == first.model_file and again.num_sentinels == 32
    with pytest.raises(AssertionError, match="trained again"):  # other mode tokens: other key
        default_vocabulary(vocab_size=1024, num_sentinels=16, mode_tokens=UL2_MODE_TOKENS,
                           cache_dir=cache_dir)
