"""`python -m launch.generate`: a run's checkpoint continues prompts with the run's own tokenizer;
its tokens are the library's greedy generation of the same encoder input, built here as the
run's S denoiser reads a prompt; timings come with them; a mistake is one line."""

import json
import subprocess
import sys

import numpy as np
import pytest

from t5g2.generate import generate
from t5g2.train.export import load_run, run_vocabulary
from tests.test_multihost import REPO, _env

PROMPTS = ["The data pipeline packs", "A checkpoint is saved when the run"]


def _generate(*args):
    return subprocess.run([sys.executable, "-m", "launch.generate", *args], cwd=REPO,
                          env=_env(1), capture_output=True, text=True, timeout=300)


def test_the_command_line_generates_what_the_library_does(ul2_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[1]}) + "\n")
    done = _generate("--workdir", ul2_run, "--prompt", PROMPTS[0], "--prompts", str(prompts),
                     "--max_new_tokens", "6", "--dtype", "float32", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    assert [r["prompt"] for r in printed["results"]] == PROMPTS
    assert printed["time_to_first_token_s"] > 0 and printed["decode_tokens_per_s"] > 0
    assert printed["peak_host_memory_bytes"] > 2**20
    assert "time to first token" in done.stderr

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
    (["--prompt", "word " * 60], "longer than the run's context of 32"),
    (["--prompt", "x", "--mode_token", "[Q]"], "error: --mode_token='[Q]' is not one of"),
])
def test_bad_input_is_one_line(ul2_run, args, message):
    done = _generate("--workdir", ul2_run, *args)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, done.stderr[-500:]


def test_a_workdir_without_checkpoints_is_one_line(tmp_path):
    done = _generate("--workdir", str(tmp_path / "nowhere"), "--prompt", "x")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: {tmp_path / 'nowhere'}: no checkpoints/ directory")
