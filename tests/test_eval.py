"""Held-out evaluation (t5g2/train/eval.py, launch/eval.py): fixed held-out batches per denoiser,
losses against an independent computation, the figures logged during training, and launch.eval
reproducing them from the checkpoint."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from t5g2 import sharding
from t5g2.configlib import ConfigError
from t5g2.model import ModelConfig
from t5g2.model.transformer import T5Gemma2
from t5g2.train import eval as evaluation
from t5g2.train import loop
from t5g2.train.checkpoint import CheckpointError
from t5g2.train.config import TrainConfig
from t5g2.train.export import load_run, run_vocabulary
from t5g2.train.samples import Sample, decode, packed_examples
from t5g2.generate import generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DENOISERS = ("R1", "X1", "X2", "X3", "S")  # the t5gemma2 mixture
TRAINING_DOCS, HELDOUT_DOCS = 24, 6


LETTERS, DIGITS = "abcdefghijklmnopqrstuvwxyz", "0123456789"


def _corpus(path, alphabets) -> str:
    """A text file of documents of random words, one document per alphabet: training documents
    of lower-case letters and held-out ones of digits, so any held-out token in a training batch
    (or the reverse) shows in the decoded text."""
    rng = np.random.default_rng(len(alphabets))
    docs = [" ".join("".join(rng.choice(list(alphabet), size=rng.integers(2, 7)))
                     for _ in range(40)) for alphabet in alphabets]
    path.write_text("\n\n".join(docs) + "\n")
    return str(path)


def _config(tmp_path, cache_dir, steps=4, separate_files=False):
    """Training on 24 documents; held out: the same file's last 6, or a file of 6 of its own."""
    config = tiny.get_config()
    config.train.steps = steps
    config.train.log_every = 1
    config.train.encoder_length = config.train.decoder_length = 64
    config.model.encoder.num_layers = config.model.decoder.num_layers = 2
    config.peak_flops_per_device = 1e9
    config.checkpoint.every = 2
    config.data.ul2.cache_dir = cache_dir
    config.data.ul2.source_kind = "text"
    config.eval.update(every=2, batches=2)
    if separate_files:
        config.data.ul2.source_paths = (_corpus(tmp_path / "train.txt", [LETTERS] * TRAINING_DOCS),)
        config.eval.holdout_documents = 0
        config.eval.source_paths = (_corpus(tmp_path / "eval.txt", [DIGITS] * HELDOUT_DOCS),)
    else:
        config.data.ul2.source_paths = (_corpus(tmp_path / "corpus.txt", [LETTERS] * TRAINING_DOCS
                                                + [DIGITS] * HELDOUT_DOCS),)
        config.eval.holdout_documents = HELDOUT_DOCS
    return config


def _text(vocab, batch) -> str:
    """The batch's encoder inputs and decoder targets as text, sentinels removed."""
    text = " ".join(vocab.decode(row[row > 0]) for key in ("encoder_input_tokens",
                                                          "decoder_target_tokens")
                    for row in batch[key])
    return re.sub(r"<extra_id_\d+>", " ", text)


@pytest.mark.parametrize("separate_files", [False, True])
def test_heldout_batches_are_fixed_and_never_trained_on(tmp_path, cache_dir, separate_files):
    config = _config(tmp_path, cache_dir, separate_files=separate_files)
    train_cfg = TrainConfig.from_config_dict(config.train)
    first = evaluation.heldout_batches(config, train_cfg)
    again = evaluation.heldout_batches(config, train_cfg)
    assert list(first) == list(DENOISERS)
    for name in DENOISERS:
        assert len(first[name]) == 2
        for a, b in zip(first[name], again[name]):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
        assert not np.array_equal(first[name][0]["encoder_input_tokens"],
                                  first[name][1]["encoder_input_tokens"])

    source = loop.make_source(config, ModelConfig.from_config_dict(config.model), train_cfg)
    vocab = source.vocab
    assert len(source.documents) == TRAINING_DOCS
    held_out = " ".join(_text(vocab, b) for batches in first.values() for b in batches)
    assert re.search(r"\d", held_out) and not re.search(r"[a-z]", held_out)
    # more than an epoch of the 24 training documents (each batch holds 8 chunks of <= 64 tokens)
    trained = " ".join(_text(vocab, next(source)) for _ in range(12))
    source.close()
    assert re.search(r"[a-z]", trained) and not re.search(r"\d", trained)


def _reference_sums(model, batch) -> tuple[float, float, float]:
    """Cross-entropy, correct and target-token sums in numpy from the model's logits."""
    logits = np.asarray(model(batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                              **{k: batch[k] for k in ("encoder_segment_ids",
                                                       "encoder_positions",
                                                       "decoder_segment_ids",
                                                       "decoder_positions")}), np.float64)
    targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    correct = logits.argmax(-1) == targets
    return float((nll * weights).sum()), float((correct * weights).sum()), float(weights.sum())


@pytest.mark.parametrize("loss_chunk", [0, 24])
def test_losses_equal_an_independent_computation(tmp_path, cache_dir, loss_chunk):
    config = _config(tmp_path, cache_dir)
    train_cfg = TrainConfig.from_config_dict(config.train)
    model_cfg = ModelConfig.from_config_dict(config.model)
    model = T5Gemma2(model_cfg, rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(model, nnx.Param)
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    shardings = sharding.param_shardings(params, mesh)
    batches = evaluation.heldout_batches(config, train_cfg)
    evaluator = evaluation.Evaluator(
        batches, evaluation.make_eval_step(model_cfg, mesh, shardings, loss_chunk), mesh)
    got = evaluator(jax.device_put(params, shardings))

    total = np.zeros(3)
    for name, denoiser_batches in batches.items():
        sums = np.sum([_reference_sums(model, b) for b in denoiser_batches], axis=0)
        total += sums
        assert got[f"eval/{name}/loss"] == pytest.approx(sums[0] / sums[2], rel=1e-5)
        assert got[f"eval/{name}/accuracy"] == pytest.approx(sums[1] / sums[2], abs=1e-6)
    assert got["eval/loss"] == pytest.approx(total[0] / total[2], rel=1e-5)
    assert got["eval/accuracy"] == pytest.approx(total[1] / total[2], abs=1e-6)
    assert 5.5 < got["eval/loss"] < 7.0  # about log(512): a random model, real targets


@pytest.mark.slow  # by default: test_losses_equal_an_independent_computation checks the figures
def test_training_logs_eval_and_launch_eval_reproduces_it(tmp_path, cache_dir):
    config = _config(tmp_path, cache_dir, steps=4)
    config.eval.every = 3  # at step 3 and at the end
    config.eval.samples = 1
    config.checkpoint.every = 3
    workdir = tmp_path / "run"
    result = loop.train(config, str(workdir))
    assert result.step == 4
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]  # one line per step
    keys = {f"eval/{d}/{m}" for d in DENOISERS for m in ("loss", "accuracy")} | {
        "eval/loss", "eval/accuracy"}
    logged = {x["step"]: {k: v for k, v in x.items() if k.startswith("eval/")} for x in lines}
    assert {s: set(v) for s, v in logged.items()} == {1: set(), 2: set(), 3: keys, 4: keys}
    assert logged[3] != logged[4]  # the model trained in between
    assert all(0 < logged[4][f"eval/{d}/loss"] < 10 for d in DENOISERS)
    assert {k: result.metrics[k] for k in keys} == logged[4]

    # eval.samples=1: each denoiser's first held-out example (row 0, segment 1), continued
    # greedily by the final model, as generating it alone from the checkpoint does.
    batches = evaluation.heldout_batches(config, TrainConfig.from_config_dict(config.train))
    run = load_run(str(workdir))
    vocab = run_vocabulary(run.config)
    assert [s.denoiser for s in result.samples] == list(DENOISERS)
    for sample in result.samples:
        batch = batches[sample.denoiser][0]
        enc = batch["encoder_input_tokens"][0][batch["encoder_segment_ids"][0] == 1]
        target = batch["decoder_target_tokens"][0][batch["decoder_segment_ids"][0] == 1]
        alone = generate(run.model, enc[None], max_new_tokens=len(target))
        assert sample.input == vocab.decode(enc) and sample.target == vocab.decode(target)
        words = re.sub(r"<extra_id_\d+>|^\[[A-Z]+\]", " ", sample.input)
        assert re.search(r"\d", words) and not re.search(r"[a-z]", words)  # held-out text
        assert sample.generated == decode(vocab, alone.tokens[0, :alone.lengths[0]])

    assert evaluation.evaluate_checkpoint(str(workdir), 3).metrics == logged[3]  # exactly
    proc = subprocess.run([sys.executable, "-m", "launch.eval", "--workdir", str(workdir)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == {"step": 4, **logged[4]}  # exactly


def test_a_workdir_without_checkpoints_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints/ directory"):
        evaluation.evaluate_checkpoint(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint: nothing to evaluate"):
        evaluation.evaluate_checkpoint(str(tmp_path))


@pytest.mark.parametrize("change, message", [
    (dict(every=-1), r"eval.every=-1 must be an integer >= 0"),
    (dict(batches=0), r"eval.batches=0 must be an integer >= 1"),
    (dict(holdout_documents=1.5), r"eval.holdout_documents=1.5 must be an integer >= 0"),
    (dict(source_paths=("a.txt",)), r"eval.holdout_documents=16 and eval.source_paths=\('a.txt',\) "
                                    r"are both set"),
    (dict(holdout_documents=0), r"eval.every=100 needs held-out documents: set "
                                r"eval.holdout_documents=N"),
])
def test_bad_eval_config(change, message):
    config = tiny.get_config().to_dict()  # (a ConfigDict refuses a value of another type)
    config["eval"].update(change)
    with pytest.raises(ConfigError, match=message):
        evaluation.enabled(config)


def test_holding_out_every_document_is_an_error():
    with pytest.raises(ConfigError, match=r"eval.holdout_documents=3 leaves no training "
                                          r"documents: the source has 3"):
        evaluation.split_documents(["a", "b", "c"], 3)
    train, held = evaluation.split_documents(["a", "b", "c", "d"], 1)
    assert list(train) == ["a", "b", "c"] and list(held) == ["d"] and held[-1] == "d"


def test_synthetic_runs_do_not_evaluate():
    config = tiny.get_config()
    config.data.source = "synthetic"
    assert not evaluation.enabled(config)
    assert evaluation.due(100, 100, 300) and evaluation.due(300, 100, 300)
    assert not evaluation.due(150, 100, 300) and not evaluation.due(100, 0, 300)


def test_the_step_timer_leaves_an_evaluation_out():
    from t5g2.train.metrics import StepTimer

    timer = StepTimer(tokens_per_step=10, clock=iter([0.0, 1.0, 5.0, 6.0]).__next__)
    timer.start(0)  # t = 0
    with timer.excluded():  # t = 1 .. 5: an evaluation
        pass
    assert timer.measure(2)["step_time_s"] == (6.0 - 4.0) / 2  # t = 6, two steps


def test_packed_examples_are_read_in_row_then_segment_order():
    seg = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    batch = dict(encoder_input_tokens=np.arange(12).reshape(2, 6) + 10,
                 encoder_segment_ids=seg,
                 decoder_target_tokens=np.arange(12).reshape(2, 6) + 50,
                 decoder_segment_ids=np.array([[1, 2, 2, 0, 0, 0], [1, 1, 0, 0, 0, 0]]))
    got = [(e.tolist(), t.tolist()) for e, t in packed_examples(batch, 3)]
    assert got == [([10, 11], [50]), ([12, 13, 14], [51, 52]), ([16, 17, 18, 19], [56, 57])]
    assert len(packed_examples(batch, 2)) == 2


def test_a_sample_renders_as_three_aligned_lines():
    text = Sample("X1", "a\nb", "c" * 400, "").render(width=20).splitlines()
    assert text == ["[X1] input:     a⏎b", "     target:    " + "c" * 19 + "…",
                    "     generated: "]


def test_ids_beyond_the_tokenizer_read_as_their_number(cache_dir):
    from t5g2.data.vocab import default_vocabulary

    vocab = default_vocabulary(vocab_size=480, num_sentinels=10, cache_dir=cache_dir)
    ids = vocab.encode("the data")
    assert decode(vocab, list(ids) + [vocab.size, 7777] + list(ids)) == \
        "the data<id 490><id 7777>the data"  # 480 pieces + 10 sentinels
