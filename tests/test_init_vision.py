"""Where the vision tower starts: a multimodal Gemma 3 (both key forms), `init.vision_from` (a
T5Gemma 2, a Gemma 3, a bare SigLIP), checked against the Hugging Face modules that hold it; and
the refusals that keep a run from training with a tower it did not mean to."""

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from flax import nnx

from t5g2.configlib import ConfigError
from t5g2.convert import checkpoint_files, siglip
from t5g2.convert.hf_config import hf_text_from_stack
from t5g2.model import ModelConfig, checkpoint_fields
from t5g2.model.params import path_key
from t5g2.train.checkpoint import model_differences
from t5g2.train.state import model_graphdef
from tests.reference import (SMALL_STACK, hf_gemma3_model, hf_t5gemma2_model, randomize_,
                             tiny_vision_config)
from tests.test_init import _start

TOL = 1e-4
CFG = tiny_vision_config(**SMALL_STACK)  # text d 64, vocab 512; tower d 32, 2 layers, 4 tokens
TEXT_ONLY = dataclasses.replace(CFG, vision=None)
# Runs from scratch compile the model's initialisation: one text layer keeps that short.
SCRATCH = tiny_vision_config(num_layers=1)
# Gemma 3 4B's layout in small: 8 rows beyond T5Gemma 2's vocabulary, the image token among them.
GEMMA3_VOCAB, GEMMA3_IMAGE_TOKEN = CFG.vocab_size + 8, CFG.vocab_size
# transformers 5 module paths -> the names in Gemma 3 4B's published safetensors.
RELEASED_NAMES = {"model.language_model.": "language_model.model.",
                  "model.vision_tower.": "vision_tower.vision_model.",
                  "model.multi_modal_projector.": "multi_modal_projector."}


def multimodal_gemma3(cfg: ModelConfig, seed: int, text_dim: int | None = None):
    """A random Gemma3ForConditionalGeneration with `cfg`'s text stack (width `text_dim` if
    given) and tower, its image token outside `cfg`'s vocabulary as in Gemma 3 4B."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    stack = cfg.decoder if text_dim is None else dataclasses.replace(cfg.decoder,
                                                                     d_model=text_dim)
    text = hf_text_from_stack(stack, vocab_size=GEMMA3_VOCAB, pad_token_id=cfg.pad_id,
                              eos_token_id=cfg.eos_id, bos_token_id=cfg.bos_id,
                              final_logit_softcapping=cfg.final_logit_softcap)
    hf_cfg = Gemma3Config(text_config=text, vision_config=siglip.hf_from_vision(cfg.vision),
                          mm_tokens_per_image=cfg.vision.tokens_per_image,
                          boi_token_index=cfg.boi_token_id, eoi_token_index=cfg.eoi_token_id,
                          image_token_index=GEMMA3_IMAGE_TOKEN)
    hf_cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_(Gemma3ForConditionalGeneration(hf_cfg).float(), seed)


def save_in_form(model, path, form: str) -> None:
    """`model` saved by save_pretrained, or with its in-memory or the released files' names."""
    if form == "save_pretrained":
        model.save_pretrained(path)
        return
    state_dict = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to the embedding
        if form == "released":
            prefix = next(p for p in RELEASED_NAMES if key.startswith(p))
            key = RELEASED_NAMES[prefix] + key[len(prefix):]
        state_dict[key] = value.numpy()
    checkpoint_files.write_checkpoint(str(path), state_dict, model.config.to_dict())


def images(cfg: ModelConfig, n: int = 3, seed: int = 0) -> np.ndarray:
    size = cfg.vision.image_size
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def t5g2_image_tokens(cfg: ModelConfig, state, pixels: np.ndarray) -> np.ndarray:
    """t5g2's image tokens [N, T, text width] for images [N, H, W, 3], from the state's params."""
    model = nnx.merge(model_graphdef(cfg)[0], state.params)
    return np.asarray(model.vision(pixels[None], model.dtype))[0]


def hf_image_tokens(hf_owner, pixels: np.ndarray) -> np.ndarray:
    """The reference's tower + projector output on the same images (NCHW for torch)."""
    with torch.no_grad():
        out = hf_owner.get_image_features(torch.tensor(pixels.transpose(0, 3, 1, 2)))
    return np.asarray(getattr(out, "pooler_output", out))


def vision_params(state) -> dict[str, np.ndarray]:
    return {path_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state.params)
            if path_key(p).startswith("vision/")}


def text_params(state) -> dict[str, np.ndarray]:
    return {path_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state.params)
            if not path_key(p).startswith("vision/")}


def assert_tower_is(state, tower: dict[str, torch.Tensor], prefix: str, cfg: ModelConfig):
    """Some of the tower's parameters against the reference's tensors, laid out here: the
    patch convolution [out, in, kh, kw] -> [kh, kw, in, out], positions as they are, and layer
    1's query projection [out, in] -> [in, heads, head_dim] (layer-stacked)."""
    ours = vision_params(state)
    v = cfg.vision
    kernel = tower[f"{prefix}embeddings.patch_embedding.weight"].numpy().transpose(2, 3, 1, 0)
    assert np.array_equal(ours["vision/tower/patch_kernel"], kernel)
    assert np.array_equal(ours["vision/tower/position"],
                          tower[f"{prefix}embeddings.position_embedding.weight"].numpy())
    q = tower[f"{prefix}encoder.layers.1.self_attn.q_proj.weight"].numpy()
    assert np.array_equal(ours["vision/tower/layers/periods/layers/0/attn/q"][1],
                          q.T.reshape(v.d_model, v.num_heads, v.head_dim))


@pytest.mark.parametrize("form", ["save_pretrained", "released", "in_memory"])
def test_a_multimodal_gemma3_starts_tower_projector_and_text(tmp_path, form, caplog):
    """init.from_gemma3 on a Gemma3ForConditionalGeneration in each key form: the image tokens
    are the reference's, the text is what a text-only run of the same checkpoint gets."""
    hf = multimodal_gemma3(CFG, seed=1)
    save_in_form(hf, tmp_path, form)
    keys = checkpoint_files.read_state_dict(str(tmp_path)).keys()
    tower_prefix = {"save_pretrained": "vision_tower.embeddings.",
                    "released": "vision_tower.vision_model.embeddings.",
                    "in_memory": "model.vision_tower.embeddings."}[form]
    assert any(k.startswith(tower_prefix) for k in keys)  # the form as named

    state, origin, _, _ = _start(CFG, from_gemma3=str(tmp_path))
    assert origin == f"Gemma 3 checkpoint {tmp_path} (adapted: {len(keys)} tensors)"
    assert_tower_is(state, hf.state_dict(), "model.vision_tower.", CFG)
    pixels = images(CFG)
    ours, theirs = t5g2_image_tokens(CFG, state, pixels), hf_image_tokens(hf, pixels)
    assert ours.shape == theirs.shape == (3, 4, 64)
    assert np.abs(theirs).max() > 0.1  # a random projector, not the zero init
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)

    table = hf.state_dict()["model.language_model.embed_tokens.weight"].numpy()
    text = text_params(state)
    assert np.array_equal(text["embed/table"], table[:CFG.vocab_size])  # image token row cut
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        text_only, _, _, _ = _start(TEXT_ONLY, from_gemma3=str(tmp_path))
    reference = text_params(text_only)
    assert text.keys() == reference.keys()
    assert all(np.array_equal(text[k], reference[k]) for k in text)
    # The text-only run skipped the tower and projector and said so.
    skipped = 5 + 16 * CFG.vision.num_layers + 2
    assert (f"Gemma 3: skipped {skipped} tensors under vision_tower., multi_modal_projector. "
            "(not used by this model)") in [r.getMessage() for r in caplog.records]
    assert not vision_params(text_only)


def test_vision_from_a_t5gemma2_onto_an_adapted_text_only_gemma3(tmp_path, caplog):
    """Gemma 3 270M / 1B's way: the text from a text-only Gemma 3, the tower and projector from
    init.vision_from (a T5Gemma 2 of the same text width)."""
    hf_gemma3_model(CFG, seed=2).save_pretrained(tmp_path / "gemma3")
    tower_source = hf_t5gemma2_model(CFG, seed=3)
    tower_source.save_pretrained(tmp_path / "t5gemma2")
    saved = checkpoint_files.read_state_dict(str(tmp_path / "t5gemma2"))
    read = sum(k.startswith(("model.encoder.vision_tower.", "model.encoder.multi_modal_"))
               for k in saved)

    with caplog.at_level(logging.INFO, logger="t5g2.train.init"):
        state, origin, _, _ = _start(CFG, from_gemma3=str(tmp_path / "gemma3"),
                                     vision_from=str(tmp_path / "t5gemma2"))
    assert origin == (f"Gemma 3 checkpoint {tmp_path / 'gemma3'} (adapted: 41 tensors); vision "
                      f"tower from T5Gemma 2 checkpoint {tmp_path / 't5gemma2'} ({read} "
                      "tensors), with its projector")
    assert f"{read} of its {len(saved)} tensors read" in caplog.text
    assert_tower_is(state, tower_source.state_dict(), "model.encoder.vision_tower.", CFG)
    pixels = images(CFG, seed=1)
    np.testing.assert_allclose(t5g2_image_tokens(CFG, state, pixels),
                               hf_image_tokens(tower_source.model.encoder, pixels),
                               atol=TOL, rtol=0)
    text_only, _, _, _ = _start(TEXT_ONLY, from_gemma3=str(tmp_path / "gemma3"))
    ours, reference = text_params(state), text_params(text_only)
    assert all(np.array_equal(ours[k], reference[k]) for k in reference)

    # From scratch: the text random as ever, the tower the checkpoint's.
    scratch, origin, _, _ = _start(SCRATCH, vision_from=str(tmp_path / "t5gemma2"))
    assert origin.startswith("random initialisation (seed 0): no init.from_gemma3 / "
                             "init.from_t5gemma2 given; vision tower from T5Gemma 2 checkpoint")
    assert_tower_is(scratch, tower_source.state_dict(), "model.encoder.vision_tower.", CFG)
    assert all(np.array_equal(v, vision_params(state)[k])
               for k, v in vision_params(scratch).items())


def test_vision_from_wins_over_the_text_sources_own_tower(tmp_path):
    multimodal_gemma3(CFG, seed=4).save_pretrained(tmp_path / "gemma3")
    tower_source = hf_t5gemma2_model(CFG, seed=5)
    tower_source.save_pretrained(tmp_path / "t5gemma2")
    state, _, _, _ = _start(CFG, from_gemma3=str(tmp_path / "gemma3"),
                            vision_from=str(tmp_path / "t5gemma2"))
    assert_tower_is(state, tower_source.state_dict(), "model.encoder.vision_tower.", CFG)


@pytest.fixture(scope="module")
def text_gemma3(tmp_path_factory) -> str:
    """A text-only Gemma 3 of CFG's text model (Gemma 3 270M / 1B in small)."""
    path = tmp_path_factory.mktemp("text_gemma3")
    hf_gemma3_model(CFG, seed=12).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("source", ["siglip", "older_siglip_with_head", "wider_gemma3"])
def test_a_tower_without_a_fitting_projector_starts_the_projector_from_zeros(tmp_path, source,
                                                                             text_gemma3):
    """A bare SiglipVisionModel save, or a Gemma 3 whose projector maps into another text width
    (4B's 2560 for 270M's 640): the tower is the checkpoint's, the projector its zero init, which
    must train."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    if source == "siglip":
        hf = SiglipVisionModel(SiglipVisionConfig(**siglip.hf_from_vision(CFG.vision)))
        randomize_(hf, seed=6).save_pretrained(tmp_path)
        tower, prefix, why = hf, "", "it has no projector"
    elif source == "older_siglip_with_head":  # names nested in vision_model., an unused head
        fields = dict(siglip.hf_from_vision(CFG.vision), vision_use_head=True)
        hf = randomize_(SiglipVisionModel(SiglipVisionConfig(**fields)), seed=13)
        assert any(k.startswith("head.") for k in hf.state_dict())
        checkpoint_files.write_checkpoint(
            str(tmp_path), {f"vision_model.{k}": v.numpy() for k, v in hf.state_dict().items()},
            hf.config.to_dict())
        tower, prefix, why = hf, "", "it has no projector"
    else:
        hf = multimodal_gemma3(CFG, seed=7, text_dim=16)
        hf.save_pretrained(tmp_path)
        tower, prefix = hf.model.vision_tower, "model.vision_tower."
        why = "its projector maps into width 16, this model's text width is 64"

    with pytest.raises(ConfigError) as error:
        _start(CFG, from_gemma3=text_gemma3, vision_from=str(tmp_path))
    assert str(error.value).startswith("model.vision.trainable='none' but the ")
    assert f"(init.vision_from) gives no projector ({why}): " in str(error.value)
    assert str(error.value).endswith("set model.vision.trainable='projector' (or 'all')")

    trains = dataclasses.replace(CFG, vision=dataclasses.replace(CFG.vision,
                                                                 trainable="projector"))
    state, origin, _, _ = _start(trains, from_gemma3=text_gemma3, vision_from=str(tmp_path))
    assert origin.endswith(f"the projector from its init ({why})")
    assert_tower_is(state, hf.state_dict(), prefix, CFG)
    pixels = images(CFG, seed=2)
    model = nnx.merge(model_graphdef(trains)[0], state.params)
    with torch.no_grad():
        theirs = tower(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).last_hidden_state
    np.testing.assert_allclose(np.asarray(model.vision.tower(pixels, model.dtype)),
                               theirs.numpy(), atol=TOL, rtol=0)
    params = vision_params(state)
    assert not params["vision/projector/projection"].any()
    assert not params["vision/projector/norm/scale"].any()


def test_a_tower_that_differs_from_the_config_names_the_field(tmp_path):
    hf_t5gemma2_model(CFG, seed=8).save_pretrained(tmp_path / "t5gemma2")
    multimodal_gemma3(CFG, seed=9).save_pretrained(tmp_path / "gemma3")
    other = dataclasses.replace(CFG, vision=dataclasses.replace(CFG.vision, ffn_dim=48,
                                                                num_layers=1))
    with pytest.raises(ConfigError) as error:
        _start(other, vision_from=str(tmp_path / "t5gemma2"))
    assert str(error.value) == (
        f"model.vision.ffn_dim=48 but the T5Gemma 2 checkpoint {tmp_path / 't5gemma2'} "
        f"(init.vision_from) has 64; model.vision.num_layers=1 but the T5Gemma 2 checkpoint "
        f"{tmp_path / 't5gemma2'} (init.vision_from) has 2: set model.vision to the "
        "checkpoint's tower")
    with pytest.raises(ConfigError, match=f"model.vision.ffn_dim=48 but the Gemma 3 checkpoint "
                                          f"{tmp_path / 'gemma3'} has 64; "):
        _start(other, from_gemma3=str(tmp_path / "gemma3"))
    # What trains is the run's choice: a frozen source starts a trainable tower.
    trains = dataclasses.replace(CFG, vision=dataclasses.replace(CFG.vision, trainable="all"))
    _start(trains, from_t5gemma2=str(tmp_path / "t5gemma2"))
    _start(trains, from_gemma3=str(tmp_path / "gemma3"))


def test_a_tower_with_no_source_is_refused(tmp_path, caplog):
    hf_gemma3_model(CFG, seed=10).save_pretrained(tmp_path / "gemma3")
    with pytest.raises(ConfigError) as error:
        _start(CFG, from_gemma3=str(tmp_path / "gemma3"))
    assert str(error.value) == (
        f"model.vision is set but the Gemma 3 checkpoint {tmp_path / 'gemma3'} has no vision "
        "tower: set init.vision_from to a checkpoint that has one (a T5Gemma 2 ('t5gemma2'), a "
        "multimodal Gemma 3 ('gemma3') or a SigLIP vision model ('siglip_vision_model')), or "
        "model.vision=None for a text-only model")
    hf_t5gemma2_model(TEXT_ONLY, seed=11).save_pretrained(tmp_path / "t5gemma2")
    with pytest.raises(ConfigError, match=f"model.vision is set but the T5Gemma 2 checkpoint "
                                          f"{tmp_path / 't5gemma2'} has no vision tower: "):
        _start(CFG, from_t5gemma2=str(tmp_path / "t5gemma2"))
    with pytest.raises(ConfigError, match=f"the Gemma 3 checkpoint {tmp_path / 'gemma3'} "
                                          r"\(init.vision_from\) has no vision tower"):
        _start(CFG, vision_from=str(tmp_path / "gemma3"))
    with pytest.raises(ConfigError, match="init.vision_from='/x' is set but model.vision is "
                                          "None"):
        _start(TEXT_ONLY, vision_from="/x")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type='llama': a vision tower loads from a "
                                          "T5Gemma 2"):
        _start(CFG, vision_from=str(tmp_path / "llama"))

    # From scratch the tower is random on purpose; frozen, a warning says what that means.
    with caplog.at_level(logging.WARNING, logger="t5g2.train.init"):
        _, origin, _, _ = _start(SCRATCH)
    assert origin.endswith("; the vision tower random too (no init.vision_from)")
    assert "the vision tower is random and frozen (model.vision.trainable='none')" in caplog.text


def test_the_fields_compared_handle_the_tower():
    """A tower against none is one difference; what trains is compared on resuming only."""
    ours, text_only = CFG.to_dict(), TEXT_ONLY.to_dict()
    assert checkpoint_fields.differences(ours, text_only) == [("vision", ours["vision"], None)]
    assert checkpoint_fields.differences(text_only, ours) == [("vision", None, ours["vision"])]
    trains = dataclasses.replace(CFG, vision=dataclasses.replace(CFG.vision,
                                                                 trainable="projector"))
    assert checkpoint_fields.differences(CFG, trains,
                                         ignore=checkpoint_fields.TRAINING_FIELDS) == []
    assert model_differences({"model": ours}, {"model": trains.to_dict()}) == [
        "model.vision.trainable='none' in the checkpoint, 'projector' now"]
    assert model_differences({"model": text_only}, {"model": ours}) == [
        f"model.vision=None in the checkpoint, {ours['vision']!r} now"]


def test_the_shipped_4b_tower_is_gemma3_4bs():
    """configs/t5g2_4b.py's tower, ids and text stacks read off Gemma 3 4B's published
    config.json (the image token aside: Gemma 3's 262,144 is outside T5Gemma 2's vocabulary)."""
    from configs import t5g2_4b
    from t5g2.convert import gemma3
    from tests.test_hf_config import GEMMA3_4B_CONFIG

    shipped = ModelConfig.from_config_dict(t5g2_4b.get_config().model)
    source = gemma3.config_from_gemma3(GEMMA3_4B_CONFIG)
    assert source.vision == shipped.vision == gemma3.vision_config(GEMMA3_4B_CONFIG)
    assert (source.boi_token_id, source.eoi_token_id) == (shipped.boi_token_id,
                                                          shipped.eoi_token_id) == (255_999,
                                                                                    256_000)
    assert shipped.image_token_id == 256_001 and GEMMA3_4B_CONFIG["image_token_index"] == 262_144
    assert checkpoint_fields.differences(shipped, source,
                                         ignore=checkpoint_fields.COMPUTE_FIELDS) == []
