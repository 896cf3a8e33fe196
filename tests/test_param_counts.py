"""Parameter counts of the released sizes and of every ablation, checked two independent ways.

1. Against transformers itself: `T5Gemma2ForConditionalGeneration` built on the meta device (no
   memory) for the same config, the released SigLIP tower and projector included; tied
   parameters are counted once.
2. Against a closed-form formula written here from the dimensions, for every size x tying x
   cross-attention mode (transformers has merged attention only).
Both with the published totals (reference notes, section 9): the text model alone, and with the
417M vision tower and the projector into the text width.
"""

import dataclasses
import functools
import importlib

import numpy as np
import pytest
import torch

from t5g2.convert.hf_t5gemma2 import VISION_PREFIXES, to_hf_config
from t5g2.model import ModelConfig
from t5g2.model.config import VisionConfig
from t5g2.model.params import abstract_model, count_params, param_shapes

SIZES = ("270m", "1b", "4b")
CROSS_MODES = ("merged", "separate", "global_only")

# Text model, tied embeddings, merged attention (reference notes, section 9).
PUBLISHED_TIED_MERGED = {
    "270m": 368_424_832,
    "1b": 1_697_783_168,
    "4b": 7_089_112_576,
}
# The same with the vision tower and projector: HF's `num_parameters()` (section 9).
PUBLISHED_WITH_VISION = {
    "270m": 786_029_296,
    "1b": 2_115_977_456,
    "4b": 7_508_928_880,
}
PUBLISHED_VISION_TOWER = 416_866_032  # the released so400m/14 at 896 px, any text size


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


@functools.lru_cache(maxsize=None)
def ours_vision(cfg: ModelConfig) -> int:
    return sum(int(np.prod(s.shape)) for k, s in param_shapes(abstract_model(cfg)).items()
               if k.startswith("vision/"))


def hf_params(cfg: ModelConfig) -> tuple[int, int]:
    """(unique text parameters, vision tower + projector parameters) of the transformers model
    for `cfg`."""
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
    assert vision > 0  # the prefixes matched
    assert text + vision == model.num_parameters()  # the same as transformers' own dedup
    return text, vision


def closed_form_vision(v: VisionConfig, text_width: int) -> int:
    """The SigLIP tower (no pooling head) and the projector, from the dimensions."""
    VH, VI, P = v.d_model, v.ffn_dim, v.patch_size
    patch = v.num_channels * P * P * VH + VH  # the convolution and its bias
    positions = (v.image_size // P) ** 2 * VH
    layer = 4 * (VH * VH + VH) + (VH * VI + VI) + (VI * VH + VH) + 2 * 2 * VH  # attn, mlp, 2 LNs
    tower = patch + positions + v.num_layers * layer + 2 * VH  # + the final LayerNorm
    return tower + VH * text_width + VH  # projection + soft-embedding norm


def closed_form(cfg: ModelConfig) -> int:
    """Parameter count from the dimensions (encoder and decoder stacks have the same shape),
    the vision tower and projector included when the model has them."""
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
    if cfg.vision is not None:
        total += closed_form_vision(cfg.vision, H)
    return total


@pytest.mark.parametrize("size", SIZES)
def test_published_tied_merged_totals(size):
    cfg = size_config(size)
    assert cfg.vision == VisionConfig()  # the released tower, frozen
    assert ours(cfg) == closed_form(cfg) == PUBLISHED_WITH_VISION[size]
    text_only = dataclasses.replace(cfg, vision=None)
    assert ours(text_only) == closed_form(text_only) == PUBLISHED_TIED_MERGED[size]
    projector = 1152 * cfg.encoder.d_model + 1152
    assert ours_vision(cfg) == PUBLISHED_VISION_TOWER + projector


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("size", SIZES)
def test_count_matches_transformers(size, tie):
    cfg = size_config(size, tie)
    text, vision = hf_params(cfg)
    assert ours(cfg) == text + vision
    assert ours_vision(cfg) == vision
    if tie:
        assert text == PUBLISHED_TIED_MERGED[size]
        assert text + vision == PUBLISHED_WITH_VISION[size]


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
