"""Parameter counts of the released sizes and of every ablation, checked two independent ways.

1. Against transformers itself: `T5Gemma2ForConditionalGeneration` built on the meta device (no
   memory) for the same text config; its vision tower and projector are left out, tied
   parameters are counted once.
2. Against a closed-form formula written here from the dimensions, for every size x tying x
   cross-attention mode (transformers has merged attention only).
"""

import functools
import importlib

import pytest
import torch

from t5g2.convert.hf_t5gemma2 import VISION_PREFIXES, to_hf_config
from t5g2.model import ModelConfig
from t5g2.model.params import count_params

SIZES = ("270m", "1b", "4b")
CROSS_MODES = ("merged", "separate", "global_only")

# Text model, tied embeddings, merged attention (reference notes, section 9).
PUBLISHED_TIED_MERGED = {
    "270m": 368_424_832,
    "1b": 1_697_783_168,
    "4b": 7_089_112_576,
}


@functools.lru_cache(maxsize=None)
def size_config(size: str, tie: bool = True, cross: str = "merged") -> ModelConfig:
    """The size's config with the ablation switches set, through the validated config path."""
    cd = importlib.import_module(f"configs.t5g2_{size}").get_config()
    cd.model.tie_embeddings = tie
    cd.model.cross_attention = cross
    return ModelConfig.from_config_dict(cd.model)


@functools.lru_cache(maxsize=None)
def ours(cfg: ModelConfig) -> int:
    return count_params(cfg)


def hf_text_params(cfg: ModelConfig) -> int:
    """Unique text parameters of the transformers model for `cfg` (vision tower excluded)."""
    from transformers import T5Gemma2ForConditionalGeneration

    with torch.device("meta"):
        model = T5Gemma2ForConditionalGeneration(to_hf_config(cfg))
    seen, text, vision = set(), 0, 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # a tied parameter seen under another name
            continue
        seen.add(id(p))
        if name.startswith(VISION_PREFIXES):
            vision += p.numel()
        else:
            text += p.numel()
    assert vision > 0  # the prefixes matched: the placeholder vision tower was excluded
    assert text == model.num_parameters() - vision  # the same as transformers' own dedup
    return text


def closed_form(cfg: ModelConfig) -> int:
    """Parameter count from the dimensions (encoder and decoder stacks have the same shape)."""
    s = cfg.encoder
    assert s == cfg.decoder
    V, H, I, L = cfg.vocab_size, s.d_model, s.ffn_dim, s.num_layers
    NH, NKV, HD = s.num_heads, s.num_kv_heads, s.head_dim

    attn = 2 * H * HD * (NH + NKV)  # q, k, v, o
    mlp = 3 * H * I  # gate, up, down
    norms = 4 * H + 2 * HD  # 4 sandwich norms, q/k norms
    stack = L * (attn + mlp + norms) + H  # + final norm
    total = 2 * stack + V * H + H  # encoder, decoder, one table + its EOI vector

    if not cfg.tie_embeddings:
        total += V * H + H  # decoder table + its own EOI vector
        total += V * H  # LM head
    cross_block = attn + 2 * HD + 2 * H  # projections, q/k norms, pre/post cross norms
    if cfg.cross_attention == "separate":
        total += L * cross_block
    elif cfg.cross_attention == "global_only":
        total += sum((i + 1) % 6 == 0 for i in range(L)) * cross_block
    return total


@pytest.mark.parametrize("size", SIZES)
def test_published_tied_merged_totals(size):
    cfg = size_config(size)
    assert ours(cfg) == PUBLISHED_TIED_MERGED[size]
    assert closed_form(cfg) == PUBLISHED_TIED_MERGED[size]


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("size", SIZES)
def test_count_matches_transformers(size, tie):
    cfg = size_config(size, tie)
    reference = hf_text_params(cfg)
    assert ours(cfg) == reference
    if tie:
        assert reference == PUBLISHED_TIED_MERGED[size]


@pytest.mark.parametrize("cross", CROSS_MODES)
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("size", SIZES)
def test_count_matches_closed_form(size, tie, cross):
    cfg = size_config(size, tie, cross)
    assert ours(cfg) == closed_form(cfg)


def test_ablations_are_ordered():
    """Untying and un-merging only add parameters; global_only lies between the two modes."""
    for size in SIZES:
        for tie in (True, False):
            merged, sep, glob = (ours(size_config(size, tie, c)) for c in CROSS_MODES)
            assert merged < glob < sep
        for cross in CROSS_MODES:
            assert ours(size_config(size, True, cross)) < ours(size_config(size, False, cross))
