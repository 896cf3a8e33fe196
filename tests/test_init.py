"""A fresh run's starting state: adapted Gemma 3, T5Gemma 2 or random; placed sharded; errors that
name the field or file."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec

from configs import tiny
from launch.make_gemma3 import make_gemma3, random_gemma3
from t5g2 import sharding
from t5g2.configlib import ConfigError
from t5g2.convert import checkpoint_files, gemma3
from t5g2.convert.checkpoint_files import CheckpointError
from t5g2.model import ModelConfig
from t5g2.model.params import abstract_model, load_params
from t5g2.train import loop
from t5g2.train.config import TrainConfig
from t5g2.train.init import initial_train_state
from t5g2.train.optimizer import make_optimizer
from t5g2.train.state import model_graphdef, state_shardings
from t5g2.train.step import loss_function
from tests.reference import (SMALL_STACK, hf_gemma3_model, hf_t5gemma2_model, padded_batch,
                             tiny_config)
from tests.test_parity_hf import TOL

CFG = tiny_config(**SMALL_STACK)  # 3 layers: a local/global period and a tail
MESH_2X2X2 = dict(data=2, fsdp=2, tensor=2)


def _start(model_cfg: ModelConfig, mesh_cfg=None, **init):
    """(state, origin, shardings, mesh) of a fresh run of `model_cfg` with init.<key>=<value>."""
    config = tiny.get_config()
    config.model = ml_collections.ConfigDict(model_cfg.to_dict())
    config.init.update(init)
    tx, _ = make_optimizer(TrainConfig.from_config_dict(config.train))
    mesh = sharding.make_mesh(mesh_cfg or dict(data=-1))
    shardings = state_shardings(model_cfg, tx, mesh)
    state, origin = initial_train_state(config, model_cfg, tx, mesh, shardings)
    return state, origin, shardings, mesh


def _batch(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """8 rows of 12 encoder and 10 decoder tokens; targets are the decoder inputs shifted left."""
    rng = np.random.default_rng(0)
    dec = rng.integers(3, cfg.eoi_token_id, size=(8, 11))
    return {"encoder_input_tokens": rng.integers(3, cfg.eoi_token_id, size=(8, 12)),
            "decoder_input_tokens": dec[:, :-1], "decoder_target_tokens": dec[:, 1:],
            "decoder_loss_weights": np.ones((8, 10), np.float32)}


def _loss(cfg: ModelConfig, params, batch, mesh) -> float:
    with sharding.use_mesh(mesh):
        _, sums = jax.jit(loss_function(cfg, z_loss=0.0))(params, batch)
    return float(sums.cross_entropy / sums.weight)


def _assert_placed(state, shardings) -> None:
    """Every parameter and optimizer leaf sits as the rules say, the table really split."""
    for leaf, expected in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding.is_equivalent_to(expected, leaf.ndim)
    assert shardings.params["embed"]["table"].spec == PartitionSpec("tensor", "fsdp")
    assert int(state.step) == 0


def test_gemma3_init_is_the_converted_model_placed_on_a_2x2x2_mesh(tmp_path):
    hf_gemma3_model(CFG, seed=3).save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / checkpoint_files.INDEX_FILE).exists()

    state, origin, shardings, mesh = _start(CFG, MESH_2X2X2, from_gemma3=str(tmp_path))
    assert origin == f"Gemma 3 checkpoint {tmp_path} (adapted: 41 tensors)"
    _assert_placed(state, shardings)

    batch = _batch(CFG)
    ours, reference = (_loss(CFG, p, batch, mesh)
                       for p in (state.params, _converted(tmp_path, shardings.params)))
    # Measured: 6.854846 both (diff 1e-6), a uniform guess's ln(512) = 6.238.
    assert abs(ours - reference) <= 1e-5
    assert abs(ours - np.log(CFG.vocab_size)) > 0.3


def _converted(path, shardings) -> nnx.State:
    """The parameters `gemma3.load_gemma3` + `load_params` give (the conversion on its own)."""
    _, flat = gemma3.load_gemma3(str(path), vocab_size=CFG.vocab_size,
                                 eoi_token_id=CFG.eoi_token_id, dtype="float32")
    converted = abstract_model(CFG)
    load_params(converted, flat)
    return jax.device_put(nnx.state(converted, nnx.Param), shardings)


def test_an_adaptation_run_starts_at_the_converted_models_loss(tmp_path):
    """launch.train's path: --config.init.from_gemma3 on a sharded save_pretrained directory;
    step 1's logged loss is the loss of the parameters before the first update."""
    source = tmp_path / "gemma3"
    hf_gemma3_model(CFG, seed=3).save_pretrained(source, max_shard_size="100KB")
    config = tiny.get_config()
    config.model = ml_collections.ConfigDict(CFG.to_dict())
    config.init.from_gemma3 = str(source)
    config.data.source = "synthetic"
    config.train.update(steps=1, encoder_length=24, decoder_length=16)
    config.peak_flops_per_device = 1e9
    result = loop.train(config, str(tmp_path / "run"))

    train_cfg = TrainConfig.from_config_dict(config.train)
    first_batch = next(loop.make_source(config, CFG, train_cfg))
    mesh = sharding.make_mesh(config.mesh)
    tx, _ = make_optimizer(train_cfg)
    converted = _converted(source, state_shardings(CFG, tx, mesh).params)
    reference = _loss(CFG, converted, sharding.global_batch_from_host(first_batch, mesh), mesh)
    assert result.metrics["loss"] == pytest.approx(reference, abs=1e-5)
    assert abs(reference - np.log(CFG.vocab_size)) > 0.3  # not a uniform guess


def test_random_init_without_a_checkpoint():
    cfg = tiny_config(num_layers=1)  # the branch is init_train_state's: the smallest model
    state, origin, shardings, _ = _start(cfg, MESH_2X2X2)
    assert origin == ("random initialisation (seed 0): no init.from_gemma3 / init.from_t5gemma2 "
                      "given")
    _assert_placed(state, shardings)
    assert float(jnp.std(state.params["embed"]["table"][...])) == pytest.approx(0.02, rel=0.05)


def test_t5gemma2_init_reproduces_the_reference_loss(tmp_path):
    hf = hf_t5gemma2_model(CFG, seed=1)
    hf.save_pretrained(tmp_path)
    state, origin, shardings, mesh = _start(CFG, MESH_2X2X2, from_t5gemma2=str(tmp_path))
    assert origin == f"T5Gemma 2 checkpoint {tmp_path} (105 tensors)"
    _assert_placed(state, shardings)

    batch = _batch(CFG)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(batch["encoder_input_tokens"]),
                 decoder_input_ids=torch.tensor(batch["decoder_input_tokens"]),
                 labels=torch.tensor(batch["decoder_target_tokens"]))
    # Measured: 6.912204 both (diff 0.0).
    assert out.loss.item() > 1.0
    assert abs(_loss(CFG, state.params, batch, mesh) - out.loss.item()) <= 1e-4

    separate = dataclasses.replace(CFG, cross_attention="separate")
    with pytest.raises(ConfigError, match=f"model.cross_attention='separate' but the T5Gemma 2 "
                                          f"checkpoint {tmp_path} has 'merged'"):
        _start(separate, from_t5gemma2=str(tmp_path))


def _gemma3_logit_gap(source, model, cfg: ModelConfig) -> tuple[float, float]:
    """(max |t5g2 - Gemma 3| logit, max |Gemma 3| logit) over real decoder positions, with every
    encoder position masked out of the t5g2 model's merged attention."""
    rng = np.random.default_rng(4)
    dec, dec_mask = padded_batch(rng, cfg.eoi_token_id, [16, 11], 16, special=cfg.eoi_token_id)
    dec[:, 0] = cfg.bos_id
    enc = rng.integers(3, cfg.eoi_token_id, size=(2, 9))
    with torch.no_grad():
        ref = source(input_ids=torch.tensor(dec), attention_mask=torch.tensor(dec_mask)).logits
    hidden = model.decode(dec, model.encode(enc), encoder_segment_ids=np.zeros_like(enc),
                          segment_ids=dec_mask)
    valid = dec_mask.astype(bool)
    ref, ours = ref.numpy()[valid], np.asarray(model.logits(hidden))[valid]
    return float(np.abs(ours - ref).max()), float(np.abs(ref).max())


def test_make_gemma3_writes_a_gemma3_that_the_tiny_run_adapts(tmp_path):
    """The main job's path: launch.make_gemma3 on the tiny config, then init.from_gemma3."""
    from transformers import Gemma3ForCausalLM

    cfg = ModelConfig.from_config_dict(tiny.get_config().model)
    files = make_gemma3(cfg, str(tmp_path), seed=0, max_shard_bytes=500_000)
    assert files == ["config.json"] + [f"model-0000{i}-of-00004.safetensors"
                                       for i in range(1, 5)] + [checkpoint_files.INDEX_FILE]
    _, written = random_gemma3(cfg, seed=0)
    back = checkpoint_files.read_state_dict(str(tmp_path))
    assert back.keys() == written.keys()
    assert all(np.array_equal(back[k], written[k]) for k in written)
    norm = back["model.layers.0.input_layernorm.weight"]
    assert 0.05 < norm.std() < 0.2 and np.all(norm != 0)
    with pytest.raises(FileExistsError, match="not empty; pass --overwrite"):
        make_gemma3(cfg, str(tmp_path))

    state, origin, _, _ = _start(cfg, from_gemma3=str(tmp_path))  # the tiny config: no mismatch
    assert origin == f"Gemma 3 checkpoint {tmp_path} (adapted: 158 tensors)"
    source = Gemma3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    model = nnx.merge(model_graphdef(cfg)[0], state.params)
    gap, scale = _gemma3_logit_gap(source, model, cfg)
    # Measured: gap 6e-7 on logits up to 0.61 (the model's own 0.02-std initialiser).
    assert scale > 0.1 and gap <= TOL


def test_untied_gemma3_writer_inverts_the_adaptation():
    cfg = dataclasses.replace(CFG, tie_embeddings=False)
    config, sd = random_gemma3(cfg, seed=2)
    assert config["tie_word_embeddings"] is False
    assert not np.array_equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    back = gemma3.to_gemma3_state_dict(gemma3.adapt_state_dict(sd, cfg), cfg)
    assert back.keys() == sd.keys() and all(np.array_equal(back[k], sd[k]) for k in sd)


def test_architecture_mismatch_names_each_field_and_both_values(tmp_path):
    make_gemma3(CFG, str(tmp_path))
    stack = dataclasses.replace(CFG.encoder, sliding_window=16, num_kv_heads=4)
    other = dataclasses.replace(CFG, encoder=stack, decoder=stack)
    with pytest.raises(ConfigError) as e:
        _start(other, from_gemma3=str(tmp_path))
    for side in ("encoder", "decoder"):
        assert (f"model.{side}.num_kv_heads=4 but the Gemma 3 checkpoint {tmp_path} has 2"
                in str(e.value))
        assert f"model.{side}.sliding_window=16 but the Gemma 3 checkpoint" in str(e.value)


def test_bad_inits_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="are both set: pick one"):
        _start(CFG, from_gemma3="/a", from_t5gemma2="/b")
    with pytest.raises(CheckpointError, match=f"{tmp_path}/nowhere does not exist"):
        _start(CFG, from_gemma3=str(tmp_path / "nowhere"))

    good = tmp_path / "gemma3"
    shards = make_gemma3(CFG, str(good), max_shard_bytes=100_000)[1:-1]
    config, state_dict = checkpoint_files.read_config(str(good)), \
        checkpoint_files.read_state_dict(str(good))
    incomplete = tmp_path / "incomplete"
    del state_dict["model.layers.1.mlp.up_proj.weight"]
    checkpoint_files.write_checkpoint(str(incomplete), state_dict, config)
    with pytest.raises(CheckpointError, match=f"{incomplete}: Gemma 3 checkpoint has no tensor "
                                              "'layers.1.mlp.up_proj.weight'"):
        _start(CFG, from_gemma3=str(incomplete))

    shard = good / shards[1]
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=f"{shard}: corrupt or unreadable"):
        _start(CFG, from_gemma3=str(good))

    with pytest.raises(ConfigError, match="model_type='gemma3_text': expected 't5gemma2'"):
        _start(CFG, from_t5gemma2=str(incomplete))
