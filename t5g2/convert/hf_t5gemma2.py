"""Hugging Face `T5Gemma2ForConditionalGeneration` <-> t5g2 parameters, in both directions.

State dicts use the on-disk names (`model.encoder.layers...`); the in-memory names
(`model.encoder.text_model...`) are accepted too. Tied checkpoints omit the decoder embedding and
LM head keys; they are accepted if present and must then equal the encoder table. The vision
tower and projector convert with `siglip`; a text-only t5g2 model (`vision` None) skips and
counts their keys, and exports with a one-layer placeholder tower config that reads back as
text-only.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from t5g2.convert import checkpoint_files, siglip
from t5g2.convert.hf_config import (TEXT_DEFAULTS, TensorSource, as_dict, first_id,
                                   hf_text_from_stack, stack_from_hf_text, to_numpy)
from t5g2.convert.layout import (LAYER_WEIGHTS, stack_layers, to_t5g2, to_torch,
                                 unstack_layers)
from t5g2.model.config import ConfigError, ModelConfig

TOWER, PROJECTOR = "model.encoder.vision_tower.", "model.encoder.multi_modal_projector."
VISION_PREFIXES = (TOWER, PROJECTOR)
_IN_MEMORY_ALIASES = (("model.encoder.text_model.", "model.encoder."),)
SIDES = ("encoder", "decoder")

# Exported configs need some vision tower; this minimal one marks a text-only export.
TEXT_ONLY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, image_size=28, patch_size=14,
                        vision_use_head=False)


def config_from_hf(hf_config: Any, **overrides: Any) -> ModelConfig:
    """ModelConfig from a T5Gemma2Config (or its dict / config.json); `overrides` e.g. dtype."""
    d = as_dict(hf_config)
    if d.get("model_type") not in (None, "t5gemma2"):
        raise ConfigError(f"model_type={d.get('model_type')!r}: expected 't5gemma2'")
    enc, dec = ({**TEXT_DEFAULTS, **c} for c in (d["encoder"]["text_config"], d["decoder"]))
    if enc["vocab_size"] != dec["vocab_size"]:
        raise ConfigError(f"encoder vocab_size={enc['vocab_size']} != decoder vocab_size="
                          f"{dec['vocab_size']}")
    eoi = d.get("eoi_token_index") or d["encoder"].get("eoi_token_index", 256_000)
    boi = d.get("boi_token_index") or d["encoder"].get("boi_token_index", 255_999)
    fields = dict(
        encoder=stack_from_hf_text(enc, "encoder.text_config"),
        decoder=stack_from_hf_text(dec, "decoder"),
        vocab_size=dec["vocab_size"], tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        cross_attention="merged", final_logit_softcap=dec.get("final_logit_softcapping"),
        pad_id=dec.get("pad_token_id", 0), eos_id=first_id(dec.get("eos_token_id", 1)),
        bos_id=dec.get("bos_token_id", 2), eoi_token_id=eoi,
        image_token_id=d.get("image_token_index", 256_001), boi_token_id=boi,
        vision=_vision_from_hf(d["encoder"]))
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    cfg.validate()
    return cfg


def _vision_from_hf(encoder: Mapping[str, Any]):
    """The VisionConfig of a T5Gemma 2 encoder config, or None for t5g2's text-only marker."""
    vision = dict(encoder.get("vision_config") or {})
    vision.pop("model_type", None)
    if all(vision.get(k) == v for k, v in TEXT_ONLY_VISION.items()):
        return None
    return siglip.vision_from_hf(vision, encoder.get("mm_tokens_per_image", 256),
                                 "encoder.vision_config")


def to_hf_config_dict(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """The config.json of `cfg` as a T5Gemma 2 (`save_pretrained`'s fields, the defaults left to
    transformers), built without importing transformers. A text-only model gets the one-layer
    placeholder tower (T5Gemma 2 always has one), which `config_from_hf` reads as text-only."""
    _require_merged(cfg)
    shared = dict(vocab_size=cfg.vocab_size, pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id,
                  bos_token_id=cfg.bos_id, final_logit_softcapping=cfg.final_logit_softcap,
                  tie_word_embeddings=cfg.tie_embeddings)
    if cfg.vision is None:
        vision = dict(TEXT_ONLY_VISION)
        tokens_per_image = (vision["image_size"] // vision["patch_size"]) ** 2
    else:
        vision, tokens_per_image = siglip.hf_from_vision(cfg.vision), cfg.vision.tokens_per_image
    encoder = dict(model_type="t5gemma2_encoder",
                   text_config=dict(model_type="t5gemma2_text",
                                    **hf_text_from_stack(cfg.encoder, **shared)),
                   vision_config=dict(model_type="siglip_vision_model", **vision),
                   mm_tokens_per_image=tokens_per_image, boi_token_index=cfg.boi_token_id,
                   eoi_token_index=cfg.eoi_token_id, image_token_index=cfg.image_token_id,
                   tie_word_embeddings=cfg.tie_embeddings)
    return dict(model_type="t5gemma2", architectures=["T5Gemma2ForConditionalGeneration"],
                dtype=dtype, encoder=encoder,
                decoder=dict(model_type="t5gemma2_decoder",
                             **hf_text_from_stack(cfg.decoder, **shared)),
                tie_word_embeddings=cfg.tie_embeddings, boi_token_index=cfg.boi_token_id,
                eoi_token_index=cfg.eoi_token_id, image_token_index=cfg.image_token_id)


def to_hf_config(cfg: ModelConfig):
    """The transformers T5Gemma2Config for `cfg` (imports transformers)."""
    from transformers import T5Gemma2Config

    return T5Gemma2Config.from_dict(to_hf_config_dict(cfg))


def _require_merged(cfg: ModelConfig) -> None:
    if cfg.cross_attention != "merged":
        raise ConfigError(f"model.cross_attention={cfg.cross_attention!r}: the Hugging Face "
                          "T5Gemma 2 has merged attention only")


def _embedding_keys(cfg: ModelConfig) -> dict[str, str]:
    """t5g2 embedding params -> HF keys (encoder table always; the rest only when untied)."""
    keys = {"embed/table": "model.encoder.embed_tokens.weight",
            "embed/eoi": "model.encoder.embed_tokens.eoi_embedding"}
    if not cfg.tie_embeddings:
        keys.update({"decoder_embed/table": "model.decoder.embed_tokens.weight",
                     "decoder_embed/eoi": "model.decoder.embed_tokens.eoi_embedding",
                     "lm_head": "lm_head.out_proj.weight"})
    return keys


_TIED_COPIES = {"model.decoder.embed_tokens.weight": "model.encoder.embed_tokens.weight",
                "model.decoder.embed_tokens.eoi_embedding":
                    "model.encoder.embed_tokens.eoi_embedding",
                "lm_head.out_proj.weight": "model.encoder.embed_tokens.weight"}


def _canonical(key: str) -> str:
    for alias, name in _IN_MEMORY_ALIASES:
        if key.startswith(alias):
            return name + key[len(alias):]
    return key


def from_hf_state_dict(state_dict: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """t5g2 flat params from a T5Gemma 2 state dict (numpy arrays or torch tensors)."""
    _require_merged(cfg)
    sd = TensorSource({_canonical(k): to_numpy(v) for k, v in state_dict.items()},
                      "T5Gemma 2", VISION_PREFIXES if cfg.vision is None else ())
    take = sd.take
    flat = {ours: take(hf) for ours, hf in _embedding_keys(cfg).items()}
    if cfg.tie_embeddings:
        for copy, source in _TIED_COPIES.items():
            if copy in sd:
                if not np.array_equal(take(copy), sd.tensors[source]):
                    raise ValueError(f"{copy} differs from {source} but the config ties them")
    for side in SIDES:
        stack = getattr(cfg, side)
        flat[f"{side}/final_norm/scale"] = take(f"model.{side}.norm.weight")
        layers = {i: {ours: to_t5g2(take(f"model.{side}.layers.{i}.{hf}"), layout,
                                    stack.head_dim)
                      for hf, ours, layout in LAYER_WEIGHTS}
                  for i in range(stack.num_layers)}
        flat.update(stack_layers(stack, f"{side}/layers", layers))
    if cfg.vision is not None:
        flat.update(siglip.take_vision(sd, cfg.vision, TOWER, PROJECTOR))
    sd.check_all_taken()
    return flat


def to_hf_state_dict(flat: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The T5Gemma 2 state dict (on-disk names; tied copies omitted, as `save_pretrained` does)."""
    _require_merged(cfg)
    sd = {hf: np.asarray(flat[ours]) for ours, hf in _embedding_keys(cfg).items()}
    for side in SIDES:
        stack = getattr(cfg, side)
        sd[f"model.{side}.norm.weight"] = np.asarray(flat[f"{side}/final_norm/scale"])
        for i, weights in unstack_layers(stack, f"{side}/layers", flat).items():
            for hf, ours, layout in LAYER_WEIGHTS:
                sd[f"model.{side}.layers.{i}.{hf}"] = to_torch(np.asarray(weights[ours]), layout)
    if cfg.vision is not None:
        sd.update(siglip.put_vision(flat, cfg.vision, TOWER, PROJECTOR))
    return sd


def load_pretrained(path: str, **overrides: Any) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, flat params) from a T5Gemma 2 checkpoint directory saved by `save_pretrained`."""
    cfg = config_from_hf(checkpoint_files.read_config(path), **overrides)
    return cfg, from_hf_state_dict(checkpoint_files.read_state_dict(path), cfg)
