"""Checkpoints: exact resume after SIGKILL and SIGTERM, crashes during a save, corruption,
retention, restoring onto another mesh, and refusing a workdir of a different model.

The resume tests run `python -m launch.train` as separate processes (one CPU device each) on the
UL2 pipeline, so the data order is part of what must resume exactly; losses are compared bitwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import tiny
from t5g2 import sharding
from t5g2.configlib import ConfigError
from t5g2.train import loop
from t5g2.train.checkpoint import Checkpointer, CheckpointError, interrupted_saves
from t5g2.train.preemption import PREEMPTED_EXIT_CODE
from t5g2.train.state import TrainState
from tests.test_multihost import REPO, _env, signal_when_the_device_finishes

STEPS = 8
RUN_FLAGS = (
    "--config", "configs/tiny.py", f"--config.train.steps={STEPS}",
    "--config.train.log_every=1", "--config.checkpoint.every=2",
    "--config.train.encoder_length=64", "--config.train.decoder_length=64",
    "--config.model.encoder.num_layers=2", "--config.model.decoder.num_layers=2",
    "--config.peak_flops_per_device=1e9",  # no matmul measurement at start
    "--config.eval.every=0",  # tests/test_eval.py covers the held-out evaluation
)
TIMEOUT_S = 300


def _start(workdir: Path, cache: str, *flags: str) -> subprocess.Popen:
    log = open(workdir.parent / f"{workdir.name}.log", "a", encoding="utf-8")
    return subprocess.Popen([sys.executable, "-m", "launch.train", *RUN_FLAGS, *flags,
                             "--workdir", str(workdir)], cwd=REPO,
                            env=_env(1, T5G2_CACHE=cache), stdout=log, stderr=subprocess.STDOUT)


def _output(workdir: Path) -> str:
    return (workdir.parent / f"{workdir.name}.log").read_text()


def _finish(proc: subprocess.Popen, workdir: Path, expect: int = 0) -> None:
    try:
        code = proc.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    assert code == expect, f"exit {code}, expected {expect}:\n{_output(workdir)[-4000:]}"


def _losses(workdir: Path) -> dict[int, float]:
    """step -> loss; a step logged again after a restore keeps its last value."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines)}


def _interrupt_at(workdir: Path, cache: str, step: int, signum: int, *flags: str,
                  expect: int | None = None) -> None:
    """Starts a run and sends `signum` once it has logged `step`."""
    proc = _start(workdir, cache, *flags)
    deadline = time.monotonic() + TIMEOUT_S
    metrics = workdir / "metrics.jsonl"
    while not (metrics.exists() and max(_losses(workdir), default=0) >= step):
        assert proc.poll() is None, f"run ended early:\n{_output(workdir)[-4000:]}"
        assert time.monotonic() < deadline, "run did not reach the step in time"
        time.sleep(0.05)
    proc.send_signal(signum)
    if expect is None:
        expect = -signal.SIGKILL if signum == signal.SIGKILL else PREEMPTED_EXIT_CODE
    _finish(proc, workdir, expect=expect)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir) -> dict[int, float]:
    workdir = tmp_path_factory.mktemp("resume") / "reference"
    _finish(_start(workdir, cache_dir), workdir)
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _restored_step(workdir: Path) -> int:
    out = _output(workdir)
    marker = "starting at step "
    return int(out[out.rindex(marker) + len(marker):].split()[0])


def test_sigkill_at_any_step_resumes_bitwise(tmp_path, cache_dir, uninterrupted):
    workdir = tmp_path / "killed"
    _interrupt_at(workdir, cache_dir, 5, signal.SIGKILL)
    _finish(_start(workdir, cache_dir), workdir)
    restored = _restored_step(workdir)
    assert restored in (2, 4, 6)  # a checkpoint every 2 steps, killed after step 5
    steps = [json.loads(m)["step"] for m in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # steps logged past the checkpoint were dropped
    resumed = _losses(workdir)
    assert {s: resumed[s] for s in range(restored + 1, STEPS + 1)} == \
        {s: uninterrupted[s] for s in range(restored + 1, STEPS + 1)}


def test_sigterm_saves_at_the_step_it_stopped_and_resumes_bitwise(tmp_path, cache_dir,
                                                                  uninterrupted):
    workdir = tmp_path / "terminated"
    _interrupt_at(workdir, cache_dir, 3, signal.SIGTERM)
    stopped = max(_losses(workdir))
    assert stopped < STEPS
    assert (workdir / "checkpoints" / str(stopped)).is_dir(), os.listdir(workdir / "checkpoints")
    assert f"stopped at step {stopped} on a termination request" in _output(workdir)
    _finish(_start(workdir, cache_dir), workdir)
    assert _restored_step(workdir) == stopped
    resumed = _losses(workdir)
    assert {s: resumed[s] for s in range(stopped + 1, STEPS + 1)} == \
        {s: uninterrupted[s] for s in range(stopped + 1, STEPS + 1)}


def test_sigusr1_saves_on_demand_and_training_goes_on(tmp_path, cache_dir):
    workdir = tmp_path / "on_demand"
    _interrupt_at(workdir, cache_dir, 3, signal.SIGUSR1, "--config.train.steps=40",
                  "--config.checkpoint.every=1000", expect=0)
    saved = sorted(int(name) for name in os.listdir(workdir / "checkpoints"))
    assert len(saved) == 2 and 3 <= saved[0] < 40 and saved[1] == 40, saved
    assert max(_losses(workdir)) == 40


# ---------------------------------------------------------------------- checkpoints of a toy state

def _toy(seed: float = 0.0) -> tuple[TrainState, TrainState, TrainState]:
    """(state, its shardings, its abstract structure) for a small state on one device."""
    mesh = jax.make_mesh((1,), ("fsdp",), devices=jax.devices()[:1])
    placed = NamedSharding(mesh, PartitionSpec())
    state = TrainState(step=jnp.zeros((), jnp.int32),
                       params={"w": jnp.arange(50_000, dtype=jnp.float32) + seed,
                               "b": jnp.full((3,), seed, jnp.bfloat16)},
                       opt_state={"m": jnp.arange(7, dtype=jnp.float32) * seed})
    shardings = jax.tree.map(lambda _: placed, state)
    return state, shardings, jax.eval_shape(lambda: state)


CONFIG = {"model": {"d_model": 8}}


def test_retention_keeps_the_last_k_and_every_mth_and_restores_a_named_step(tmp_path):
    ckpt = Checkpointer(str(tmp_path), every=1, keep=2, keep_period=4, async_save=False)
    for step in range(1, 11):
        ckpt.save(step, _toy(step)[0], {"position": step}, CONFIG)
    ckpt.wait()
    assert ckpt.steps() == [4, 8, 9, 10]
    _, shardings, abstract = _toy()
    restored = ckpt.resume(abstract, shardings, step=4)
    assert restored.data == {"position": 4}
    np.testing.assert_array_equal(restored.state.params["w"], _toy(4)[0].params["w"])
    assert restored.state.params["b"].dtype == jnp.bfloat16
    assert ckpt.resume(abstract, shardings).step == 10
    with pytest.raises(CheckpointError, match=r"restore_step=5: .* has steps \[4, 8, 9, 10\]"):
        ckpt.resume(abstract, shardings, step=5)


def _largest_array_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, message", [
    (_flip_a_byte, r"is corrupt: 1 arrays differ from what was saved, e.g. \['params/w'\]"),
    (_truncate, r"is unreadable"),
])
def test_a_corrupt_checkpoint_is_an_error_and_falls_back_only_when_asked(tmp_path, damage,
                                                                          message):
    ckpt = Checkpointer(str(tmp_path), every=1, keep=5, async_save=False)
    for step in (1, 2):
        ckpt.save(step, _toy(step)[0], {"position": step}, CONFIG)
    damage(_largest_array_file(tmp_path / "checkpoints" / "2"))
    _, shardings, abstract = _toy()
    with pytest.raises(CheckpointError, match=message + r".*fallback=true.*restore_step=1"):
        ckpt.resume(abstract, shardings)
    assert ckpt.steps() == [1, 2]  # nothing moved without being asked
    restored = ckpt.resume(abstract, shardings, fallback=True)
    assert restored.step == 1 and restored.data == {"position": 1}
    np.testing.assert_array_equal(restored.state.params["w"], _toy(1)[0].params["w"])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2.corrupt"]


def test_when_every_checkpoint_is_bad_fallback_is_an_error_not_a_fresh_start(tmp_path):
    ckpt = Checkpointer(str(tmp_path), every=1, keep=5, async_save=False)
    for step in (1, 2):
        ckpt.save(step, _toy(step)[0], {"position": step}, CONFIG)
        _flip_a_byte(_largest_array_file(tmp_path / "checkpoints" / str(step)))
    _, shardings, abstract = _toy()
    with pytest.raises(CheckpointError, match="no usable checkpoint left .* all 2 were moved"):
        ckpt.resume(abstract, shardings, fallback=True)


def test_a_different_optimizer_layout_is_a_config_error_and_never_falls_back(tmp_path):
    """E.g. train.grad_clip_norm switched between 0 and > 0 (optax then nests its state
    differently): the arrays exist but under other names; that is no corruption."""
    ckpt = Checkpointer(str(tmp_path), every=1, keep=5, async_save=False)
    ckpt.save(1, _toy(1)[0], {"position": 1}, CONFIG)
    state, shardings, abstract = _toy()
    other = dataclasses.replace(abstract, opt_state={"chain": abstract.opt_state})
    other_shardings = dataclasses.replace(shardings, opt_state={"chain": shardings.opt_state})
    for fallback in (False, True):
        with pytest.raises(ConfigError, match=r"different layout .* opt_state: this config has "
                                              r"\['chain.m'\] the checkpoint lacks"):
            ckpt.resume(other, other_shardings, fallback=fallback)
    assert ckpt.steps() == [1]


_CRASH_IN_SAVE = """
import os, signal, sys
import orbax.checkpoint as ocp
from tests.test_checkpoint import CONFIG, _toy
from t5g2.train.checkpoint import Checkpointer

ckpt = Checkpointer(sys.argv[1], every=1, keep=5)
ckpt.save(1, _toy(1)[0], {"position": 1}, CONFIG)
ckpt.wait()

async def die_while_writing(self, x, directory):  # the metadata half written, then SIGKILL
    (directory / "metadata").write_text('{"format": "t5g2-chec')
    os.kill(os.getpid(), signal.SIGKILL)

ocp.JsonCheckpointHandler._save_fn = die_while_writing
ckpt.save(2, _toy(2)[0], {"position": 2}, CONFIG)
ckpt.wait()
"""


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _CRASH_IN_SAVE, str(tmp_path)], cwd=REPO,
                          env=_env(1), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    leftovers = interrupted_saves(str(tmp_path / "checkpoints"))
    assert leftovers and all(os.path.basename(p).startswith("2.") for p in leftovers)

    ckpt = Checkpointer(str(tmp_path), every=1, keep=5)
    assert ckpt.interrupted == leftovers  # detected (and reported) on restart
    assert ckpt.steps() == [1]
    _, shardings, abstract = _toy()
    restored = ckpt.resume(abstract, shardings)
    assert restored.step == 1 and restored.data == {"position": 1}
    np.testing.assert_array_equal(restored.state.params["w"], _toy(1)[0].params["w"])
    ckpt.prepare_to_continue(restored.step)  # what the loop does once the run is checked
    assert interrupted_saves(str(tmp_path / "checkpoints")) == []


# ----------------------------------------------------------------------------- the training loop

def _small_config(steps: int, **mesh):
    config = tiny.get_config()
    config.train.steps = steps
    config.train.log_every = 1
    config.train.encoder_length, config.train.decoder_length = 32, 16
    config.model.encoder.num_layers = config.model.decoder.num_layers = 2
    config.data.source = "synthetic"
    config.peak_flops_per_device = 1e9
    config.eval.every = 0  # tests/test_eval.py covers the held-out evaluation
    config.mesh.update(dict(dict(data=-1, fsdp=1, tensor=1), **mesh))
    return config


@pytest.mark.slow  # test_multihost resumes on another process count (and mesh) by default
def test_restoring_onto_another_mesh_gives_the_same_next_loss(tmp_path):
    saved = tmp_path / "fsdp8"
    loop.train(_small_config(2, fsdp=8), str(saved))
    moved = tmp_path / "mesh222"
    shutil.copytree(saved, moved)

    continued = loop.train(_small_config(3, fsdp=8), str(saved))
    resharded = loop.train(_small_config(3, data=2, fsdp=2, tensor=2), str(moved))
    assert continued.step == resharded.step == 3
    logged = (moved / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["step"] for m in logged] == [1, 2, 3]  # 1 and 2 were not trained again
    np.testing.assert_allclose(resharded.metrics["loss"], continued.metrics["loss"], rtol=1e-5)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow  # by default: test_checkpoint_fields checks what a resume refuses
def test_a_workdir_of_a_different_model_or_data_is_refused_and_left_untouched(tmp_path,
                                                                               cache_dir):
    with_checkpoint, without = tmp_path / "saved", tmp_path / "stopped_early"
    loop.train(_small_config(2), str(with_checkpoint))
    (with_checkpoint / "checkpoints" / "3.orbax-checkpoint-tmp").mkdir()  # an interrupted save
    no_checkpoint = _small_config(2)
    no_checkpoint.checkpoint.enabled = False  # a run stopped before its first checkpoint
    loop.train(no_checkpoint, str(without))
    bigger = _small_config(4)
    bigger.model.encoder.num_layers = 3
    bigger.model.decoder.d_model = bigger.model.encoder.d_model = 32
    for workdir, where in ((with_checkpoint, "the checkpoint"), (without, "its config.json")):
        before = _snapshot(workdir)
        with pytest.raises(ConfigError) as error:
            loop.train(bigger, str(workdir))
        message = str(error.value)
        assert f"model.encoder.num_layers=2 in {where}, 3 now" in message
        assert f"model.decoder.d_model=64 in {where}, 32 now" in message
        assert "nothing was written" in message
        assert _snapshot(workdir) == before
    assert (with_checkpoint / "checkpoints" / "3.orbax-checkpoint-tmp").is_dir()

    other_data = _small_config(4)
    other_data.data.source = "ul2"
    other_data.data.ul2.cache_dir = cache_dir
    other_data.train.encoder_length = other_data.train.decoder_length = 64  # what UL2 needs
    before = _snapshot(with_checkpoint)
    with pytest.raises(ConfigError, match="data.source='synthetic', this one reads 'ul2'"):
        loop.train(other_data, str(with_checkpoint))
    assert _snapshot(with_checkpoint) == before


@pytest.mark.slow  # resuming by default: the SIGKILL / SIGTERM bitwise-resume tests
def test_a_finished_run_resumes_to_nothing_and_more_steps_continue_it(tmp_path):
    first = loop.train(_small_config(2), str(tmp_path))
    again = loop.train(_small_config(2), str(tmp_path))
    assert again.step == 2 and again.metrics == {} and not again.preempted
    assert again.checkpoint == first.checkpoint
    longer = loop.train(_small_config(3), str(tmp_path))
    assert longer.step == 3 and longer.checkpoint.endswith(os.sep + "3")


@pytest.mark.slow  # a named step's restore: the retention test, by default
def test_restoring_an_earlier_step_continues_from_it_and_sets_the_later_ones_aside(tmp_path):
    config = _small_config(4)
    config.checkpoint.every = 1
    first = loop.train(config, str(tmp_path))
    config.checkpoint.restore_step = 2
    config.train.learning_rate = 1e-3  # e.g. backing off a loss spike
    branch = loop.train(config, str(tmp_path))
    assert branch.step == 4 and branch.checkpoint.endswith(os.sep + "4")
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["2", "3", "3.superseded", "4", "4.superseded"], names
    assert branch.metrics["loss"] != first.metrics["loss"]
    logged = [json.loads(m)["step"]
              for m in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]  # the old line's 3 and 4 were dropped
    config.checkpoint.restore_step = None
    assert loop.train(config, str(tmp_path)).checkpoint == branch.checkpoint  # the new line


# ------------------------------------------------------------------ another number of processes

def test_a_checkpoint_of_another_process_count_restores_and_is_never_corruption(tmp_path):
    ckpt = Checkpointer(str(tmp_path), every=1, keep=5, async_save=False)
    for step in (1, 2):
        ckpt.save(step, _toy(step)[0], {"position": step}, CONFIG)
    data = tmp_path / "checkpoints" / "2" / "data"  # step 2 as 2 processes would have saved it
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    (data / "process_1-of-2.json").write_text(json.dumps({"position": 20}))
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    _, shardings, abstract = _toy()
    for fallback in (False, True):
        restored = ckpt.resume(abstract, shardings, fallback=fallback)
        assert restored.step == 2 and restored.data is None and restored.data_process_count == 2
        assert restored.all_data == [{"position": 2}, {"position": 20}]
        np.testing.assert_array_equal(restored.state.params["w"], _toy(2)[0].params["w"])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before == ["1", "2"]
    same_count = ckpt.resume(abstract, shardings, step=1)  # saved by this one process
    assert same_count.data == {"position": 1} and same_count.all_data is None
    (data / "process_1-of-2.json").unlink()  # a file missing from the set of 2 is damage
    with pytest.raises(CheckpointError, match=r"2 is unreadable .*positions of 2 processes are "
                                              r"process_0-of-2.json \.\.\. process_1-of-2.json; "
                                              r"found \['process_0-of-2.json'\].*restore_step=1"):
        ckpt.resume(abstract, shardings)


def test_a_data_position_of_another_process_count_continues_the_global_batches():
    """The loop hands every saving process's position to the source (here 2 -> 1 process)."""
    from t5g2.data.synthetic import SyntheticCopySource
    from t5g2.train.checkpoint import Restored

    def copy_source(index, count):
        return SyntheticCopySource(global_batch_size=4, encoder_length=8, decoder_length=4,
                                   vocab_size=64, seed=3, process_index=index,
                                   process_count=count)

    config = _small_config(4)
    saving = [copy_source(p, 2) for p in range(2)]
    for src in saving:
        next(src), next(src)

    def restored(states):
        return Restored(step=2, state=None, data=None, config={"data": {"source": "synthetic"}},
                        path="ckpt/2", data_process_count=2, all_data=states)

    one = copy_source(0, 1)
    loop._restore_data_position(one, restored([s.get_state() for s in saving]), config)
    expected = [next(s) for s in saving]
    for key, value in next(one).items():
        np.testing.assert_array_equal(value, np.concatenate([b[key] for b in expected]))
    with pytest.raises(ConfigError, match=r"ckpt/2: .* positions disagree: steps \[2, 3\]"):
        loop._restore_data_position(copy_source(0, 1), restored([{"step": 2}, {"step": 3}]),
                                    config)


# ------------------------------------------------------------------ divergence and signal lag

DIVERGING_LR = 1e10  # from a good checkpoint, the first update at it makes the next loss NaN


def _logged(workdir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads,
                                      (workdir / "metrics.jsonl").read_text().splitlines())}


def _saved_fingerprints(workdir: Path, step: int) -> dict[str, int]:
    """What the checkpointer recorded for each array of a step (equal iff the arrays are)."""
    return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text()
                      )["fingerprints"]


@pytest.mark.slow  # by default: test_train's overflow test (stop/skip) and guard reasons
def test_a_diverging_run_stops_saves_nothing_and_its_last_good_checkpoint_resumes(tmp_path):
    from t5g2.train.divergence import DivergenceError

    workdir, reference = tmp_path / "run", tmp_path / "reference"
    loop.train(_small_config(2), str(workdir))  # the good checkpoint: step 2
    before = _snapshot(workdir / "checkpoints" / "2")
    diverging = _small_config(8)
    diverging.train.learning_rate = DIVERGING_LR
    # keep=1: saving any later step would delete step 2 (what a NaN save at step 8 used to do)
    diverging.checkpoint.keep = 1
    with pytest.raises(DivergenceError) as error:
        loop.train(diverging, str(workdir))
    logged = _logged(workdir)
    bad = min(s for s, m in logged.items()
              if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])))
    assert bad == max(logged) >= 3  # it stopped at the first non-finite step, and logged it
    assert str(error.value).startswith(f"training diverged: step {bad} is not finite (loss=")
    assert f"the last good checkpoint is {workdir / 'checkpoints' / '2'} " in str(error.value)
    assert os.listdir(workdir / "checkpoints") == ["2"]
    assert _snapshot(workdir / "checkpoints" / "2") == before  # intact, byte for byte

    resumed = loop.train(_small_config(4), str(workdir))  # the same command, the old rate
    loop.train(_small_config(4), str(reference))
    assert resumed.step == 4
    assert {s: m["loss"] for s, m in _logged(workdir).items()} == \
        {s: m["loss"] for s, m in _logged(reference).items()}  # bitwise: steps 1-4


@pytest.mark.slow  # skip's state is checked by test_train's overflow test; this is the loop's end
def test_skipping_keeps_the_state_and_stops_after_max_skipped_in_a_row(tmp_path):
    from t5g2.train.divergence import DivergenceError

    loop.train(_small_config(2), str(tmp_path))
    diverging = _small_config(12)
    diverging.train.update(learning_rate=DIVERGING_LR, on_nonfinite="skip", max_skipped=3)
    diverging.checkpoint.update(every=1, keep=20)
    with pytest.raises(DivergenceError, match=r"training diverged: steps (\d+)-(\d+) were not "
                                              r"finite, train.max_skipped=3 in a row") as error:
        loop.train(diverging, str(tmp_path))
    logged = _logged(tmp_path)
    first, last = (int(s) for s in error.value.args[0].split("steps ")[1].split()[0].split("-"))
    assert last == first + 2 == max(logged) and first >= 4
    assert [logged[s]["skipped_steps"] for s in range(3, last + 1)] == \
        [0.0] * (first - 3) + [1.0] * 3
    assert not np.isfinite(logged[first]["loss"] + logged[first]["grad_norm"])
    # a skipped step changes nothing: parameters, moments and the optimizer's count (so the
    # learning rate, still in warmup here, stays where it was)
    saved = sorted(int(n) for n in os.listdir(tmp_path / "checkpoints"))
    assert saved == list(range(2, last))  # the step that ended the run is not saved
    for step in range(first, last):
        assert _saved_fingerprints(tmp_path, step) == _saved_fingerprints(tmp_path, first - 1)
    assert _saved_fingerprints(tmp_path, first - 1) != _saved_fingerprints(tmp_path, first - 2)
    rates = [logged[s]["learning_rate"] for s in range(first, last + 1)]
    assert rates == [rates[0]] * 3 and rates[0] > logged[first - 1]["learning_rate"]


def test_a_changed_schedule_is_logged_with_both_learning_rates(caplog):
    """The warning itself, without a run: warmup 1, peak 3e-3 decaying by cosine to 10% at
    train.steps; the checkpoint's schedule had steps=2 (fully decayed by update 2), the new one
    steps=4, so update 2 is 0.5 (1 + cos(pi / 3)) of the way from the floor to the peak."""
    from t5g2.train.config import TrainConfig

    train_cfg = TrainConfig(batch_size=8, encoder_length=32, decoder_length=16, steps=4,
                            learning_rate=3e-3, warmup_steps=1)
    saved = dict(dataclasses.asdict(train_cfg), steps=2)
    with caplog.at_level(logging.WARNING, logger="t5g2.train.loop"):
        loop.warn_if_schedule_changed(saved, train_cfg, 2, "ckpt/2")
        loop.warn_if_schedule_changed(dataclasses.asdict(train_cfg), train_cfg, 2, "ckpt/3")
    now = 3e-4 + (3e-3 - 3e-4) * 0.5 * (1 + np.cos(np.pi / 3))
    assert [r.getMessage() for r in caplog.records] == [
        "the learning-rate schedule differs from the one ckpt/2 was trained with: train.steps "
        f"2 -> 4; the next update (schedule step 2) uses learning rate {now:.4g}, 0.0003 under "
        "the checkpoint's schedule"]


@pytest.mark.slow  # the loop's end of it; test_a_changed_schedule_is_logged... runs by default
def test_resuming_with_another_schedule_warns_with_both_learning_rates(tmp_path, caplog):
    config = _small_config(2)
    config.train.warmup_steps = 1
    loop.train(config, str(tmp_path))
    config.train.steps = 4
    config.checkpoint.every = 1
    with caplog.at_level(logging.WARNING, logger="t5g2.train.loop"):
        loop.train(config, str(tmp_path))  # saves steps 3 and 4 under the new schedule
    peak, floor = config.train.learning_rate, config.train.learning_rate * 0.1
    # cosine from peak at step 1 to floor at train.steps; the next update is the 3rd (count 2)
    before = floor  # steps=2: decayed fully by count 2
    now = floor + (peak - floor) * 0.5 * (1 + np.cos(np.pi * (2 - 1) / (4 - 1)))
    warnings = [r.getMessage() for r in caplog.records if "schedule differs" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert "train.steps 2 -> 4;" in warnings[0] and "train.learning_rate" not in warnings[0]
    assert f"uses learning rate {now:.4g}, {before:.4g} under the checkpoint's" in warnings[0]
    caplog.clear()
    config.checkpoint.restore_step = 3  # saved with steps=4: the same schedule, nothing to say
    with caplog.at_level(logging.WARNING, logger="t5g2.train.loop"):
        assert loop.train(config, str(tmp_path)).step == 4
    assert not [r for r in caplog.records if "schedule differs" in r.getMessage()], caplog.text


def _on_one_device(monkeypatch) -> None:
    """The loop's mesh on one CPU device: XLA:CPU runs a computation over several devices in
    step with its caller, so only there does Python get ahead of the device as it does on
    accelerators (where the lag this measures was seen: 24 steps with log_every=25)."""
    make_mesh = sharding.make_mesh
    monkeypatch.setattr(sharding, "make_mesh",
                        lambda cfg, devices=None: make_mesh(cfg, jax.devices()[:1]))


def _signalled_at_step_5(tmp_path, monkeypatch, signum, steps):
    """loop.train on one device, `signum` sent once the device has finished step 5; logging
    every 100 steps and checkpointing every 1000, so neither explains when the run reacts."""
    _on_one_device(monkeypatch)
    monkeypatch.setattr(loop, "make_train_step", signal_when_the_device_finishes(
        loop.make_train_step, signum, at_step=5))
    config = _small_config(steps)
    config.train.log_every = 100
    config.train.encoder_length = config.train.decoder_length = 64  # a device step > a loop turn
    config.checkpoint.every = 1000
    return loop.train(config, str(tmp_path))


def test_sigterm_stops_within_a_step_of_the_one_running_whatever_log_every(tmp_path,
                                                                           monkeypatch):
    """The device has just finished step 5 when SIGTERM arrives: the run saves and stops at most
    two steps later (the step then queued, or the one after if the loop was past its check), not
    at the next logged step (log_every=100 here; Python used to run that far ahead)."""
    result = _signalled_at_step_5(tmp_path, monkeypatch, signal.SIGTERM, steps=200)
    assert result.preempted and 5 <= result.step <= 7, result.step
    assert os.listdir(tmp_path / "checkpoints") == [str(result.step)]
    assert sorted(_logged(tmp_path)) == [1, result.step]  # the first step and the last


@pytest.mark.slow  # the two-process lag test covers SIGUSR1 by default
def test_sigusr1_saves_within_a_few_steps_whatever_log_every(tmp_path, monkeypatch):
    """SIGUSR1 once the device finished step 5: the request rides in the next batch fed (step 6
    or 7, or 8 if the loop was past its check) and is read back from that step's metrics once the
    next step is queued: the save is at most four steps later, not at a logged step (log_every
    is 100); training goes on."""
    _signalled_at_step_5(tmp_path, monkeypatch, signal.SIGUSR1, steps=20)
    saved = sorted(int(n) for n in os.listdir(tmp_path / "checkpoints"))
    assert len(saved) == 2 and 5 <= saved[0] <= 9 and saved[1] == 20, saved
