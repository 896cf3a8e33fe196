"""Hugging Face text configs (T5Gemma 2 text/decoder, Gemma 3 text) <-> t5g2 `StackConfig`.

Works on plain dicts (`config.json`, or `PretrainedConfig.to_dict()`), so reading a checkpoint
needs no transformers import.
"""

from __future__ import annotations

from typing import Any, Mapping

import logging

import numpy as np

from t5g2.model.config import ConfigError, StackConfig

FULL, SLIDING = "full_attention", "sliding_attention"
log = logging.getLogger(__name__)


class TensorSource:
    """A checkpoint's tensors, each to be taken once: what is left at the end is an error.

    Keys starting with one of `skip_prefixes` (parts this model does not have, e.g. the vision
    tower of a text-only model) are skipped and counted, never silently dropped.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], name: str,
                 skip_prefixes: tuple[str, ...] = ()):
        self.tensors, self.name, self.skip_prefixes = dict(tensors), name, skip_prefixes
        self.used = {k for k in self.tensors if k.startswith(skip_prefixes)}

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str) -> np.ndarray:
        if key not in self.tensors:
            raise KeyError(f"{self.name} checkpoint has no tensor {key!r}")
        self.used.add(key)
        return self.tensors[key]

    def check_all_taken(self) -> None:
        unexpected = sorted(set(self.tensors) - self.used)
        if unexpected:
            raise ValueError(f"{self.name} checkpoint has tensors t5g2 does not know: "
                             f"{unexpected[:8]}")
        skipped = sum(k.startswith(self.skip_prefixes) for k in self.tensors)
        if skipped:
            log.warning("%s: skipped %d tensors under %s (not used by this model)",
                        self.name, skipped, ", ".join(self.skip_prefixes))


def as_dict(config: Any) -> dict[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def first_id(ids: Any) -> int:
    return ids[0] if isinstance(ids, (list, tuple)) else ids


def to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bf16 has no numpy dtype, so go via float32
        import torch

        value = value.detach().cpu()
        return (value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy())
    return np.asarray(value)


def pattern_from_layer_types(layer_types: list[str], where: str) -> int:
    """The p with 'layer i is global iff (i + 1) % p == 0' that reproduces `layer_types`."""
    n = len(layer_types)
    unknown = sorted(set(layer_types) - {FULL, SLIDING})
    if unknown:
        raise ConfigError(f"{where}.layer_types has unknown types {unknown}")
    candidates = [layer_types.index(FULL) + 1] if FULL in layer_types else [6, n + 1]
    for p in candidates:
        if all((t == FULL) == ((i + 1) % p == 0) for i, t in enumerate(layer_types)):
            return p
    raise ConfigError(f"{where}.layer_types={layer_types} is not a periodic 'local...local, "
                      "global' pattern, which t5g2's scanned layer stack requires")


# The defaults of transformers' Gemma3TextConfig / T5Gemma2TextConfig (identical). Published
# config.json files list only what differs from them (Gemma 3 4B's text_config has 6 keys).
TEXT_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
    sliding_window=4096, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    hidden_activation="gelu_pytorch_tanh", attention_bias=False, rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0, sliding_window_pattern=6)


def rope_parameters(d: Mapping[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """Per-layer-type RoPE entries, folding in the legacy rope_scaling / rope_theta /
    rope_local_base_freq fields the way transformers does."""
    given = d.get("rope_parameters") or {}
    stray = sorted(set(given) - {FULL, SLIDING})
    if stray:
        raise ConfigError(f"{where}.rope_parameters has top-level keys {stray}; the reference "
                          f"ignores them for per-layer-type models: put them under {FULL!r} "
                          f"or {SLIDING!r}")
    full, sliding = dict(given.get(FULL) or {}), dict(given.get(SLIDING) or {})
    full.update(d.get("rope_scaling") or {})
    full.setdefault("rope_theta", d["rope_theta"])
    sliding.setdefault("rope_theta", d["rope_local_base_freq"])
    return {FULL: full, SLIDING: sliding}


def _rope(entry: Mapping[str, Any], where: str) -> tuple[float, float]:
    """(theta, linear factor) of one RoPE entry; anything else is an error, never ignored."""
    if "type" in entry and "rope_type" not in entry:
        raise ConfigError(f"{where}={dict(entry)}: the legacy key 'type' is ignored by the "
                          "reference; name it 'rope_type'")
    rope_type = entry.get("rope_type", "default")
    theta, factor = float(entry["rope_theta"]), float(entry.get("factor", 1.0))
    if rope_type == "linear" or (rope_type == "default" and factor == 1.0):
        return theta, factor
    raise ConfigError(f"{where}={dict(entry)}: t5g2 implements rope_type 'default' (no factor) "
                      "and 'linear'")


def stack_from_hf_text(d: Mapping[str, Any], where: str) -> StackConfig:
    d = {**TEXT_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    act = d.get("hidden_activation") or d.get("hidden_act")
    if act not in ("gelu_pytorch_tanh", None):
        raise ConfigError(f"{where}.hidden_activation={act!r}: t5g2 implements gelu_pytorch_tanh")
    if d.get("attention_bias"):
        raise ConfigError(f"{where}.attention_bias=True is not supported (Gemma 3 has no bias)")
    n = d["num_hidden_layers"]
    layer_types = d.get("layer_types") or [
        FULL if (i + 1) % d["sliding_window_pattern"] == 0 else SLIDING for i in range(n)]
    if len(layer_types) != n:
        raise ConfigError(f"{where}.layer_types has {len(layer_types)} entries for "
                          f"num_hidden_layers={n}")
    rope = rope_parameters(d, where)
    local_theta, local_scale = _rope(rope[SLIDING], f"{where}.rope_parameters.{SLIDING}")
    global_theta, global_scale = _rope(rope[FULL], f"{where}.rope_parameters.{FULL}")
    return StackConfig(
        num_layers=n, d_model=d["hidden_size"], ffn_dim=d["intermediate_size"],
        num_heads=d["num_attention_heads"], num_kv_heads=d["num_key_value_heads"],
        head_dim=d["head_dim"], query_pre_attn_scalar=float(d["query_pre_attn_scalar"]),
        sliding_window=d["sliding_window"],
        sliding_window_pattern=pattern_from_layer_types(list(layer_types), where),
        local_rope_theta=local_theta, global_rope_theta=global_theta,
        local_rope_scale=local_scale, global_rope_scale=global_scale,
        rms_norm_eps=float(d["rms_norm_eps"]))


def _rope_entry(theta: float, scale: float) -> dict[str, Any]:
    if scale == 1.0:
        return {"rope_type": "default", "rope_theta": theta}
    return {"rope_type": "linear", "factor": scale, "rope_theta": theta}


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x  # HF's strict config wants an int here


def hf_text_from_stack(s: StackConfig, **extra: Any) -> dict[str, Any]:
    """The HF text-config fields for one stack (`extra`: vocab_size, token ids, softcap...)."""
    return dict(
        num_hidden_layers=s.num_layers, hidden_size=s.d_model, intermediate_size=s.ffn_dim,
        num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
        head_dim=s.head_dim, query_pre_attn_scalar=_int_if_whole(s.query_pre_attn_scalar),
        sliding_window=s.sliding_window, rms_norm_eps=s.rms_norm_eps,
        hidden_activation="gelu_pytorch_tanh",
        layer_types=[FULL if s.is_global(i) else SLIDING for i in range(s.num_layers)],
        rope_parameters={FULL: _rope_entry(s.global_rope_theta, s.global_rope_scale),
                         SLIDING: _rope_entry(s.local_rope_theta, s.local_rope_scale)},
        **extra)
