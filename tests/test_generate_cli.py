"""`python -m launch.generate`: a run's checkpoint continues prompts with the run's own tokenizer;
its tokens are the library's greedy generation of the same encoder input, built here as the
run's S denoiser reads a prompt; timings come with them; the run exported as a Hugging Face
directory (`--hf`) generates the same tokens; a mistake is one line."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from t5g2.configlib import ConfigError
from t5g2.convert.checkpoint_files import CheckpointError
from t5g2.generate import generate
from t5g2.inference_source import hf_vocabulary, open_source
from t5g2.train.export import TOKENIZER_MODEL, VOCABULARY_NOTE, load_run, run_vocabulary
from tests.test_multihost import REPO, _env

PROMPTS = ["The data pipeline packs", "A checkpoint is saved when the run"]


def _generate(*args):
    return subprocess.run([sys.executable, "-m", "launch.generate", *args], cwd=REPO,
                          env=_env(1), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def exported(ul2_export):
    return ul2_export


def _copy_of(exported, tmp_path, without=(), **config_changes):
    """A copy of the exported directory without some files, config.json's text configs
    changed."""
    copy = tmp_path / "hf"
    shutil.copytree(exported, copy)
    for name in without:
        os.remove(copy / name)
    if config_changes:
        config = json.loads((copy / "config.json").read_text())
        for part in (config["encoder"]["text_config"], config["decoder"]):
            part.update(config_changes)
        (copy / "config.json").write_text(json.dumps(config))
    return str(copy)


@pytest.fixture(scope="module")
def from_the_run(ul2_run, tmp_path_factory):
    """What `launch.generate --workdir` prints for PROMPTS (one as --prompt, one from a file)."""
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[1]}) + "\n")
    done = _generate("--workdir", ul2_run, "--prompt", PROMPTS[0], "--prompts", str(prompts),
                     "--max_new_tokens", "6", "--dtype", "float32", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "time to first token" in done.stderr
    return json.loads(done.stdout)


def test_the_command_line_generates_what_the_library_does(ul2_run, from_the_run):
    printed = from_the_run
    assert [r["prompt"] for r in printed["results"]] == PROMPTS
    assert printed["time_to_first_token_s"] > 0 and printed["decode_tokens_per_s"] > 0
    assert printed["peak_host_memory_bytes"] > 2**20

    run = load_run(ul2_run, dtype="float32")
    vocab = run_vocabulary(run.config)
    rows = [[vocab.mode_id("[S]"), *vocab.encode(p).tolist(), vocab.eos_id] for p in PROMPTS]
    enc = np.zeros((2, max(map(len, rows))), np.int32)  # pad id 0
    for i, row in enumerate(rows):
        enc[i, :len(row)] = row
    out = generate(run.model, enc, max_new_tokens=6)
    for i, result in enumerate(printed["results"]):
        assert result["tokens"] == out.tokens[i, :out.lengths[i]].tolist()
        assert result["text"] == vocab.decode(out.tokens[i, :out.lengths[i]])
    assert printed["new_tokens"] == int(out.lengths.sum())


@pytest.mark.parametrize("args, message", [
    (["--prompt", " "], "error: prompt 1 is empty"),
    (["--prompt", "x", "--max_new_tokens", "0"], "error: --max_new_tokens=0 must be a positive"),
    ([], "error: no prompt: give --prompt TEXT"),
    (["--prompt", "word " * 60], "longer than the model's context of 32"),
    (["--prompt", "x", "--mode_token", "[Q]"], "error: --mode_token='[Q]' is not one of"),
    (["--prompt", "x", "--hf", "{tmp}"], "--hf='{tmp}': give exactly one"),
])
def test_bad_input_is_one_line(ul2_run, tmp_path, args, message):
    done = _generate("--workdir", ul2_run, *(a.format(tmp=tmp_path) for a in args))
    message = message.format(tmp=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, done.stderr[-500:]


def test_a_workdir_without_checkpoints_is_one_line(tmp_path):
    done = _generate("--workdir", str(tmp_path / "nowhere"), "--prompt", "x")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: {tmp_path / 'nowhere'}: no checkpoints/ directory")


def test_an_exported_run_generates_what_the_run_does(exported, from_the_run, ul2_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    done = _generate("--hf", exported, "--prompts", str(prompts), "--max_new_tokens", "6",
                     "--json")  # the directory's dtype (float32, the run's) by default
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    assert printed["step"] is None and printed["source"] == exported
    assert [r["tokens"] for r in printed["results"]] == \
        [r["tokens"] for r in from_the_run["results"]]
    assert [r["text"] for r in printed["results"]] == [r["text"] for r in from_the_run["results"]]
    # the note gives back the run's sentinels and mode tokens, id for id
    ours, runs = hf_vocabulary(exported), run_vocabulary(load_run(ul2_run).config)
    assert ours.sentinel_ids.tolist() == runs.sentinel_ids.tolist() and ours.num_sentinels > 0
    assert {t: ours.mode_id(t) for t in ours.mode_tokens} == \
        {t: runs.mode_id(t) for t in runs.mode_tokens}


def test_a_directory_without_the_vocabulary_note_has_no_mode_token(exported, tmp_path):
    source = open_source(hf=_copy_of(exported, tmp_path, without=[VOCABULARY_NOTE]))
    assert source.mode_head(None) == [] and source.vocab.mode_tokens == ()
    assert source.max_positions == 131_072  # transformers' default: the config names none
    with pytest.raises(ConfigError, match=r"--mode_token='\[S\]': .* has no t5g2_vocabulary"):
        source.mode_head("[S]")
    longer = open_source(hf=exported, context_scale=2.0)
    assert longer.max_positions == 2 * 131_072
    assert longer.model_cfg.decoder.global_rope_scale == \
        2 * source.model_cfg.decoder.global_rope_scale


@pytest.mark.parametrize("change, error, message", [
    (dict(without=[TOKENIZER_MODEL]), CheckpointError, "no tokenizer.model"),
    (dict(without=["config.json"]), CheckpointError, "no config.json"),
    (dict(vocab_size=300), ConfigError,
     r"tokenizer.model does not fit .*config.json: the vocabulary has \d+ ids .* "
     r"model.vocab_size=300"),
])
def test_a_bad_hugging_face_directory_is_named(exported, tmp_path, change, error, message):
    with pytest.raises(error, match=message):
        open_source(hf=_copy_of(exported, tmp_path, **change))


def test_a_missing_hugging_face_directory_is_one_line(tmp_path):
    done = _generate("--hf", str(tmp_path / "nowhere"), "--prompt", "x")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: {tmp_path / 'nowhere'} does not exist: no config.json")
