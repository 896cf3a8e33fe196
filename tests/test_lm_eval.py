"""lm-evaluation-harness end to end: `python -m launch.lm_eval run --model t5g2` scores a trained
run on local task files (a multiple-choice task and a rolling-loglikelihood task, no download),
and every loglikelihood it logs equals the run's own scoring of the same pair, computed here
one row at a time with numpy."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from t5g2.configlib import ConfigError
from t5g2.train.export import load_run, run_vocabulary
from tests.conftest import UL2_RUN_LENGTH as LENGTH  # the run's lengths: lm_eval's windows
from tests.test_multihost import REPO, _env

CHOICES = [{"context": "The data pipeline", "choices": ["packs examples", "eats bananas"],
            "label": 0},
           {"context": "A checkpoint is", "choices": ["saved", "purple"], "label": 0},
           {"context": "", "choices": ["training", "zebra"], "label": 1}]
TEXTS = [{"text": "Return the number of items in a container."},
         {"text": "the model reads every word " * 8}]  # longer than one window

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
}


@pytest.fixture(scope="module")
def run_dir(ul2_run):
    return ul2_run


def _write_tasks(directory) -> None:
    for name, rows in (("choice", CHOICES), ("rolling", TEXTS)):
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (directory / f"{name}.yaml").write_text(TASKS[name].format(data=data))


class Reference:
    """log p(target | context) by the run's model, one row at a time, numpy softmax."""

    def __init__(self, workdir):
        run = load_run(workdir, dtype="float32")
        self.model, self.cfg, self.vocab = run.model, run.model_cfg, run_vocabulary(run.config)

    def logp(self, context_ids, target_ids):
        enc = [self.vocab.mode_id("[S]"), *context_ids[-(LENGTH - 2):], self.vocab.eos_id] \
            if len(context_ids) else [self.vocab.mode_id("[S]"), self.vocab.eos_id]
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


def test_lm_eval_scores_a_run_on_local_tasks_as_the_run_itself_does(run_dir, tmp_path):
    _write_tasks(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.lm_eval", "run", "--model", "t5g2", "--model_args",
         f"workdir={run_dir},dtype=float32", "--batch_size", "4", "--tasks",
         "t5g2_local_choice,t5g2_local_rolling", "--include_path", str(tmp_path),
         "--output_path", str(out), "--log_samples"],
        cwd=REPO, env=_env(1, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    samples = {task: [json.loads(line) for line in open(path, encoding="utf-8")]
               for task in ("choice", "rolling")
               for path in glob.glob(str(out / "*" / f"samples_t5g2_local_{task}_*.jsonl"))}
    assert [len(samples[t]) for t in ("choice", "rolling")] == [3, 2]

    ref = Reference(run_dir)
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


def test_bad_model_arguments_are_one_clear_line(run_dir, tmp_path):
    from t5g2.lm_eval_model import T5G2LM

    for kwargs, message in ((dict(dtype="float8"), "dtype='float8': valid are"),
                            (dict(batch_size=0), "batch_size=0: must be a positive integer"),
                            (dict(mode_token="[Q]"), r"mode_token='\[Q\]' is not one of")):
        with pytest.raises(ConfigError, match=message):
            T5G2LM(workdir=run_dir, **kwargs)
    _write_tasks(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "launch.lm_eval", "run", "--model", "t5g2", "--model_args",
         f"workdir={os.path.join(run_dir, 'missing')}", "--tasks", "t5g2_local_choice",
         "--include_path", str(tmp_path)],
        cwd=REPO, env=_env(1, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
