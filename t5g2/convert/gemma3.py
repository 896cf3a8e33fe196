"""Adaptation initialisation: a decoder-only Gemma 3 becomes a T5Gemma 2 encoder-decoder; and
back: a t5g2 decoder written as a Gemma 3 causal LM (`to_gemma3_config`, `to_gemma3_state_dict`,
no torch or transformers needed), e.g. for stand-in checkpoints of any size.

Encoder and decoder both start from the Gemma 3 weights. With merged attention the decoder needs
no new weights: masking every encoder position out makes it exactly the Gemma 3 causal LM. With a
separate cross-attention, each cross block starts as a copy of its layer's self-attention.

Vocabulary: T5Gemma 2 uses 262,144 rows. Gemma 3 4B's table has 262,208 (64 extra rows, the image
soft token 262144 and padding); they are dropped explicitly, and a smaller source table is an
error. The learned end-of-image vector starts as Gemma 3's scaled EOI row (row * sqrt(d) in
float32), so the adapted model embeds EOI as Gemma 3 does in float32 (Gemma 3 in bf16 rounds the
scale, e.g. 25.25 for 25.298, a 0.2% difference).

Vision: a multimodal Gemma 3 (`Gemma3ForConditionalGeneration`, the 4B layout) carries the SigLIP
tower and projector T5Gemma 2 starts from; when the t5g2 config has `vision`, they convert with
`siglip` (the config's tower must be the source's), and otherwise they are skipped and counted.
Every key form loads: transformers 5's in-memory names (`model.language_model.`,
`model.vision_tower.`, `model.multi_modal_projector.`), what its `save_pretrained` writes
(`language_model.model.`, `vision_tower.`, `multi_modal_projector.`) and the released files'
(the same with the tower nested as `vision_tower.vision_model.`). The special ids are the t5g2
config's: Gemma 3's image token (262,144) lies outside T5Gemma 2's 262,144-id vocabulary, so the
adapted model uses its own `image_token_id` (256,001 in T5Gemma 2) and never reads Gemma 3's.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import numpy as np

from t5g2.convert import checkpoint_files, siglip
from t5g2.convert.hf_config import (TEXT_DEFAULTS, TensorSource, as_dict, first_id,
                                   hf_text_from_stack, stack_from_hf_text, to_numpy)
from t5g2.convert.layout import LAYER_WEIGHTS, stack_layers, to_t5g2, to_torch, unstack_layers
from t5g2.model import checkpoint_fields
from t5g2.model.config import ConfigError, ModelConfig, VisionConfig

log = logging.getLogger(__name__)

T5GEMMA2_VOCAB_SIZE = 262_144
# T5Gemma 2 layer names that Gemma 3 spells differently.
_GEMMA3_NAMES = {"pre_self_attn_layernorm.weight": "input_layernorm.weight",
                 "post_self_attn_layernorm.weight": "post_attention_layernorm.weight"}
# Gemma3ForCausalLM, Gemma3ForConditionalGeneration (transformers 5 and 4) text prefixes.
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")
# The tower and projector, as `text_key` leaves them (either key form).
TOWER, PROJECTOR = "vision_tower.", "multi_modal_projector."
VISION_PREFIXES = (TOWER, PROJECTOR)
# config.json model_type of Gemma3ForCausalLM and of the multimodal Gemma3ForConditionalGeneration.
MODEL_TYPES = ("gemma3_text", "gemma3")
# How `to_gemma3_config` writes RoPE. "config": the stack's own, as `rope_parameters`.
# "published": what Gemma 3 270M's and 1B's config.json say, under the legacy names they use:
# theta 1e4 local / 1e6 global, no scaling, 32K context.
PUBLISHED_ROPE = dict(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling=None,
                      max_position_embeddings=32_768)
ROPE_FORMS = ("config", "published")


def config_from_gemma3(gemma3_config: Any, *, vocab_size: int | None = None,
                       **overrides: Any) -> ModelConfig:
    """T5Gemma 2 config with both stacks shaped like the Gemma 3 text model, and for a
    multimodal Gemma 3 its vision tower (`vision`) and begin / end-of-image ids.

    vocab_size: default T5Gemma 2's 262,144, or the source's own size if that is smaller.
    overrides: any ModelConfig field, e.g. cross_attention='separate', tie_embeddings=False.
    """
    top = as_dict(gemma3_config)
    if top.get("model_type", MODEL_TYPES[0]) not in MODEL_TYPES:
        raise ConfigError(f"model_type={top['model_type']!r}: expected a Gemma 3 config "
                          f"({' or '.join(map(repr, MODEL_TYPES))})")
    multimodal = {}
    if top.get("model_type") == MODEL_TYPES[1]:  # missing fields as transformers defaults them
        multimodal = dict(vision=vision_config(top),
                          boi_token_id=top.get("boi_token_index", 255_999),
                          eoi_token_id=top.get("eoi_token_index", 256_000))
    d = top.get("text_config") or top  # a multimodal Gemma3Config nests the text config
    stack = stack_from_hf_text(d, "gemma3")
    fields = dict(
        encoder=stack, decoder=stack,
        vocab_size=vocab_size or min(d.get("vocab_size", TEXT_DEFAULTS["vocab_size"]),
                                    T5GEMMA2_VOCAB_SIZE),
        final_logit_softcap=d.get("final_logit_softcapping"),
        pad_id=d.get("pad_token_id", 0), eos_id=first_id(d.get("eos_token_id", 1)),
        bos_id=d.get("bos_token_id", 2), **multimodal)
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    cfg.validate()
    return cfg


def vision_config(gemma3_config: Any) -> VisionConfig | None:
    """The tower and projector of a multimodal Gemma 3 config (missing fields as transformers
    defaults them); None for a text-only one."""
    top = as_dict(gemma3_config)
    if top.get("model_type") != MODEL_TYPES[1]:
        return None
    tower = dict(top.get("vision_config") or {})
    tower.pop("model_type", None)
    return siglip.vision_from_hf(tower, top.get("mm_tokens_per_image", 256), "vision_config")


def text_key(key: str) -> str:
    """`key` without its text-model prefix (Gemma3ForCausalLM or either multimodal form), the
    LM head as `lm_head.weight`; the tower's and projector's keys start with VISION_PREFIXES."""
    if key in _HEAD_KEYS:
        return "lm_head.weight"
    for prefix in _TEXT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def fit_vocab(table: np.ndarray, vocab_size: int) -> np.ndarray:
    """Keeps the first `vocab_size` rows; a source with fewer rows is an error."""
    if table.shape[0] < vocab_size:
        raise ValueError(f"Gemma 3 table has {table.shape[0]} rows, fewer than the configured "
                         f"vocab_size={vocab_size}")
    if table.shape[0] > vocab_size:
        log.info("dropping %d embedding rows (ids %d..%d) beyond vocab_size=%d",
                 table.shape[0] - vocab_size, vocab_size, table.shape[0] - 1, vocab_size)
    return table[:vocab_size]


def adapt_state_dict(state_dict: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """t5g2 flat params initialised from a Gemma 3 state dict (numpy arrays or torch tensors):
    the vision tower and projector too when `cfg.vision` is set (else skipped and counted)."""
    differ = checkpoint_fields.differences(cfg.encoder, cfg.decoder,
                                           ignore=checkpoint_fields.ROPE_STACK_FIELDS)
    if differ:
        raise ConfigError("adaptation starts both stacks from the one Gemma 3 stack, so "
                          "model.encoder and model.decoder must be equal (RoPE aside): "
                          + ", ".join(f"model.encoder.{f}={a!r} but model.decoder.{f}={b!r}"
                                      for f, a, b in differ))
    sd = TensorSource({text_key(k): to_numpy(v) for k, v in state_dict.items()}, "Gemma 3",
                      VISION_PREFIXES if cfg.vision is None else ())
    take = sd.take

    stack = cfg.decoder
    table = fit_vocab(take("embed_tokens.weight"), cfg.vocab_size)
    head = fit_vocab(take("lm_head.weight"), cfg.vocab_size) if "lm_head.weight" in sd else table
    if cfg.tie_embeddings and head is not table and not np.array_equal(head, table):
        raise ValueError("Gemma 3 lm_head.weight differs from its embedding; set "
                         "tie_embeddings=False to keep both")
    eoi = np.zeros(table.shape[1], table.dtype)
    if cfg.eoi_token_id < cfg.vocab_size:
        eoi = (table[cfg.eoi_token_id].astype(np.float32) * math.sqrt(stack.d_model))
    flat = {"embed/table": table, "embed/eoi": eoi}
    if not cfg.tie_embeddings:
        flat.update({"decoder_embed/table": table, "decoder_embed/eoi": eoi, "lm_head": head})

    layers = {i: {ours: to_t5g2(take(f"layers.{i}.{_GEMMA3_NAMES.get(hf, hf)}"), layout,
                                stack.head_dim)
                  for hf, ours, layout in LAYER_WEIGHTS}
              for i in range(stack.num_layers)}
    final_norm = take("norm.weight")
    flat["encoder/final_norm/scale"] = flat["decoder/final_norm/scale"] = final_norm
    flat.update(stack_layers(cfg.encoder, "encoder/layers", layers))
    decoder_layers = {i: dict(w) for i, w in layers.items()}
    for i, has_cross in enumerate(cfg.decoder_has_cross):
        if has_cross:
            w = decoder_layers[i]
            w.update({"cross_attn/" + k[len("attn/"):]: v for k, v in w.items()
                      if k.startswith("attn/")})
            w["pre_cross_norm/scale"] = w["pre_attn_norm/scale"]
            w["post_cross_norm/scale"] = w["post_attn_norm/scale"]
    flat.update(stack_layers(cfg.decoder, "decoder/layers", decoder_layers))
    if cfg.vision is not None:
        flat.update(siglip.take_vision(sd, cfg.vision, TOWER, PROJECTOR))

    sd.check_all_taken()
    return flat


def to_gemma3_config(cfg: ModelConfig, dtype: str = "float32",
                     rope: str = "config") -> dict[str, Any]:
    """The config.json of the Gemma 3 causal LM that `cfg`'s decoder stack is; `rope`: one of
    ROPE_FORMS (the decoder's RoPE, or the published 270M / 1B form)."""
    text = hf_text_from_stack(cfg.decoder, vocab_size=cfg.vocab_size, pad_token_id=cfg.pad_id,
                              eos_token_id=cfg.eos_id, bos_token_id=cfg.bos_id,
                              final_logit_softcapping=cfg.final_logit_softcap)
    if rope == "published":
        del text["rope_parameters"]
        text.update(PUBLISHED_ROPE)
    elif rope != "config":
        raise ConfigError(f"rope={rope!r} is unknown; valid: {', '.join(ROPE_FORMS)}")
    return dict(model_type=MODEL_TYPES[0], architectures=["Gemma3ForCausalLM"], dtype=dtype,
                tie_word_embeddings=cfg.tie_embeddings, **text)


def to_gemma3_state_dict(flat: Mapping[str, np.ndarray],
                         cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The Gemma3ForCausalLM state dict of `cfg`'s decoder, named as `save_pretrained` writes it
    (a tied lm_head omitted): the decoder half of `adapt_state_dict` inverted. Separate
    cross-attention blocks, the learned EOI vector and the vision tower have no Gemma 3 causal-LM
    counterpart and are left out."""
    untied = not cfg.tie_embeddings
    sd = {"model.embed_tokens.weight": flat["decoder_embed/table" if untied else "embed/table"]}
    for i, weights in unstack_layers(cfg.decoder, "decoder/layers", flat).items():
        for hf, ours, layout in LAYER_WEIGHTS:
            sd[f"model.layers.{i}.{_GEMMA3_NAMES.get(hf, hf)}"] = to_torch(weights[ours], layout)
    sd["model.norm.weight"] = flat["decoder/final_norm/scale"]
    if untied:
        sd["lm_head.weight"] = flat["lm_head"]
    return {k: np.asarray(v) for k, v in sd.items()}


def load_gemma3(path: str, **overrides: Any) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, adapted flat params) from a Gemma 3 checkpoint directory (sharded or not)."""
    cfg = config_from_gemma3(checkpoint_files.read_config(path), **overrides)
    return cfg, adapt_state_dict(checkpoint_files.read_state_dict(path), cfg)
