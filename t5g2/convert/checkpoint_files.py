"""Reading and writing Hugging Face checkpoint directories (config.json + safetensors shards).

Uses safetensors' numpy/flax readers only: loading a checkpoint needs neither torch nor
transformers. bfloat16 tensors arrive as ml_dtypes.bfloat16 numpy arrays.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or unreadable; the message says which file."""


def read_config(path: str) -> dict[str, Any]:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face checkpoint dir?)")
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable config ({e})") from e


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory: one model.safetensors or an indexed set of shards."""
    from safetensors import safe_open

    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e})") from e
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: shard named in {INDEX_FILE} is missing")
        try:
            with safe_open(file, framework="flax") as f:
                for key in f.keys():
                    tensors[key] = np.asarray(f.get_tensor(key))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{file}: corrupt or unreadable safetensors file ({e})") from e
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{path}: tensors listed in the index but absent: {missing[:5]}")
    return tensors


def write_checkpoint(path: str, state_dict: Mapping[str, np.ndarray],
                     config: Mapping[str, Any]) -> None:
    """One model.safetensors plus config.json (what `from_pretrained` reads)."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
              os.path.join(path, SINGLE_FILE), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
