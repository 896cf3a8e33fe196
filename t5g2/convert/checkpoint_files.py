"""Reading and writing Hugging Face checkpoint directories (config.json + safetensors shards).

Reading memory-maps the safetensors files (their layout is simple: a JSON header, then raw
little-endian bytes) and writing uses safetensors' numpy writer: neither needs torch or
transformers. bfloat16 tensors arrive as ml_dtypes.bfloat16 numpy arrays.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from typing import Any, Mapping

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_FILE = "model-{index:05d}-of-{count:05d}.safetensors"
_SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


class CheckpointError(ValueError):
    """A checkpoint (a Hugging Face directory or a run's own) is missing, incomplete, corrupt or
    unreadable; the message says which file or step."""


def read_config(path: str) -> dict[str, Any]:
    file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} does not exist: no config.json to read (expected a Hugging "
                              "Face checkpoint directory)")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face checkpoint dir?)")
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable config ({e})") from e


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (one model.safetensors or an indexed set of shards)
    as read-only memory maps: nothing is read until used, so a conversion that takes slices (each
    device's part of the embedding) touches only those bytes, and host memory holds what the
    conversion copies, not the whole checkpoint as well."""
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
        tensors.update(map_safetensors(file))
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{path}: tensors listed in the index but absent: {missing[:5]}")
    return tensors


# safetensors dtype names -> numpy (bfloat16 through ml_dtypes, as JAX has it)
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def map_safetensors(file: str) -> dict[str, np.ndarray]:
    """The tensors of one .safetensors file as read-only np.memmap views, after checking the
    header (an 8-byte little-endian length, a JSON table of dtype / shape / byte range) against
    the file's size, so a truncated or damaged file is an error here, not garbage later."""
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{file}: corrupt or unreadable safetensors file ({why})")

    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise corrupt(f"header of {header_len} bytes in a {size}-byte file")
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(str(e)) from e
    start = 8 + header_len
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
            shape, (begin, end) = tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise corrupt(f"tensor {key!r}: bad header entry {entry!r}") from e
        if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end \
                or start + end > size:
            raise corrupt(f"tensor {key!r}: bytes {begin}..{end} for shape {list(shape)} "
                          f"{entry['dtype']} in a file of {size} bytes")
        tensors[key] = (np.memmap(file, dtype, mode="r", offset=start + begin, shape=shape)
                        if math.prod(shape) else np.zeros(shape, dtype))
    return tensors


def split_into_shards(state_dict: Mapping[str, np.ndarray],
                      max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    """Tensors in order, a new shard whenever the next would push one past `max_shard_bytes`; a
    bigger tensor gets a shard of its own (huggingface_hub's split, as `save_pretrained` does)."""
    shards: list[dict[str, np.ndarray]] = []
    current: dict[str, np.ndarray] = {}
    size = 0
    for key, tensor in state_dict.items():
        if tensor.nbytes > max_shard_bytes:
            shards.append({key: tensor})
            continue
        if current and size + tensor.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += tensor.nbytes
    return shards + [current] if current else shards


def _remove_weights(path: str) -> None:
    """Deletes an earlier write's weight files, so a stale index or shard cannot outlive it."""
    for name in os.listdir(path):
        if name in (SINGLE_FILE, INDEX_FILE) or _SHARD_PATTERN.fullmatch(name):
            os.remove(os.path.join(path, name))


class DirectoryNotEmptyError(FileExistsError):
    """A directory to write holds files already, and replacing them was not asked for."""


def require_empty(out: str, overwrite: bool) -> None:
    """Refuses to write into a non-empty directory unless `overwrite`: nothing is lost by
    mistake."""
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise DirectoryNotEmptyError(f"{out} exists and is not empty; pass --overwrite to "
                                     "replace it")


def write_checkpoint(path: str, state_dict: Mapping[str, np.ndarray],
                     config: Mapping[str, Any], max_shard_bytes: int | None = None) -> list[str]:
    """config.json plus the tensors as `from_pretrained` reads them: one model.safetensors, or
    with `max_shard_bytes` and more than that many bytes, numbered shards and
    model.safetensors.index.json laid out as `save_pretrained` writes them. Returns the file
    names written."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    _remove_weights(path)
    tensors = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    shards = (split_into_shards(tensors, max_shard_bytes) if max_shard_bytes else []) or [tensors]
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [SHARD_FILE.format(index=i + 1, count=len(shards)) for i in range(len(shards))])
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        # safetensors writes a private temp file and renames it: give it open()'s mode instead
        os.chmod(os.path.join(path, name), new_file_mode())
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": sum(t.size for t in tensors.values()),
                              "total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        _write_json(os.path.join(path, INDEX_FILE), index)
        names.append(INDEX_FILE)
    _write_json(os.path.join(path, "config.json"), dict(config))
    return ["config.json"] + names


def new_file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the process umask (read from /proc where
    possible, since setting the umask to read it races with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def _write_json(file: str, value: Mapping[str, Any]) -> None:
    with open(file, "w", encoding="utf-8") as f:
        f.write(json.dumps(value, indent=2, sort_keys=True) + "\n")
