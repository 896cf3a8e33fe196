"""Train state (step, parameters, optimizer state), created directly sharded on the mesh.

Parameters are created inside `jit` with the rule-derived out_shardings, so no host ever holds
the whole model; `abstract_train_state` gives the same structure as ShapeDtypeStructs for
ahead-of-time compilation without allocating anything.

The optimizer state covers the trainable parameters only (`split_trainable`): frozen ones (the
vision tower under `model.vision.trainable`) have no moments, so for a text-only model it is
exactly the optimizer state of all the parameters.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5g2 import sharding
from t5g2.model import ModelConfig, T5Gemma2
from t5g2.model.params import path_key
from t5g2.model.vision import frozen_path


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: Any


def model_graphdef(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's structure and its abstract (shape-only) parameters."""
    abstract = nnx.eval_shape(lambda: T5Gemma2(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param)


def split_trainable(params: nnx.State, cfg: ModelConfig) -> tuple[nnx.State, nnx.State]:
    """(trainable, frozen): the parameters training updates and those it holds fixed (by
    `frozen_path` under `cfg.vision.trainable`; none for a text-only model). Works on any tree
    laid out like the parameters (their shardings too); `nnx.merge_state` joins the two."""
    def frozen(path, _):
        return frozen_path(path_key(path), cfg.vision)

    return nnx.split_state(params, lambda path, value: not frozen(path, value), frozen)


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES) -> TrainState:
    """NamedShardings for every leaf of the train state (optimizer moments follow the params)."""
    _, abstract_params = model_graphdef(cfg)
    params = sharding.param_shardings(abstract_params, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = optax.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, split_trainable(abstract_params, cfg)[0]),
        split_trainable(params, cfg)[0],
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return TrainState(step=replicated, params=params, opt_state=opt_state)


def _init(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int) -> TrainState:
    model = T5Gemma2(cfg, rngs=nnx.Rngs(seed))
    _, params = nnx.split(model, nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(split_trainable(params, cfg)[0]))


def init_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, seed: int,
                     rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES) -> TrainState:
    """A freshly initialised, sharded train state (the same numbers on any mesh)."""
    shardings = state_shardings(cfg, tx, mesh, rules)
    with sharding.use_mesh(mesh, rules):
        return jax.jit(lambda: _init(cfg, tx, seed), out_shardings=shardings)()


def abstract_train_state(cfg: ModelConfig, tx: optax.GradientTransformation) -> TrainState:
    return jax.eval_shape(lambda: _init(cfg, tx, 0))


def with_params(params: nnx.State, cfg: ModelConfig, tx: optax.GradientTransformation,
                shardings: TrainState) -> TrainState:
    """A fresh optimizer around given (e.g. converted) parameters, placed per `shardings`."""
    params = jax.device_put(params, shardings.params)
    init_opt = jax.jit(lambda p: tx.init(split_trainable(p, cfg)[0]),
                       out_shardings=shardings.opt_state)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
                      params=params, opt_state=init_opt(params))
