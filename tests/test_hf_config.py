"""Hugging Face config.json files, complete or sparse, legacy or current, read as transformers
reads them; what t5g2 cannot represent is an error, never silently dropped."""

import dataclasses

import pytest
from transformers import Gemma3Config, Gemma3TextConfig

from configs import t5g2_4b, t5g2_270m
from t5g2.convert import gemma3, hf_t5gemma2
from t5g2.convert.hf_config import stack_from_hf_text
from t5g2.model import ConfigError, ModelConfig
from tests.reference import tiny_config

# The text part of Gemma 3 4B's published config.json: only what differs from the defaults.
GEMMA3_4B_CONFIG = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
    "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
    "mm_tokens_per_image": 256,
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False},
}


def test_sparse_gemma3_4b_config_reads_like_transformers():
    cfg = gemma3.config_from_gemma3(GEMMA3_4B_CONFIG)
    normalised = Gemma3Config(**GEMMA3_4B_CONFIG).text_config.to_dict()
    assert cfg.decoder == stack_from_hf_text(normalised, "reference")
    assert cfg.vocab_size == 262_144  # 262,208 rows in the source; cut explicitly when loading
    expected = ModelConfig.from_config_dict(t5g2_4b.get_config().model)
    assert cfg.decoder == expected.decoder and cfg.encoder == expected.encoder


def test_legacy_rope_fields_fold_in_like_transformers():
    legacy = dict(num_hidden_layers=12, rope_scaling={"rope_type": "linear", "factor": 4.0},
                  rope_theta=500_000.0, rope_local_base_freq=20_000.0)
    ours = stack_from_hf_text(legacy, "legacy")
    assert (ours.global_rope_theta, ours.global_rope_scale) == (500_000.0, 4.0)
    assert (ours.local_rope_theta, ours.local_rope_scale) == (20_000.0, 1.0)
    assert ours == stack_from_hf_text(Gemma3TextConfig(**legacy).to_dict(), "reference")


@pytest.mark.parametrize("rope, message", [
    ({"rope_parameters": {"rope_type": "linear", "factor": 8.0}}, "top-level keys"),
    ({"rope_scaling": {"type": "linear", "factor": 8.0}}, "legacy key 'type'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "implements rope_type"),
])
def test_rope_settings_t5g2_cannot_honour_are_errors(rope, message):
    with pytest.raises(ConfigError, match=message):
        stack_from_hf_text(dict(num_hidden_layers=12, **rope), "gemma3")


def test_irregular_layer_pattern_is_an_error():
    types = ["sliding_attention"] * 5 + ["full_attention"] * 2
    with pytest.raises(ConfigError, match="not a periodic"):
        stack_from_hf_text(dict(num_hidden_layers=7, layer_types=types), "decoder")


@pytest.mark.parametrize("cfg", [tiny_config(), tiny_config(tie_embeddings=False,
                                                            final_logit_softcap=30.0),
                                 ModelConfig.from_config_dict(t5g2_270m.get_config().model)],
                         ids=["tiny", "tiny_untied", "270m"])
def test_config_round_trips_through_transformers(cfg):
    hf = hf_t5gemma2.to_hf_config(cfg)
    runtime = dict(dtype=cfg.dtype, remat=cfg.remat,  # compute settings HF configs do not hold
                   attention_query_chunk=cfg.attention_query_chunk,
                   attention_impl=cfg.attention_impl)
    assert hf_t5gemma2.config_from_hf(hf.to_dict(), **runtime) == cfg
    assert hf_t5gemma2.config_from_hf(type(hf)(**hf.to_dict()), **runtime) == cfg


def test_separate_cross_attention_has_no_hf_equivalent():
    cfg = dataclasses.replace(tiny_config(), cross_attention="separate")
    with pytest.raises(ConfigError, match="merged attention only"):
        hf_t5gemma2.to_hf_config(cfg)
