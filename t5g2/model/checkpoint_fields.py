"""Which model-config fields a checkpoint decides, and how two model configs differ.

A checkpoint fixes the architecture its weights were trained for; the run's config decides the
rest. Each way of starting from a checkpoint ignores a different set of fields:
  resuming a t5g2 run (t5g2.train.checkpoint)  COMPUTE_FIELDS
  continuing a T5Gemma 2 (t5g2.train.init)     COMPUTE_FIELDS + STORAGE_FIELDS + TRAINING_FIELDS
  adapting a Gemma 3 (t5g2.train.init)         those + ADAPTATION_FIELDS + ROPE_FIELDS
Every other field must be equal: one differing is a different model. The vision tower's fields
(`vision.*`) compare like the rest; a model with a tower and one without differ in the one field
`vision` (its fields on one side, None on the other).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

# How this run computes, not what: no checkpoint decides them.
COMPUTE_FIELDS = ("dtype", "remat", "attention_query_chunk", "attention_impl")
# How the parameters are stored. A Hugging Face checkpoint is converted into any dtype and layer
# layout; a t5g2 checkpoint's arrays have the dtype and (scanned or not) layout they were saved in.
STORAGE_FIELDS = ("param_dtype", "scan_layers")
# What training does with the weights, not the weights: which vision parameters train. A Hugging
# Face checkpoint starts any choice; a t5g2 checkpoint's optimizer state holds moments for exactly
# the parameters that trained, so resuming compares it.
TRAINING_FIELDS = ("vision.trainable",)
# What adapting a decoder-only Gemma 3 chooses: T5Gemma 2's vocabulary cut, tying, the
# cross-attention variant, and the special ids: a text-only Gemma 3 has no field for them, and
# a multimodal one's image token (262,144) lies outside T5Gemma 2's vocabulary.
ADAPTATION_FIELDS = ("vocab_size", "tie_embeddings", "cross_attention", "eoi_token_id",
                     "image_token_id", "boi_token_id")
# Each stack's RoPE. No weight depends on it, and position interpolation is part of the
# adaptation recipe (T5Gemma 2 trains with linear x8 on global layers where Gemma 3 270M / 1B
# have none), so an adaptation takes it from the config. A trained T5Gemma 2 keeps its own.
ROPE_STACK_FIELDS = ("local_rope_theta", "global_rope_theta", "local_rope_scale",
                     "global_rope_scale")
ROPE_FIELDS = tuple(f"{side}.{name}" for side in ("encoder", "decoder")
                    for name in ROPE_STACK_FIELDS)


def differences(a: Any, b: Any, ignore: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """(field, value in a, value in b) for every field that differs, nested stacks included,
    sorted by field; a field is a dotted path such as 'encoder.sliding_window'. Works alike on
    ModelConfigs and on their dict (JSON) form; a field missing on one side reads as None.
    `ignore`: fields not compared."""
    out: list[tuple[str, Any, Any]] = []
    _collect(_as_dict(a), _as_dict(b), "", frozenset(ignore), out)
    return out


def _as_dict(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _collect(a: Any, b: Any, prefix: str, ignore: frozenset[str],
             out: list[tuple[str, Any, Any]]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            name = f"{prefix}{key}"
            if name not in ignore:
                _collect(a.get(key), b.get(key), f"{name}.", ignore, out)
    elif a != b:
        out.append((prefix[:-1], a, b))
