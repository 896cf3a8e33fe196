"""The train step: weighted cross-entropy (+ z-loss), gradient accumulation, AdamW, jit with
explicit shardings and donated state.

Losses and gradients are accumulated as sums over target tokens and divided by the total token
weight once, so k micro-batches give exactly the gradient of one batch of k times the size.

Only the trainable parameters are differentiated (`state.split_trainable`): the frozen ones (the
vision tower) enter the loss as a constant, so they get no gradient buffers and no activations
are kept for their backward; `grad_norm` is the trainable parameters' gradient norm.

Every step also reports `nonfinite`: 1 when its loss, its gradient norm or any value of the
updated parameters and optimizer state is not finite (a finite gradient can still overflow the
update), i.e. exactly when the state it returns could not be saved. With
`train.on_nonfinite="skip"` such a step returns the state it was given: parameters and optimizer
state, the optimizer's own step count included, so the learning-rate schedule does not advance
either (optax's `apply_if_finite` convention); `learning_rate` is the rate the step applied.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5g2 import sharding
from t5g2.model import ModelConfig
from t5g2.train.config import TrainConfig
from t5g2.train.loss import LossSums, chunked_cross_entropy
from t5g2.train.preemption import CHECKPOINT_REQUEST  # optional: in the loop's batches
from t5g2.train.state import TrainState, model_graphdef, split_trainable

Batch = Mapping[str, jax.Array]
MODEL_INPUTS = ("encoder_segment_ids", "encoder_positions", "decoder_segment_ids",
                "decoder_positions", "encoder_images")


def loss_function(model_cfg: ModelConfig, z_loss: float, loss_chunk: int = 0) -> Callable:
    """params, batch -> (total loss sum, LossSums): the model applied to one (micro-)batch."""
    graphdef, _ = model_graphdef(model_cfg)

    def loss_sums(params: nnx.State, batch: Batch):
        model = nnx.merge(graphdef, params)
        hidden = model.hidden_states(batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                                     **{k: batch[k] for k in MODEL_INPUTS if k in batch})
        sums = chunked_cross_entropy(model.logits, hidden, batch["decoder_target_tokens"],
                                     batch["decoder_loss_weights"], z_loss, loss_chunk)
        return sums.total, sums

    return loss_sums


def trainable_loss_function(model_cfg: ModelConfig, z_loss: float,
                            loss_chunk: int = 0) -> Callable:
    """trainable, frozen, batch -> (total loss sum, LossSums): `loss_function` with the
    parameters in the two parts of `split_trainable`, for differentiating the first only."""
    loss_sums = loss_function(model_cfg, z_loss, loss_chunk)

    def trainable_loss_sums(trainable: nnx.State, frozen: nnx.State, batch: Batch):
        return loss_sums(nnx.merge_state(trainable, frozen), batch)

    return trainable_loss_sums


def _microbatches(batch: Batch, steps: int, mesh: Mesh, rules) -> Batch:
    """[B, ...] -> [steps, B/steps, ...], micro-batch a = rows a, a+steps, ... so every device
    keeps its own rows (no resharding)."""
    batch_axes = dict(rules)["batch"]

    def split(x):
        x = x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, batch_axes, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return {k: split(v) for k, v in batch.items()}


def optimizer_count(opt_state: Any, default: jax.Array) -> jax.Array:
    """The optimizer's own count of applied updates (optax's schedule state): the position of the
    learning-rate schedule. It is the train step less the skipped steps; `default` when the
    optimizer keeps none (a constant learning rate)."""
    def is_schedule(x):
        return isinstance(x, optax.ScaleByScheduleState)

    counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(s)]
    return counts[0] if counts else default


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point value in `tree` is finite (a scalar bool)."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def make_train_step(model_cfg: ModelConfig, train_cfg: TrainConfig,
                    tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh,
                    shardings: TrainState,
                    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES):
    """A jitted (state, batch) -> (state, metrics); the input state's buffers are donated."""
    grad_fn = jax.grad(trainable_loss_function(model_cfg, train_cfg.z_loss, train_cfg.loss_chunk),
                       has_aux=True)
    accum = train_cfg.grad_accum_steps
    skip = train_cfg.on_nonfinite == "skip"

    def step(state: TrainState, batch: Batch):
        batch = dict(batch)
        request = batch.pop(CHECKPOINT_REQUEST, None)
        trainable, frozen = split_trainable(state.params, model_cfg)
        with sharding.use_mesh(mesh, rules):
            if accum == 1:
                grads, sums = grad_fn(trainable, frozen, batch)
            else:
                def accumulate(carry, micro):
                    return jax.tree.map(jnp.add, carry, grad_fn(trainable, frozen, micro)), None

                zero = (jax.tree.map(jnp.zeros_like, trainable),
                        LossSums(*(jnp.zeros((), jnp.float32),) * 3))
                (grads, sums), _ = jax.lax.scan(accumulate, zero,
                                                _microbatches(batch, accum, mesh, rules))
            weight = jnp.maximum(sums.weight, 1.0)
            grads = jax.tree.map(lambda g: g / weight, grads)
            updates, opt_state = tx.update(grads, state.opt_state, trainable)
            params = optax.apply_updates(trainable, updates)
        metrics = {"loss": sums.cross_entropy / weight, "z_loss": sums.z_loss / weight,
                   "grad_norm": optax.global_norm(grads),
                   "learning_rate": schedule(optimizer_count(state.opt_state, state.step)),
                   "target_tokens": sums.weight}
        finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["z_loss"])
                  & jnp.isfinite(metrics["grad_norm"]) & all_finite((params, opt_state)))
        if skip:  # keep the state it was given
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                             (params, opt_state), (trainable, state.opt_state))
        params = nnx.merge_state(params, frozen)
        metrics["nonfinite"] = (~finite).astype(jnp.float32)
        if request is not None:
            metrics["checkpoint_requested"] = jnp.max(request).astype(jnp.float32)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh, rules)),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))
