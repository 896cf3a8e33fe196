"""The train step learns, accumulation is exact, and the loop runs end to end from a config."""

import dataclasses
import json

import jax
import numpy as np
import optax
import pytest

from configs import tiny
from t5g2 import sharding
from t5g2.data.synthetic import SyntheticCopySource
from t5g2.train.config import TrainConfig
from t5g2.train.divergence import NonFiniteGuard
from t5g2.train.optimizer import make_optimizer
from t5g2.train.state import init_train_state, state_shardings
from t5g2.train.step import loss_function, make_train_step
from tests.reference import SMALL_STACK, tiny_config

CFG = tiny_config(**SMALL_STACK)


def _setup(train_cfg, mesh_shape=None, optimizer=None):
    mesh_shape = mesh_shape or dict(data=1, fsdp=1, tensor=1)
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(list(mesh_shape.values())))])
    tx, schedule = optimizer or make_optimizer(train_cfg)
    state = init_train_state(CFG, tx, mesh, seed=0)
    step = make_train_step(CFG, train_cfg, tx, schedule, mesh, state_shardings(CFG, tx, mesh))
    return mesh, state, step


def _copy_batch(train_cfg, step=0):
    return SyntheticCopySource(global_batch_size=train_cfg.batch_size,
                               encoder_length=train_cfg.encoder_length,
                               decoder_length=train_cfg.decoder_length,
                               vocab_size=CFG.vocab_size, seed=0).batch(step)


@pytest.mark.slow  # by default the mesh-equivalence test (test_sharding) sees the loss fall
def test_training_on_a_repeated_batch_drives_the_loss_to_zero():
    train_cfg = TrainConfig(batch_size=4, encoder_length=12, decoder_length=6, steps=150,
                            learning_rate=1e-2, warmup_steps=10, z_loss=1e-4)
    mesh, state, step = _setup(train_cfg)
    batch = sharding.global_batch_from_host(_copy_batch(train_cfg), mesh)
    losses, nonfinite = [], []
    for _ in range(train_cfg.steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        nonfinite.append(float(metrics["nonfinite"]))
    assert nonfinite == [0.0] * train_cfg.steps
    assert losses[0] > 5.0  # ~log(512) at init
    assert losses[-1] < 0.05, losses[-10:]


@pytest.mark.slow  # by default: test_frozen_vision accumulates 2 micro-batches vs the full batch
def test_gradient_accumulation_equals_the_full_batch():
    base = TrainConfig(batch_size=8, encoder_length=12, decoder_length=6, steps=3,
                       learning_rate=1e-3, warmup_steps=0)
    batch = _copy_batch(base)
    batch["decoder_loss_weights"][::3, -2:] = 0  # uneven token counts across micro-batches
    results = []
    for accum in (1, 4):
        train_cfg = dataclasses.replace(base, grad_accum_steps=accum)
        # SGD: the update is linear in the gradient, so parameters compare to float32 precision
        # (Adam would turn last-bit gradient differences near zero into different step sizes).
        sgd = (optax.sgd(0.1), optax.constant_schedule(0.1))
        mesh, state, step = _setup(train_cfg, dict(data=2, fsdp=1, tensor=1), sgd)
        state, metrics = step(state, sharding.global_batch_from_host(batch, mesh))
        results.append((jax.device_get(metrics), [np.asarray(x) for x in
                                                  jax.tree.leaves(state.params)]))
    (m1, p1), (m4, p4) = results
    for key in ("loss", "grad_norm", "target_tokens"):
        assert m1[key] == pytest.approx(m4[key], rel=1e-5), key
    for a, b in zip(p1, p4):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)  # steps of up to ~2


def test_launch_train_runs_from_a_config(tmp_path):
    from t5g2.train import loop

    config = tiny.get_config()
    config.train.steps = 6
    config.train.log_every = 3
    result = loop.train(config, str(tmp_path))
    metrics = result.metrics
    assert result.step == 6 and not result.preempted
    assert result.checkpoint == str(tmp_path / "checkpoints" / "6")  # the last step is saved
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "model_flops_per_s", "mfu"):
        assert np.isfinite(metrics[key]), key
    assert 0 < metrics["mfu"] < 1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 3, 6]  # the first step, then every 3rd
    assert list((tmp_path / "tensorboard").iterdir())
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["cross_attention"] == "merged"
    # the main job's config ends with one greedy held-out sample per denoiser
    assert [s.denoiser for s in result.samples] == ["R1", "X1", "X2", "X3", "S"]
    assert all(s.input and s.target for s in result.samples)


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 10, r"train.batch_size=10 is not divisible by train.grad_accum_steps=4"),
    ("warmup_steps", -1, r"train.warmup_steps=-1 must be >= 0"),
    ("steps", 0, r"train.steps=0 must be a positive integer"),
    ("on_nonfinite", "ignore", r"train.on_nonfinite='ignore' is unknown; valid: stop, skip"),
    ("max_skipped", 0, r"train.max_skipped=0 must be a positive integer"),
])
def test_bad_train_config(field, value, message):
    cd = tiny.get_config().train
    cd.grad_accum_steps = 4
    cd[field] = value
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_config_dict(cd)


def test_chunked_loss_gives_the_same_loss_and_gradients():
    train_cfg = TrainConfig(batch_size=4, encoder_length=12, decoder_length=10, steps=1,
                            z_loss=1e-3)
    batch = _copy_batch(train_cfg)
    batch["decoder_loss_weights"][1, 6:] = 0
    results = []
    for chunk in (0, 4):  # 10 positions: chunks of 4, 4 and a padded 2
        fn = jax.jit(jax.grad(loss_function(CFG, train_cfg.z_loss, chunk), has_aux=True))
        mesh, state, _ = _setup(train_cfg)
        grads, sums = fn(state.params, sharding.global_batch_from_host(batch, mesh))
        results.append((sums, [np.asarray(g) for g in jax.tree.leaves(grads)]))
    (s0, g0), (s4, g4) = results
    for a, b in zip(s0, s4):
        assert float(a) == pytest.approx(float(b), rel=1e-6)
    for a, b in zip(g0, g4):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max() + 1e-7


@pytest.mark.parametrize("mode", [pytest.param("stop", marks=pytest.mark.slow), "skip"])
def test_an_update_that_overflows_is_flagged_and_skip_keeps_the_state(mode):
    """Finite loss and gradients, but an update past float32's range: the state the step returns
    is not finite, which is what `nonfinite` must say; "skip" returns the given state instead."""
    train_cfg = TrainConfig(batch_size=4, encoder_length=12, decoder_length=6, steps=1,
                            on_nonfinite=mode)
    overflow = optax.chain(optax.scale(3e38), optax.scale(10.0))  # |update| = 3e39 |grad|
    mesh, state, step = _setup(train_cfg, optimizer=(overflow, optax.constant_schedule(1.0)))
    before = [np.array(x) for x in jax.tree.leaves(state.params)]  # copies: the step donates
    state, metrics = step(state, sharding.global_batch_from_host(_copy_batch(train_cfg), mesh))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert float(metrics["nonfinite"]) == 1.0
    after = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    if mode == "skip":
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b)
    else:
        assert not all(np.isfinite(a).all() for a in after)


def test_skipped_steps_end_the_run_only_when_max_skipped_come_in_a_row():
    guard = NonFiniteGuard("skip", max_skipped=2)
    nan = float("nan")
    flags = {1: 0, 2: 1, 3: 0, 4: 1, 5: 1}
    reasons = {s: guard.observe(s, {"nonfinite": f, "loss": nan if f else 1.0, "grad_norm": 1.0})
               for s, f in flags.items()}
    assert [reasons[s] for s in range(1, 5)] == [None] * 4
    assert reasons[5].startswith("steps 4-5 were not finite, train.max_skipped=2 in a row")
    assert guard.report() == {"skipped_steps": 3.0} and guard.report() == {"skipped_steps": 0.0}
    stop = NonFiniteGuard("stop", max_skipped=2)
    assert stop.observe(7, {"nonfinite": 0.0}) is None and stop.report() == {}
    reason = stop.observe(8, {"nonfinite": 1.0, "loss": 2.0, "grad_norm": 3.0})
    assert reason == ("step 8 is not finite (loss=2, grad_norm=3: the update overflowed the "
                      "parameters or optimizer state) and train.on_nonfinite=stop")
