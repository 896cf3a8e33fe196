"""lm-evaluation-harness end to end: `python -m launch.lm_eval run --model t5g2` scores a trained
run on local task files (multiple-choice, rolling-loglikelihood and two generation tasks, no
download); every loglikelihood it logs equals the run's own scoring of the same pair, computed
here one row at a time with numpy, and every generation equals t5g2.generate's greedy
continuation of the same encoder input, decoded and cut at the stop string here."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lm_eval.api.instance import Instance

from t5g2.configlib import ConfigError
from t5g2.generate import generate
from t5g2.train.export import load_run, run_vocabulary
from tests.conftest import UL2_RUN_LENGTH as LENGTH  # the run's lengths: lm_eval's windows
from tests.test_multihost import REPO, _env

CHOICES = [{"context": "The data pipeline", "choices": ["packs examples", "eats bananas"],
            "label": 0},
           {"context": "A checkpoint is", "choices": ["saved", "purple"], "label": 0},
           {"context": "", "choices": ["training", "zebra"], "label": 1}]
TEXTS = [{"text": "Return the number of items in a container."},
         {"text": "the model reads every word " * 8}]  # longer than one window
PROMPTS = [{"prompt": "The data pipeline", "answer": "packs"},
           {"prompt": "A checkpoint is saved when the run", "answer": "stops"},
           {"prompt": "", "answer": "nothing"}]
GENERATED_TOKENS = 8  # the "generate" task's max_gen_toks
NEVER = "zq@never-generated"

GENERATE_TASK = """task: t5g2_local_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{{{{{prompt}}}}}}}}"
doc_to_target: "{{{{{{{{answer}}}}}}}}"
{kwargs}metric_list:
  - metric: exact_match
"""

TASKS = {
    "choice": """task: t5g2_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""",
    "rolling": """task: t5g2_local_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
""",
    # stop strings chosen by the test from the reference generation (JSON is YAML)
    "generate": GENERATE_TASK.format(name="generate", kwargs="""generation_kwargs:
  until: {until}
  max_gen_toks: {max_gen_toks}
"""),
    # lm_eval's defaults: until the few-shot delimiter, 256 tokens (capped by the decoder)
    "generate_default": GENERATE_TASK.format(name="generate_default", kwargs=""),
}


@pytest.fixture(scope="module")
def run_dir(ul2_run):
    return ul2_run


def _write_tasks(directory, until=("\n",)) -> None:
    for name, rows in (("choice", CHOICES), ("rolling", TEXTS), ("generate", PROMPTS),
                       ("generate_default", PROMPTS)):
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (directory / f"{name}.yaml").write_text(TASKS[name].format(
            data=data, until=json.dumps(list(until)), max_gen_toks=GENERATED_TOKENS))


def _cut(text, until):
    """The text before the earliest stop string."""
    return min((text.split(stop)[0] for stop in until), key=len)


class Reference:
    """log p(target | context) by the run's model, one row at a time, numpy softmax."""

    def __init__(self, workdir):
        run = load_run(workdir, dtype="float32")
        self.model, self.cfg, self.vocab = run.model, run.model_cfg, run_vocabulary(run.config)

    def encoder_ids(self, context_ids):
        return [self.vocab.mode_id("[S]"), *context_ids[-(LENGTH - 2):], self.vocab.eos_id] \
            if len(context_ids) else [self.vocab.mode_id("[S]"), self.vocab.eos_id]

    def generated(self, contexts, max_new_tokens):
        """The greedy continuations of the contexts (rows right-padded to the run's length),
        their tokens up to EOS and their text."""
        enc = np.zeros((len(contexts), LENGTH), np.int32)  # pad id 0
        for i, context in enumerate(contexts):
            ids = self.encoder_ids([int(t) for t in self.vocab.encode(context)])
            enc[i, :len(ids)] = ids
        out = generate(self.model, enc, max_new_tokens=max_new_tokens)
        tokens = [out.tokens[i, :out.lengths[i]] for i in range(len(contexts))]
        return tokens, [self.vocab.decode(t) for t in tokens]

    def logp(self, context_ids, target_ids):
        enc = self.encoder_ids(context_ids)
        dec = [self.cfg.bos_id, *target_ids[:-1]]
        # one row at the run's lengths (one compile), its padding marked by segment id 0
        row = lambda ids: np.array([ids + [0] * (LENGTH - len(ids))], np.int32)  # noqa: E731
        segments = lambda ids: (row(ids) * 0 + (np.arange(LENGTH) < len(ids))).astype(np.int32)  # noqa: E731,E501
        logits = np.asarray(self.model(row(enc), row(dec), encoder_segment_ids=segments(enc),
                                       decoder_segment_ids=segments(dec)),
                            np.float64)[0, :len(dec)]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        picked = logp[np.arange(len(target_ids)), target_ids]
        return float(picked.sum()), bool((logits.argmax(-1) == target_ids).all())


def _stop_inside(tokens, text, vocab):
    """A stop string that the greedy text contains after its start: the text of one of its
    later tokens, so that cutting there leaves a non-empty part of it."""
    for token in tokens[1:]:
        piece = vocab.decode([token])
        if piece.strip() and text.find(piece) > 0:
            return piece
    raise AssertionError(f"no stop string inside {text!r}")


def test_lm_eval_scores_a_run_on_local_tasks_as_the_run_itself_does(run_dir, tmp_path):
    ref = Reference(run_dir)
    # greedy: the "generate" task's 8 tokens are the first 8 of the default task's 31
    longest, texts = ref.generated([p["prompt"] for p in PROMPTS], LENGTH - 1)
    first = [t[:GENERATED_TOKENS] for t in longest]
    short = dict(zip([p["prompt"] for p in PROMPTS], (ref.vocab.decode(t) for t in first)))
    stop = _stop_inside(first[0], short[PROMPTS[0]["prompt"]], ref.vocab)
    until = [NEVER, stop]
    _write_tasks(tmp_path, until)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.lm_eval", "run", "--model", "t5g2", "--model_args",
         f"workdir={run_dir},dtype=float32", "--batch_size", "4", "--tasks",
         "t5g2_local_choice,t5g2_local_rolling,t5g2_local_generate,"
         "t5g2_local_generate_default", "--include_path", str(tmp_path),
         "--output_path", str(out), "--log_samples"],
        cwd=REPO, env=_env(1, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    tasks = ("choice", "rolling", "generate", "generate_default")
    samples = {task: [json.loads(line) for line in open(path, encoding="utf-8")]
               for task in tasks  # the file name ends with a date: generate_ != generate_default_
               for path in glob.glob(str(out / "*" / f"samples_t5g2_local_{task}_[0-9]*.jsonl"))}
    assert [len(samples[t]) for t in tasks] == [3, 2, 3, 3]

    for sample in samples["generate"]:
        assert sample["filtered_resps"] == [_cut(short[sample["doc"]["prompt"]], until)], sample
    assert samples["generate"][0]["doc"] == PROMPTS[0]
    assert 0 < len(samples["generate"][0]["filtered_resps"][0]) < len(short[PROMPTS[0]["prompt"]])
    # no max_gen_toks: lm_eval's 256, capped to the decoder's 32 positions less BOS
    full = dict(zip([p["prompt"] for p in PROMPTS], texts))
    for sample in samples["generate_default"]:
        assert sample["filtered_resps"] == [_cut(full[sample["doc"]["prompt"]], ["\n\n"])]

    encode = lambda text: [int(t) for t in ref.vocab.encode(text)]  # noqa: E731
    for sample in samples["choice"]:
        doc = sample["doc"]
        for choice, (logp, greedy) in zip(doc["choices"], sample["filtered_resps"]):
            expected, expected_greedy = ref.logp(encode(doc["context"]), encode(" " + choice))
            assert float(logp) == pytest.approx(expected, abs=1e-4), (doc, choice)
            assert (greedy == "True") == expected_greedy
    for sample in samples["rolling"]:
        tokens = encode(sample["doc"]["text"])
        windows = range(0, len(tokens), LENGTH)
        expected = sum(ref.logp(tokens[max(0, i - LENGTH):i], tokens[i:i + LENGTH])[0]
                       for i in windows)
        assert float(sample["filtered_resps"][0]) == pytest.approx(expected, abs=1e-3)
    assert len(encode(TEXTS[1]["text"])) > LENGTH  # the second text takes two windows


@pytest.fixture(scope="module")
def exported(ul2_export):
    return ul2_export


def _requests(gen_kwargs):
    return [Instance("generate_until", doc=p, arguments=(p["prompt"], dict(gen_kwargs)), idx=0)
            for p in PROMPTS]


def test_sampled_generation_is_reproducible_and_top_k_1_is_greedy(run_dir, exported):
    from t5g2.lm_eval_model import T5G2LM

    lm = T5G2LM(workdir=run_dir, dtype="float32", batch_size=4, seed=3)
    greedy = lm.generate_until(_requests(dict(until=[NEVER], max_gen_toks=8)))
    sample = dict(until=[NEVER], max_gen_toks=8, do_sample=True, temperature=1.0)
    drawn = lm.generate_until(_requests(sample))
    assert lm.generate_until(_requests(sample)) == drawn  # the same seed: the same samples
    assert drawn != greedy
    assert lm.generate_until(_requests({**sample, "top_k": 1})) == greedy
    lm.seed = 4
    assert lm.generate_until(_requests(sample)) != drawn
    # the run's export (model_args hf=DIR) serves the same generations
    from_export = T5G2LM(hf=exported, batch_size=4)
    assert from_export.generate_until(_requests(dict(until=[NEVER], max_gen_toks=8))) == greedy


def test_generation_arguments_are_read_as_lm_eval_gives_them(run_dir):
    from t5g2.generate import GREEDY
    from t5g2.lm_eval_model import T5G2LM

    lm = T5G2LM(workdir=run_dir)
    # lm_eval's defaults: greedy, 256 tokens (capped to the decoder's positions less BOS)
    assert lm.generation_settings({}) == (GREEDY, LENGTH - 1, [])
    sampling, max_new, until = lm.generation_settings(
        dict(until="\n", max_new_tokens=5, temperature=0.5, top_k=3, top_p=0.9))
    assert (sampling.temperature, sampling.top_k, sampling.top_p, max_new, until) == \
        (0.5, 3, 0.9, 5, ["\n"])  # a temperature alone samples, as in lm_eval
    for gen_kwargs, message in (
            (dict(max_gen_toks=0), "max_gen_toks=0: must be a positive integer"),
            (dict(num_beams=2), "generation_kwargs num_beams=2: t5g2 generates with"),
            (dict(do_sample=True), "do_sample=True with temperature=0.0: give a temperature"),
            (dict(until=[3]), r"until=\[3\]: give a string")):
        with pytest.raises(ConfigError, match=message):
            lm.generation_settings(gen_kwargs)
    with pytest.raises(ConfigError, match="max_decoder_length=1 leaves no room"):
        T5G2LM(workdir=run_dir, max_decoder_length=1).generation_settings({})


def test_bad_model_arguments_are_one_clear_line(run_dir, tmp_path):
    from t5g2.lm_eval_model import T5G2LM

    for kwargs, message in ((dict(dtype="float8"), "dtype='float8': valid are"),
                            (dict(batch_size=0), "batch_size=0: must be a positive integer"),
                            (dict(mode_token="[Q]"), r"mode_token='\[Q\]' is not one of"),
                            (dict(hf=str(tmp_path)), "give exactly one"),
                            (dict(workdir=None), "give exactly one")):
        with pytest.raises(ConfigError, match=message):
            T5G2LM(**{"workdir": run_dir, **kwargs})
    _write_tasks(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "launch.lm_eval", "run", "--model", "t5g2", "--model_args",
         f"workdir={os.path.join(run_dir, 'missing')}", "--tasks", "t5g2_local_choice",
         "--include_path", str(tmp_path)],
        cwd=REPO, env=_env(1, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
