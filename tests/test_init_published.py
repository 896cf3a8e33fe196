"""Adapting Gemma 3 checkpoints in the form they are published in: 270M / 1B (no RoPE scaling,
32K context) and 4B (linear x8, multimodal layout, a 262,208-row table), each adapted with the
shipped config's RoPE (linear x8 on global layers). Shapes are shrunk; every other field is as
published."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
import types

import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

import configs.t5g2_1b
import configs.t5g2_270m
import configs.t5g2_4b
from configs import tiny
from launch.make_gemma3 import make_gemma3, random_gemma3
from t5g2.configlib import ConfigError
from t5g2.convert import checkpoint_files, gemma3
from t5g2.model import ModelConfig
from t5g2.model.params import abstract_model, param_shapes
from t5g2.train import loop
from t5g2.train.state import model_graphdef
from tests.reference import SMALL_STACK, randomize_, tiny_config
from tests.test_init import _gemma3_logit_gap, _start
from tests.test_parity_hf import TOL

# Each published config.json with only the sizes shrunk: SHRUNK (6 layers: one 5 local : 1 global
# period) and, for 270M / 1B, a 512-id vocabulary. 270M's is transformers 4.55's form
# (layer_types), 1B's 4.50's.
SHRUNK = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=6)
PUBLISHED_1B = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": 1, "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "initializer_range": 0.02,
    "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
    "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True,
    "vocab_size": 512, **SHRUNK}
PUBLISHED_270M = {
    **{k: v for k, v in PUBLISHED_1B.items() if k not in ("cache_implementation",
                                                           "sliding_window_pattern")},
    "_sliding_window_pattern": 6, "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
    "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0,
    "transformers_version": "4.55.0.dev0", "use_bidirectional_attention": False}
# Gemma 3 4B: Gemma3ForConditionalGeneration; its text_config lists only what differs from
# transformers' defaults (vocab 262,208, 8 / 4 heads, head_dim 256, 131,072 positions).
PUBLISHED_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
    "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
    "initializer_range": 0.02, "mm_tokens_per_image": 4, "model_type": "gemma3",
    "text_config": {**SHRUNK, "model_type": "gemma3_text", "sliding_window": 1024,
                    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 8, "image_size": 28, "intermediate_size": 16,
                      "model_type": "siglip_vision_model", "num_attention_heads": 2,
                      "num_hidden_layers": 1, "patch_size": 14, "vision_use_head": False}}
# transformers 5 module paths -> the names in Gemma 3 4B's published safetensors.
_PUBLISHED_NAMES = {"model.language_model.": "language_model.model.",
                    "model.vision_tower.": "vision_tower.vision_model.",
                    "model.multi_modal_projector.": "multi_modal_projector."}
SCALED = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}  # the shipped configs' global


# PUBLISHED_4B's vision_config as t5g2's VisionConfig fields.
SHRUNK_TOWER = dict(d_model=8, ffn_dim=16, num_layers=1, num_heads=2, image_size=28,
                    patch_size=14, tokens_per_image=4)


def _shipped(module, vocab_size: int, num_layers: int = 6, tower: dict | None = None,
             **special_ids) -> ModelConfig:
    """The shipped config `module` with the shrunk sizes and float32, its RoPE untouched; its
    vision tower shrunk to `tower`, or without one (the text path: where the tower starts is
    tests/test_init_vision.py's)."""
    model = module.get_config().model
    assert model.vision.d_model == 1152  # shipped with the released tower
    if tower is None:
        model.vision = None
    else:
        model.vision.update(tower)
    for side in ("encoder", "decoder"):
        model[side].update(num_layers=num_layers, d_model=16, ffn_dim=32)
    model.update(vocab_size=vocab_size, dtype="float32", remat="none", attention_query_chunk=0,
                 **special_ids)
    cfg = ModelConfig.from_config_dict(model)
    assert cfg.encoder.global_rope_scale == cfg.decoder.global_rope_scale == 8.0  # as shipped
    return cfg


def _write_text_gemma3(path, published: dict, seed: int):
    """A random Gemma3ForCausalLM saved with `published` as its config.json, as transformers
    reads that file."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    hf_cfg = Gemma3TextConfig.from_dict(published, attn_implementation="eager")
    model = randomize_(Gemma3ForCausalLM(hf_cfg).float(), seed)
    model.save_pretrained(path, max_shard_size="50KB")
    (path / "config.json").write_text(json.dumps(published))
    return model


def _rope_line(path, changes: str) -> str:
    return (f"the Gemma 3 checkpoint {path}: RoPE from the config, not the source (no weight "
            f"depends on it): {changes}")


def _rope_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "t5g2.train.init" and "RoPE from the config" in r.getMessage()]


def test_published_1b_form_adapts_with_the_configs_rope(tmp_path, caplog):
    """configs/t5g2_1b.py on the published 1B form: the weights are the source's, RoPE is the
    config's. The adapted decoder is the source Gemma 3 run by transformers with linear x8 on
    global layers, and not the source as is."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    source = _write_text_gemma3(tmp_path, PUBLISHED_1B, seed=5)
    as_read = Gemma3TextConfig.from_pretrained(tmp_path)
    assert as_read.rope_parameters["full_attention"] == {"rope_type": "default",
                                                          "rope_theta": 1e6}
    cfg = _shipped(configs.t5g2_1b, vocab_size=512, eoi_token_id=500, image_token_id=501)

    with caplog.at_level(logging.INFO, logger="t5g2.train.init"):
        state, origin, _, _ = _start(cfg, from_gemma3=str(tmp_path))
    # 13 tensors per layer (4 projections, 2 q/k norms, 4 block norms, 3 MLP) + table + norm.
    assert origin == f"Gemma 3 checkpoint {tmp_path} (adapted: {6 * 13 + 2} tensors)"
    assert _rope_lines(caplog) == [_rope_line(tmp_path, "model.decoder.global_rope_scale 1.0 "
                                              "-> 8.0, model.encoder.global_rope_scale 1.0 -> 8.0")]

    as_read.rope_parameters["full_attention"] = dict(SCALED)
    scaled = Gemma3ForCausalLM.from_pretrained(tmp_path, config=as_read, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    model = nnx.merge(model_graphdef(cfg)[0], state.params)
    gap, scale = _gemma3_logit_gap(scaled, model, cfg)
    unscaled_gap, _ = _gemma3_logit_gap(source, model, cfg)
    # Measured: gap 1.7e-5 on logits up to 5.4; 0.58 from the unscaled source.
    assert scale > 1.0 and gap <= TOL
    assert unscaled_gap > 100 * TOL


def test_an_adaptation_run_of_the_published_270m_form_starts(tmp_path, caplog):
    """launch.train's path with configs/t5g2_270m.py (sizes shrunk, RoPE as shipped) and
    --config.init.from_gemma3 on the published 270M form: no flag needed, the change logged.
    Two layers (both local) keep the step's compilation short; the test above checks the
    numbers."""
    source = tmp_path / "gemma3"
    _write_text_gemma3(source, {**PUBLISHED_270M, "num_hidden_layers": 2,
                                "layer_types": ["sliding_attention"] * 2}, seed=6)
    config = configs.t5g2_270m.get_config()
    cfg = _shipped(configs.t5g2_270m, vocab_size=512, eoi_token_id=500, image_token_id=501,
                   num_layers=2)
    config.model = ml_collections.ConfigDict(cfg.to_dict())
    config.init.from_gemma3 = str(source)
    config.data.source = "synthetic"
    config.train.update(steps=1, batch_size=8, encoder_length=24, decoder_length=16,
                        loss_chunk=0)
    config.mesh = tiny.get_config().mesh
    config.checkpoint.enabled = False
    config.peak_flops_per_device = 1e9
    with caplog.at_level(logging.INFO):
        result = loop.train(config, str(tmp_path / "run"))
    assert result.step == 1 and np.isfinite(result.metrics["loss"])
    assert abs(result.metrics["loss"] - np.log(512)) > 0.1  # the source's weights, not random
    assert _rope_lines(caplog) == [_rope_line(source, "model.decoder.global_rope_scale 1.0 -> "
                                              "8.0, model.encoder.global_rope_scale 1.0 -> 8.0")]


def _write_multimodal_gemma3(path, seed: int):
    """A random Gemma3ForConditionalGeneration as Gemma 3 4B is published: its config.json and
    its tensor names (language_model.model.*, vision_tower.vision_model.*, no lm_head), in
    shards with an index."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    hf_cfg = Gemma3Config.from_dict(PUBLISHED_4B)
    hf_cfg.text_config._attn_implementation = "eager"
    model = randomize_(Gemma3ForConditionalGeneration(hf_cfg).float(), seed)
    state_dict = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to the embedding
        prefix = next(p for p in _PUBLISHED_NAMES if key.startswith(p))
        state_dict[_PUBLISHED_NAMES[prefix] + key[len(prefix):]] = value.numpy()
    checkpoint_files.write_checkpoint(str(path), state_dict, PUBLISHED_4B,
                                      max_shard_bytes=10_000_000)
    return state_dict


def test_published_4b_form_adapts_cut_to_the_t5gemma2_vocabulary(tmp_path, caplog):
    from transformers import Gemma3ForConditionalGeneration

    written = _write_multimodal_gemma3(tmp_path, seed=7)
    table = written["language_model.model.embed_tokens.weight"]
    assert table.shape == (262_208, 16)
    # The shipped ids (EOI 256,000, image 256,001: Gemma 3's image token 262,144 is cut).
    cfg = _shipped(configs.t5g2_4b, vocab_size=262_144, tower=SHRUNK_TOWER)
    with caplog.at_level(logging.INFO):
        state, origin, _, _ = _start(cfg, from_gemma3=str(tmp_path))
    assert origin.startswith(f"Gemma 3 checkpoint {tmp_path} (adapted: ")
    assert np.array_equal(np.asarray(state.params["embed"]["table"][...]), table[:262_144])
    messages = [r.getMessage() for r in caplog.records]
    assert ("dropping 64 embedding rows (ids 262144..262207) beyond vocab_size=262144"
            in messages)
    assert not any(m.startswith("Gemma 3: skipped ") for m in messages)  # the tower is taken
    assert _rope_lines(caplog) == []  # already linear x8: nothing changes

    # transformers reads the published layout too: the adapted decoder is its text model.
    source = Gemma3ForConditionalGeneration.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    assert source.config.text_config.rope_parameters["full_attention"] == SCALED

    def text_logits(**inputs):
        return types.SimpleNamespace(logits=source(**inputs).logits[..., :262_144])

    model = nnx.merge(model_graphdef(cfg)[0], state.params)
    gap, scale = _gemma3_logit_gap(text_logits, model, cfg)
    # Measured: gap 1.0e-5 on logits up to 5.2.
    assert scale > 1.0 and gap <= TOL

    # The tower (vision_tower.vision_model.*) and projector are the source's: the same image
    # tokens from the same images.
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        theirs = source.get_image_features(torch.tensor(pixels.transpose(0, 3, 1, 2)))
    theirs = theirs.pooler_output.numpy()
    ours = np.asarray(model.vision(pixels[None], model.dtype))[0]
    assert ours.shape == theirs.shape == (2, 4, 16) and np.abs(theirs).max() > 0.1
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


def test_make_gemma3_writes_the_published_rope_form(tmp_path, caplog):
    """--rope=published: Gemma 3 270M / 1B's RoPE fields, the same weights; the adaptation
    takes the config's RoPE from it and says so."""
    from transformers import Gemma3TextConfig

    cfg = tiny_config(**SMALL_STACK)  # the tiny config's RoPE: linear x8 on global layers
    make_gemma3(cfg, str(tmp_path), seed=1, rope="published")
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" not in written
    assert {k: written[k] for k in ("rope_scaling", "rope_theta", "rope_local_base_freq",
                                    "max_position_embeddings")} == {
        "rope_scaling": None, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
        "max_position_embeddings": 32768}
    assert Gemma3TextConfig.from_pretrained(tmp_path).rope_parameters == {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    same = random_gemma3(cfg, seed=1)[1]  # the weights --rope=config writes
    published = checkpoint_files.read_state_dict(str(tmp_path))
    assert same.keys() == published.keys()
    assert all(np.array_equal(same[k], published[k]) for k in same)

    with caplog.at_level(logging.INFO, logger="t5g2.train.init"):
        _start(cfg, from_gemma3=str(tmp_path))
    assert _rope_lines(caplog) == [_rope_line(tmp_path, "model.decoder.global_rope_scale 1.0 "
                                              "-> 8.0, model.encoder.global_rope_scale 1.0 -> 8.0")]
    with pytest.raises(ConfigError, match="rope='scaled' is unknown; valid: config, published"):
        gemma3.to_gemma3_config(cfg, rope="scaled")


def test_make_gemma3_command_line_rope_flag(tmp_path):
    out = tmp_path / "gemma3"
    done = subprocess.run([sys.executable, "-m", "launch.make_gemma3", "--config",
                           "configs/tiny.py", "--out", str(out), "--rope=published",
                           "--max_shard_mb=0"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr
    assert "published RoPE" in done.stdout
    assert json.loads((out / "config.json").read_text())["rope_scaling"] is None


def test_a_t5gemma2_keeps_its_rope(tmp_path):
    """Continuing a T5Gemma 2 is continuing that model: its RoPE must be the config's."""
    from tests.reference import hf_t5gemma2_model

    cfg = tiny_config(**SMALL_STACK)
    hf_t5gemma2_model(cfg, seed=1).save_pretrained(tmp_path)
    stack = dataclasses.replace(cfg.encoder, global_rope_scale=1.0)
    other = dataclasses.replace(cfg, encoder=stack, decoder=stack)
    with pytest.raises(ConfigError, match=f"model.decoder.global_rope_scale=1.0 but the T5Gemma 2 "
                                          f"checkpoint {tmp_path} has 8.0"):
        _start(other, from_t5gemma2=str(tmp_path))


def test_adaptation_lets_each_stack_have_its_own_rope():
    """Both stacks start as the one Gemma 3 stack: they must agree in everything but RoPE."""
    cfg = tiny_config(**SMALL_STACK)
    rng = np.random.default_rng(3)
    shapes = param_shapes(abstract_model(cfg))
    state_dict = gemma3.to_gemma3_state_dict(
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in shapes.items()}, cfg)
    encoder = dataclasses.replace(cfg.encoder, global_rope_scale=1.0, local_rope_theta=5e4)
    own_rope = dataclasses.replace(cfg, encoder=encoder)
    same, own = (gemma3.adapt_state_dict(state_dict, c) for c in (cfg, own_rope))
    assert same.keys() == own.keys() and all(np.array_equal(same[k], own[k]) for k in same)

    other = dataclasses.replace(cfg, encoder=dataclasses.replace(encoder, sliding_window=4))
    with pytest.raises(ConfigError, match="must be equal \\(RoPE aside\\): model.encoder."
                                          "sliding_window=4 but model.decoder.sliding_window=8$"):
        gemma3.adapt_state_dict(state_dict, other)
