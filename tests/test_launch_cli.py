"""A user's mistake at a launch/ entry point reads as one line: `error: <message>` on stderr, exit
status 2, no traceback; an unexpected error keeps its traceback; with several processes every
process exits. Each entry point runs as the user runs it, a subprocess."""

import subprocess
import sys
import time

import pytest

from configs import tiny
from launch import cli
from t5g2.configlib import ConfigError
from t5g2.data.denoisers import mixture_from_config
from t5g2.data.pipeline import open_vocabulary
from t5g2.model import ModelConfig
from t5g2.train import loop
from t5g2.train.config import TrainConfig
from tests.test_multihost import REPO, TRAIN_FLAGS, _env, _free_port

TIMEOUT_S = 180


def _launch(module: str, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env or _env(8),
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def _assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit status 2, and stderr ends with exactly `error: <message>`, with no traceback."""
    assert result.returncode == cli.USER_ERROR_EXIT_CODE, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: {message}", result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def _aot_env():
    env = _env(8)
    del env["XLA_FLAGS"]  # launch.aot sets the device count from its target
    return env


def test_a_misspelt_override_names_the_field_and_its_sections_valid_fields(tmp_path):
    valid = ", ".join(sorted(tiny.get_config().model.keys()))
    message = f"--config.model.foo: config.model has no field 'foo'; valid: {valid}"
    result = _launch("launch.train", "--config", "configs/tiny.py", "--config.model.foo=1",
                     "--workdir", str(tmp_path / "run"))
    _assert_one_line_error(result, message)
    assert not (tmp_path / "run").exists()  # nothing started
    sections = ", ".join(sorted(tiny.get_config().keys()))
    result = _launch("launch.aot", "--config", "configs/tiny.py", "--topology", "v5p-8",
                     "--config.modle.vocab_size=8", env=_aot_env())
    _assert_one_line_error(result, f"--config.modle.vocab_size: config has no field 'modle'; "
                                   f"valid: {sections}")


@pytest.mark.parametrize("module, args, message", [
    pytest.param("launch.train", ["--config.data.source=synthetic", "--config.mesh.fsdp=3"],
                 "mesh data=-1 x fsdp=3 x tensor=1: 3 does not divide the 8 devices per slice",
                 id="train-sharding"),
    pytest.param("launch.train", ["--config.data.source=ul2", "--config.data.ul2.source_kind=csv"],
                 "kind='csv' is not a document source; valid: text, jsonl, parquet, arrayrecord, "
                 "embedded", id="train-data-source"),
    pytest.param("launch.train", ["--config.data.source=synthetic",
                                  "--config.init.from_gemma3=/nonexistent"],
                 "/nonexistent does not exist: no config.json to read (expected a Hugging Face "
                 "checkpoint directory)", id="train-checkpoint"),
    pytest.param("launch.train", ["--config.train.steps=two"],  # absl's own errors too
                 "flag --config.train.steps=two: invalid literal for int() with base 10: 'two'",
                 id="train-flag-value"),
    pytest.param("launch.make_gemma3", ["--config.model.encoder.num_heads=3"],
                 "model.encoder.num_heads=3 is not divisible by model.encoder.num_kv_heads=2: "
                 "grouped-query attention needs whole groups",
                 id="make_gemma3-config"),
])
def test_known_errors_are_one_line_with_status_2(tmp_path, module, args, message):
    where = ["--workdir", str(tmp_path / "run")] if module == "launch.train" else \
        ["--out", str(tmp_path / "out")]
    _assert_one_line_error(_launch(module, "--config", "configs/tiny.py", *where, *args), message)


def test_export_errors_are_one_line(tmp_path):
    result = _launch("launch.export", "--workdir", str(tmp_path / "nowhere"), "--out",
                     str(tmp_path / "hf"))
    _assert_one_line_error(result, f"{tmp_path / 'nowhere'}: no checkpoints/ directory (is this "
                                   "the workdir of a training run?)")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("kept")
    result = _launch("launch.export", "--workdir", str(tmp_path), "--out", str(tmp_path / "hf"))
    _assert_one_line_error(result, f"{tmp_path / 'hf'} exists and is not empty; pass "
                                   "--overwrite to replace it")


def test_aot_names_its_target():
    result = _launch("launch.aot", "--config", "configs/tiny.py", env=_aot_env())
    _assert_one_line_error(result, "name the target: --topology=v5p-8 (or any of v4-<n>, v5p-<n>,"
                                   " v5e-<n>, a100-<n>, h100-<n>, h200-<n>), or --devices=<n> "
                                   "--hbm_gib=<HBM per device>")


def test_unexpected_errors_keep_their_traceback():
    program = ("from launch import cli\n"
               "def main(argv):\n"
               "    raise RuntimeError('not a user error')\n"
               "cli.run(main)\n")
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, env=_env(1),
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "RuntimeError: not a user error"


def _two_processes(tmp_path, flags_per_process):
    """Runs launch.train as the two processes of one job; returns, per process, its exit status,
    its stderr, and the seconds from its `error:` line (or its start) to its exit."""
    cluster = dict(T5G2_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", T5G2_NUM_PROCESSES="2")
    files = [tmp_path / f"process{i}.err" for i in range(2)]
    logs = [open(f, "w", encoding="utf-8") for f in files]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "launch.train", *TRAIN_FLAGS, *extra, "--workdir",
         str(tmp_path / "run")], cwd=REPO, env=_env(4, **cluster, T5G2_PROCESS_ID=str(i)),
        stdout=subprocess.DEVNULL, stderr=logs[i]) for i, extra in enumerate(flags_per_process)]
    start = time.monotonic()
    reported, exited = [start, start], [None, None]
    try:
        while None in exited and time.monotonic() < start + TIMEOUT_S:
            for i, p in enumerate(procs):
                if exited[i] is None and p.poll() is not None:
                    exited[i] = time.monotonic()
                elif reported[i] == start and "\nerror: " in files[i].read_text():
                    reported[i] = time.monotonic()
            time.sleep(0.1)
    finally:
        for p, log in zip(procs, logs):
            p.kill()
            p.wait()
            log.close()
    errors = [f.read_text() for f in files]
    assert None not in exited, [e[-2000:] for e in errors]  # no process hangs
    assert all("jax.distributed (explicit)" in e for e in errors), [e[-2000:] for e in errors]
    return [(p.returncode, e, t - r) for p, e, t, r in zip(procs, errors, exited, reported)]


def test_every_process_of_a_job_exits_on_a_known_error(tmp_path):
    """Both processes of a 2-process job meet the same mesh error after jax.distributed starts:
    each prints it and exits with status 2 at once (jax.distributed's shutdown barrier is met)."""
    mistake = ("--config.mesh.fsdp=3",)
    for status, stderr, after_error in _two_processes(tmp_path, [mistake, mistake]):
        _assert_one_line_error(subprocess.CompletedProcess([], status, "", stderr),
                               "mesh data=-1 x fsdp=3 x tensor=1: 3 does not divide the 8 "
                               "devices per slice")
        assert after_error < cli.EXIT_GRACE_S


def test_an_error_in_one_process_stops_the_whole_job(tmp_path):
    """Process 1 alone cannot start (its --config.init.from_gemma3 does not exist): it reports
    and exits within EXIT_GRACE_S instead of waiting out jax.distributed's 300 s shutdown barrier,
    and process 0's next collective then fails rather than waiting for it."""
    (status0, stderr0, _), (status1, stderr1, after_error) = _two_processes(
        tmp_path, [("--config.train.steps=1000",), ("--config.init.from_gemma3=/nonexistent",)])
    _assert_one_line_error(subprocess.CompletedProcess([], status1, "", stderr1),
                           "/nonexistent does not exist: no config.json to read (expected a "
                           "Hugging Face checkpoint directory)")
    assert after_error < cli.EXIT_GRACE_S + 15
    assert status0 != 0 and "step 1000" not in stderr0


@pytest.mark.parametrize("field", ["pad_id", "eos_id", "bos_id"])
def test_special_ids_must_be_the_vocabularys(cache_dir, field):
    """model.pad_id / eos_id / bos_id are checked against the sentencepiece model's own ids."""
    import sentencepiece as spm

    config = tiny.get_config()
    config.data.ul2.cache_dir = cache_dir
    pipeline_cfg = loop.pipeline_config(config, TrainConfig.from_config_dict(config.train))
    vocab = open_vocabulary(pipeline_cfg, mixture_from_config(pipeline_cfg.mixture))
    sp = spm.SentencePieceProcessor(model_file=vocab.model_file)
    expected = {"pad_id": sp.pad_id(), "eos_id": sp.eos_id(), "bos_id": sp.bos_id()}[field]
    model_cfg = ModelConfig.from_config_dict(config.model)
    loop.check_vocabulary_fits_model(vocab, model_cfg)  # the shipped config agrees
    wrong = (expected + 5) % model_cfg.vocab_size
    config.model[field] = wrong
    with pytest.raises(ConfigError) as e:
        loop.check_vocabulary_fits_model(vocab, ModelConfig.from_config_dict(config.model))
    assert str(e.value).startswith(f"model.{field}={wrong} but the vocabulary's ")
    assert str(e.value).endswith(f" is {expected}; set --config.model.{field}={expected}")
