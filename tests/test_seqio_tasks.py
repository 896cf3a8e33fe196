"""seqio Tasks and Mixture running the same numpy denoisers with the same vocabulary ids, and the
seqio reader in the batch contract. TensorFlow is imported here only (the grain path stays
TF-free, checked in a subprocess)."""

import collections
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from t5g2.data.denoisers import MIXTURES, merge_back, spans_needed
from t5g2.data.packing import CONTRACT_KEYS
from t5g2.data.sources import open_documents
from t5g2.data.vocab import VocabularyError, default_vocabulary

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")
from t5g2.data.seqio_tasks import SeqioSource, register_ul2_tasks, task_name  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LENGTHS = dict(inputs_length=64, targets_length=64)
MIXTURE = MIXTURES["t5gemma2"]
NUM_DOCUMENTS = 24


@pytest.fixture(scope="module")
def vocab(cache_dir):
    needed = max(spans_needed(d, **LENGTHS) for d in MIXTURE.denoisers)
    return default_vocabulary(vocab_size=512, num_sentinels=needed, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def texts(cache_dir):
    docs = open_documents("embedded", cache_dir=cache_dir)
    return [docs[i] for i in range(NUM_DOCUMENTS)]


@pytest.fixture(scope="module")
def mixture_name(vocab, texts):
    def text_source(split, shuffle_files, seed=None):
        return tf.data.Dataset.from_tensor_slices({"text": texts})
    return register_ul2_tasks("t5g2_test_ul2", vocab=vocab, text_source=text_source,
                              mixture=MIXTURE, seed=0, **LENGTHS)


def token_stream(vocab, texts):
    """What t5g2's own vocabulary makes of the documents: tokens, EOS after each document."""
    return np.concatenate([np.append(vocab.encode(t), vocab.eos_id) for t in texts])


def task_examples(name, **kw):
    task = seqio.get_mixture_or_task(name)
    ds = task.get_dataset({"inputs": 64, "targets": 64}, split="train", shuffle=False,
                          num_epochs=1, seed=kw.pop("seed", 1), **kw)
    return list(ds.as_numpy_iterator())


def mode_ids(vocab):
    return {vocab.mode_id(t): t for t in vocab.mode_tokens}


@pytest.mark.parametrize("denoiser", MIXTURE.denoisers, ids=lambda d: d.name)
def test_task_examples_merge_back_to_t5g2s_token_stream(denoiser, mixture_name, vocab, texts):
    examples = task_examples(task_name(mixture_name, denoiser))
    mode_id = vocab.mode_id(denoiser.mode_token)
    merged = []
    for ex in examples:
        assert ex["inputs"][0] == mode_id
        assert len(ex["inputs"]) <= 64 and len(ex["targets"]) <= 64
        merged.append(merge_back(ex["inputs"], ex["targets"], vocab.sentinel_ids,
                                 eos_id=vocab.eos_id, mode_id=mode_id))
    stream = token_stream(vocab, texts)
    merged = np.concatenate(merged)
    assert len(stream) - 1 <= len(merged) <= len(stream)  # at most a final 1-token chunk
    np.testing.assert_array_equal(merged, stream[:len(merged)])


def test_seqio_vocabulary_gives_t5g2s_ids(vocab, texts):
    seqio_vocab = vocab.seqio_vocabulary()
    assert seqio_vocab.vocab_size == vocab.size
    np.testing.assert_array_equal(seqio_vocab.encode(texts[0]), vocab.encode(texts[0]))
    for token, i in zip(vocab.mode_tokens, map(vocab.mode_id, vocab.mode_tokens)):
        assert seqio_vocab.encode(token) == [i]


def test_shards_read_disjoint_documents(mixture_name, vocab, texts):
    s = MIXTURE.denoisers[-1]
    for index in range(2):
        examples = task_examples(task_name(mixture_name, s),
                                 shard_info=seqio.ShardInfo(index, 2))
        merged = np.concatenate([merge_back(e["inputs"], e["targets"], vocab.sentinel_ids,
                                            eos_id=vocab.eos_id, mode_id=vocab.mode_id("[S]"))
                                 for e in examples])
        stream = token_stream(vocab, texts[index::2])
        np.testing.assert_array_equal(merged, stream[:len(merged)])
        assert len(merged) >= len(stream) - 1


def test_the_mixture_samples_every_task_with_its_weight(mixture_name, vocab):
    """Denoisers are told apart by mode token and sentinel count (R1: 3, X1: 5, X2: 1, X3: 2
    spans at 64/64); full-length examples only."""
    mixture = seqio.get_mixture_or_task(mixture_name)
    ds = mixture.get_dataset({"inputs": 64, "targets": 64}, split="train", shuffle=False,
                             num_epochs=None, seed=5)
    modes = mode_ids(vocab)
    kinds = collections.Counter()
    for ex in ds.take(400).as_numpy_iterator():
        spans = int(np.isin(ex["inputs"], vocab.sentinel_ids).sum())
        kinds[(modes[int(ex["inputs"][0])], spans)] += 1
    expected = {("[R]", 3), ("[X]", 5), ("[X]", 1), ("[X]", 2), ("[S]", 1)}
    assert expected <= set(kinds), kinds
    full = sum(kinds[k] for k in expected)
    assert full >= 390
    assert kinds[("[S]", 1)] / full == pytest.approx(0.5, abs=0.08)
    assert kinds[("[R]", 3)] / full == pytest.approx(0.125, abs=0.05)


def test_seqio_source_yields_the_batch_contract(mixture_name, vocab):
    with SeqioSource(mixture_name, batch_size=4, seed=3, **LENGTHS) as source:
        batches = [next(source) for _ in range(3)]
    for batch in batches:
        assert set(batch) == set(CONTRACT_KEYS)
        for key, value in batch.items():
            assert value.shape == (4, 64), key
            assert value.dtype == (np.float32 if key == "decoder_loss_weights" else np.int32)
        segs, pos = batch["decoder_segment_ids"], batch["decoder_positions"]
        for r in range(4):
            for s in np.unique(segs[r][segs[r] > 0]):
                where = segs[r] == s
                np.testing.assert_array_equal(pos[r][where], np.arange(where.sum()))
                target = batch["decoder_target_tokens"][r][where]
                np.testing.assert_array_equal(batch["decoder_input_tokens"][r][where],
                                              np.concatenate([[vocab.bos_id], target[:-1]]))
                assert target[-1] == vocab.eos_id
            assert set(segs[r][segs[r] > 0]) == set(
                batch["encoder_segment_ids"][r][batch["encoder_segment_ids"][r] > 0])
        np.testing.assert_array_equal(batch["decoder_loss_weights"], segs > 0)
        assert not batch["decoder_input_tokens"][segs == 0].any()


def test_seqio_source_is_deterministic_and_resumes_exactly(mixture_name):
    with SeqioSource(mixture_name, batch_size=2, seed=7, **LENGTHS) as a:
        first = [next(a) for _ in range(2)]
        state = a.get_state()
        rest = [next(a) for _ in range(2)]
    with SeqioSource(mixture_name, batch_size=2, seed=7, **LENGTHS) as b:
        b.set_state(state)  # a fresh pipeline with the same seed, 2 batches skipped
        resumed = [next(b) for _ in range(2)]
    for x, y in zip(rest, resumed):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    assert not np.array_equal(first[0]["encoder_input_tokens"], rest[0]["encoder_input_tokens"])
    other = SeqioSource(mixture_name, batch_size=2, seed=8, **LENGTHS)
    with pytest.raises(ValueError, match="seed=7 \\(now 8\\)"):
        other.set_state(state)


def test_registration_checks_sentinels_and_sources(vocab, cache_dir, tmp_path):
    few = default_vocabulary(vocab_size=512, num_sentinels=2, cache_dir=cache_dir)
    with pytest.raises(VocabularyError, match="needs 5 sentinels but the vocabulary has 2"):
        register_ul2_tasks("t5g2_test_few", vocab=few, text_source=str(tmp_path / "x"),
                           mixture=MIXTURE, **LENGTHS)
    with pytest.raises(FileNotFoundError, match="no file matches"):
        register_ul2_tasks("t5g2_test_missing", vocab=vocab,
                           text_source=str(tmp_path / "none-*.txt"), mixture=MIXTURE, **LENGTHS)


def test_text_line_files_are_a_source(vocab, texts, tmp_path):
    lines = [t.replace("\n", " ") for t in texts[:6]]
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(lines) + "\n")  # blank lines separate documents
    name = register_ul2_tasks("t5g2_test_lines", vocab=vocab, text_source=str(path),
                              mixture="t5gemma2", **LENGTHS)
    s = MIXTURE.denoisers[-1]
    examples = task_examples(task_name(name, s))
    merged = np.concatenate([merge_back(e["inputs"], e["targets"], vocab.sentinel_ids,
                                        eos_id=vocab.eos_id, mode_id=vocab.mode_id("[S]"))
                             for e in examples])
    stream = token_stream(vocab, lines)
    assert len(merged) >= len(stream) - 1
    np.testing.assert_array_equal(merged, stream[:len(merged)])


def test_the_grain_path_never_imports_tensorflow():
    code = ("import sys, t5g2.data, t5g2.data.pipeline, t5g2.data.packing, t5g2.data.denoisers, "
            "t5g2.data.sources, t5g2.data.vocab, t5g2.data.corpus; "
            "print(sorted(m for m in ('tensorflow', 'seqio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _seqio_run_config(task, steps):
    """The 2-layer test model (lengths 64 / 64, batch 8) trained on a registered seqio mixture
    (the model's vocabulary_size below its vocabulary's is refused by name: checked here too)."""
    from tests.test_checkpoint import _small_config

    config = _small_config(steps)
    config.data.source = "seqio"
    config.data.seqio.task = task
    config.train.encoder_length = config.train.decoder_length = 64
    # the fixture's vocabulary: 512 pieces + 5 sentinels; the model's special ids above them
    config.model.update(vocab_size=640, eoi_token_id=600, image_token_id=601)
    return config


def _logged(workdir):
    import json

    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_training_reads_a_registered_mixture(mixture_name, tmp_path):
    """data.source=seqio: the loop trains on the batches SeqioSource gives for the run's
    lengths, batch and seed (each step's target-token count is that batch's)."""
    from t5g2.train import loop

    result = loop.train(_seqio_run_config(mixture_name, 2), str(tmp_path / "run"))
    assert result.step == 2 and result.checkpoint
    with SeqioSource(mixture_name, batch_size=8, seed=0, **LENGTHS) as source:
        batches = [next(source) for _ in range(2)]
    assert [x["target_tokens"] for x in _logged(tmp_path / "run")] == [
        float((b["decoder_loss_weights"] > 0).sum()) for b in batches]


@pytest.mark.slow
def test_a_seqio_run_resumes_exactly(mixture_name, tmp_path):
    """A run stopped at step 2 and continued to 4 logs what an uninterrupted 4-step run logs."""
    from t5g2.train import loop

    loop.train(_seqio_run_config(mixture_name, 4), str(tmp_path / "whole"))
    loop.train(_seqio_run_config(mixture_name, 2), str(tmp_path / "parts"))
    loop.train(_seqio_run_config(mixture_name, 4), str(tmp_path / "parts"))
    whole, parts = _logged(tmp_path / "whole"), _logged(tmp_path / "parts")
    assert [x["step"] for x in parts] == [1, 2, 3, 4]
    for a, b in zip(whole, parts):
        assert (a["loss"], a["target_tokens"]) == (b["loss"], b["target_tokens"])


@pytest.mark.parametrize("change, message", [
    (dict(task=None), r"data.source='seqio' needs data.seqio.task"),
    (dict(task="no_such_task"), r"data.seqio.task='no_such_task' is not a registered seqio "
                                r"task or mixture; name the module"),
    (dict(task="t5g2_test_ul2", modules=("no_such_module_t5g2",)),
     r"data.seqio.modules: cannot import 'no_such_module_t5g2'"),
])
def test_a_bad_seqio_source_is_one_clear_error(mixture_name, tmp_path, change, message):
    from t5g2.configlib import ConfigError
    from t5g2.train import loop

    config = _seqio_run_config(mixture_name, 1)
    config.data.seqio.update(change)
    with pytest.raises(ConfigError, match=message):
        loop.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
