"""Where a fresh run starts: random parameters, an adapted Gemma 3, or a T5Gemma 2 checkpoint.

The config file stays the single source of truth: a checkpoint's architecture must equal the
configured one (every difference is an error naming the field and both values), while the run's
own choices (dtypes, remat, and for an adaptation the vocabulary, tying, cross-attention and each
stack's RoPE) come from the config (`t5g2.model.checkpoint_fields` lists them); an adaptation
logs which RoPE settings differ from the source's. Parameters are placed sharded as they load:
each device receives only its slice of the host array, so this works unchanged across processes.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from t5g2.configlib import ConfigError, build, to_dict
from t5g2.convert import checkpoint_files, gemma3, hf_t5gemma2
from t5g2.convert.checkpoint_files import CheckpointError
from t5g2.model import ModelConfig, checkpoint_fields
from t5g2.model.params import path_key
from t5g2.train.state import TrainState, init_train_state, model_graphdef, with_params

log = logging.getLogger(__name__)

# Fields a converted checkpoint does not decide: how this run computes and stores parameters.
RUN_FIELDS = checkpoint_fields.COMPUTE_FIELDS + checkpoint_fields.STORAGE_FIELDS


def chosen_init(config: ml_collections.ConfigDict) -> tuple[str, str] | None:
    """("from_gemma3" | "from_t5gemma2", path) as configured, None for random; both is an error."""
    from t5g2.run_config import InitConfig

    init = build(InitConfig, to_dict(config.init), "init")
    init.validate()  # at most one
    chosen = [(k, getattr(init, k)) for k in ("from_gemma3", "from_t5gemma2") if getattr(init, k)]
    return chosen[0] if chosen else None


def initial_train_state(config: ml_collections.ConfigDict, model_cfg: ModelConfig,
                        tx: optax.GradientTransformation, mesh: Mesh,
                        shardings: TrainState) -> tuple[TrainState, str]:
    """The state a fresh run starts from and a one-line description of its origin, e.g.
    'random initialisation (seed 0)' or 'Gemma 3 checkpoint /x (adapted: 123 tensors)'."""
    chosen = chosen_init(config)
    if chosen is None:
        return (init_train_state(model_cfg, tx, mesh, config.seed),
                f"random initialisation (seed {config.seed}): no init.from_gemma3 / "
                "init.from_t5gemma2 given")
    kind, path = chosen
    if kind == "from_gemma3":
        flat, count = _load(path, "Gemma 3", model_cfg,
                            RUN_FIELDS + checkpoint_fields.ADAPTATION_FIELDS,
                            gemma3.config_from_gemma3, gemma3.adapt_state_dict,
                            rope_from_config=True)
        origin = f"Gemma 3 checkpoint {path} (adapted: {count} tensors)"
    else:
        flat, count = _load(path, "T5Gemma 2", model_cfg, RUN_FIELDS,
                            hf_t5gemma2.config_from_hf, hf_t5gemma2.from_hf_state_dict)
        origin = f"T5Gemma 2 checkpoint {path} ({count} tensors)"
    return with_params(place_params(flat, model_cfg, shardings.params), tx, shardings), origin


def _load(path: str, kind: str, model_cfg: ModelConfig, run_fields: tuple[str, ...],
          config_from: Callable[..., ModelConfig],
          convert: Callable[[Mapping[str, Any], ModelConfig], dict[str, np.ndarray]],
          rope_from_config: bool = False) -> tuple[dict[str, np.ndarray], int]:
    """(t5g2 flat params, tensors read) of the checkpoint at `path`, after checking that its
    architecture with this run's `run_fields` (and RoPE if `rope_from_config`) is `model_cfg`."""
    hf_config = checkpoint_files.read_config(path)
    try:
        theirs = config_from(hf_config, **{f: getattr(model_cfg, f) for f in run_fields})
    except ConfigError as e:
        raise ConfigError(f"{path}/config.json: {e}") from e
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}/config.json: not a {kind} config ({e!r})") from e
    check_architecture(model_cfg, theirs, f"the {kind} checkpoint {path}", rope_from_config)
    state_dict = checkpoint_files.read_state_dict(path)
    try:
        return convert(state_dict, model_cfg), len(state_dict)
    except ConfigError:
        raise
    except (KeyError, ValueError) as e:  # a missing, unexpected or misshapen tensor
        raise CheckpointError(f"{path}: {e.args[0] if e.args else e}") from e


def check_architecture(ours: ModelConfig, theirs: ModelConfig, source: str,
                       rope_from_config: bool = False) -> None:
    """`theirs` (the architecture of `source`) must equal `ours`; with `rope_from_config`, each
    stack's RoPE is ours whatever theirs is, and one info line names each RoPE field that
    changes (source value -> config value)."""
    rope = checkpoint_fields.ROPE_FIELDS if rope_from_config else ()
    every = checkpoint_fields.differences(ours, theirs)
    diffs, changed = [d for d in every if d[0] not in rope], [d for d in every if d[0] in rope]
    if diffs:
        raise ConfigError("; ".join(f"model.{name}={a!r} but {source} has {b!r}"
                                    for name, a, b in diffs)
                          + ": set the config to the checkpoint's values (the config file "
                          "decides the architecture; the checkpoint must match it)")
    if changed:
        log.info("%s: RoPE from the config, not the source (no weight depends on it): %s",
                 source, ", ".join(f"model.{name} {source_value!r} -> {config_value!r}"
                                   for name, config_value, source_value in changed))


def place_params(flat: Mapping[str, np.ndarray], model_cfg: ModelConfig,
                 shardings: nnx.State) -> nnx.State:
    """The model's parameters from host arrays, each device given only its slice (cast to the
    parameter dtype on the way), laid out per `shardings`."""
    _, abstract = model_graphdef(model_cfg)
    by_key = {path_key(p): s for p, s in nnx.to_flat_state(shardings)}
    if set(flat) != set(by_key):
        raise ValueError(f"converted keys differ from the model's: missing "
                         f"{sorted(set(by_key) - set(flat))[:8]}, unexpected "
                         f"{sorted(set(flat) - set(by_key))[:8]}")
    placed = []
    for path, var in nnx.to_flat_state(abstract):
        key = path_key(path)
        host = flat[key]
        if tuple(host.shape) != tuple(var.shape):
            raise CheckpointError(f"parameter {key}: the checkpoint gives shape "
                                  f"{tuple(host.shape)}, the model has {tuple(var.shape)}")
        array = jax.make_array_from_callback(
            var.shape, by_key[key],
            lambda index, host=host, dtype=var.dtype: np.asarray(host[index], dtype=dtype))
        placed.append((path, var.replace(array)))
    return nnx.from_flat_state(placed)
