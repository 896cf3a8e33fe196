"""Helpers that build Hugging Face reference models (torch, CPU, float32) for parity tests."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from flax import nnx

from configs import base, tiny
from t5g2.convert import hf_t5gemma2
from t5g2.convert.hf_config import hf_text_from_stack
from t5g2.model import ModelConfig, T5Gemma2
from t5g2.model.config import VisionConfig
from t5g2.model.params import load_params


# The smallest stack that still has every structure: one scanned period (a local and a global
# layer) and a one-layer unscanned tail. Compiles several times faster than the 12-layer config.
SMALL_STACK = dict(num_layers=3, sliding_window_pattern=2)


def tiny_config(**overrides) -> ModelConfig:
    """The tiny config, with ModelConfig / StackConfig overrides (stack fields apply to both)."""
    base = ModelConfig.from_config_dict(tiny.get_config().model)
    stack_fields = {f.name for f in dataclasses.fields(base.encoder)}
    stack = {k: overrides.pop(k) for k in list(overrides) if k in stack_fields}
    enc = dataclasses.replace(base.encoder, **stack)
    cfg = dataclasses.replace(base, encoder=enc, decoder=enc, **overrides)
    cfg.validate()
    return cfg


def tiny_vision_config(**overrides) -> ModelConfig:
    """`tiny_config` with the tiny tower (`configs.base.TINY_VISION`) and a begin-of-image id."""
    return tiny_config(vision=VisionConfig(**base.TINY_VISION), boi_token_id=502, **overrides)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random at a scale that keeps activations O(1): norms and EOI included."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in model.named_parameters():
        if p.ndim >= 2:
            std = p.shape[-1] ** -0.5
        else:
            std = 0.3
        p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def hf_t5gemma2_model(cfg: ModelConfig, seed: int = 0):
    from transformers import T5Gemma2ForConditionalGeneration

    hf_cfg = hf_t5gemma2.to_hf_config(cfg)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = T5Gemma2ForConditionalGeneration(hf_cfg).float()
    return randomize_(model, seed)


def hf_gemma3_model(cfg: ModelConfig, seed: int = 0, vocab_size: int | None = None):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    text = hf_text_from_stack(cfg.decoder, vocab_size=vocab_size or cfg.vocab_size,
                              pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id,
                              bos_token_id=cfg.bos_id,
                              final_logit_softcapping=cfg.final_logit_softcap)
    hf_cfg = Gemma3TextConfig(**text, attn_implementation="eager")
    torch.manual_seed(seed)
    return randomize_(Gemma3ForCausalLM(hf_cfg).float(), seed)


def t5g2_model(cfg: ModelConfig, flat: dict[str, np.ndarray]) -> T5Gemma2:
    model = T5Gemma2(cfg, rngs=nnx.Rngs(0))
    load_params(model, flat)
    return model


def padded_batch(rng: np.random.Generator, vocab: int, lengths: list[int], total: int,
                 left: bool = False, special: int | None = None):
    """Tokens [B, total] (ids >= 3) and a 0/1 mask, padded right (or left) to `total`."""
    tokens = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for row, n in enumerate(lengths):
        seq = rng.integers(3, vocab, size=n)
        if special is not None:
            seq[n // 2] = special
        span = slice(total - n, total) if left else slice(0, n)
        tokens[row, span], mask[row, span] = seq, 1
    return tokens, mask
