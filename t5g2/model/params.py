"""Parameters as flat dicts: abstract initialisation, counting, export and loading.

Flat keys are '/'-joined module paths, e.g. 'encoder/layers/periods/layers/5/attn/q' (a stacked
array with a leading period axis) or 'embed/table'. Checkpoints name their arrays by the same
paths joined by '.' (`path_key(path, ".")`).
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from flax import nnx

from t5g2.model.config import ModelConfig
from t5g2.model.transformer import T5Gemma2


def path_key(path, sep: str = "/") -> str:
    """The flat name of a tree path: its keys joined by `sep`.

    `path` holds plain keys (`nnx.to_flat_state`) or JAX key-path entries (DictKey, GetAttrKey,
    SequenceKey from `jax.tree_util.tree_flatten_with_path`). A trailing `.value` attribute, an
    nnx Variable's payload, is left out, so a parameter is named by its module path either way.
    """
    names = [_entry_name(entry) for entry in path]
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        names.pop()
    return sep.join(names)


def _entry_name(entry) -> str:
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def abstract_model(cfg: ModelConfig) -> T5Gemma2:
    """The model with ShapeDtypeStruct leaves: no parameter memory is allocated."""
    return nnx.eval_shape(lambda: T5Gemma2(cfg, rngs=nnx.Rngs(0)))


def param_shapes(model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    return {path_key(p): jax.ShapeDtypeStruct(v.shape, v.dtype)
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def logical_axes(model: nnx.Module) -> dict[str, tuple[str, ...]]:
    """Logical axis names of every parameter (stacked ones start with 'layers')."""
    return {path_key(p): tuple(v.get_metadata()["out_sharding"])
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def count_params(cfg: ModelConfig) -> int:
    """Exact parameter count, computed abstractly."""
    return sum(int(np.prod(s.shape)) for s in param_shapes(abstract_model(cfg)).values())


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    return {path_key(p): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_params(model: nnx.Module, flat: Mapping[str, np.ndarray]) -> None:
    """Writes `flat` into `model` in place; every parameter must be given with its exact shape."""
    state = nnx.state(model, nnx.Param)
    flat_state = nnx.to_flat_state(state)
    expected = {path_key(p): v for p, v in flat_state}
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise ValueError(f"parameter keys differ from the model's: missing {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}")
    updated = []
    for path, var in flat_state:
        value = flat[path_key(path)]
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"parameter {path_key(path)}: shape {tuple(value.shape)} given, the "
                             f"model has {tuple(var.shape)}")
        updated.append((path, var.replace(jax.numpy.asarray(value, dtype=var.dtype))))
    nnx.update(model, nnx.from_flat_state(updated))
