"""The vision tower and projector against the Hugging Face reference (float32), and their
checkpoint conversion both ways."""

import dataclasses

import numpy as np
import pytest
import torch

from t5g2.convert import hf_t5gemma2
from t5g2.model.checkpoint_fields import differences
from t5g2.model.config import ConfigError, ModelConfig, VisionConfig
from t5g2.model.vision import frozen_path
from tests.reference import (hf_t5gemma2_model, padded_batch, t5g2_model, tiny_config,
                             tiny_vision_config)

TOL = 1e-4
SMALL = dict(num_layers=3, sliding_window_pattern=2)


def image_block(cfg: ModelConfig) -> list[int]:
    """One image's ids as the reference processor lays them out (newlines as ordinary ids)."""
    t = cfg.vision.tokens_per_image
    return [7, cfg.boi_token_id] + [cfg.image_token_id] * t + [cfg.eoi_token_id, 7]


def multimodal_batch(cfg: ModelConfig, seed: int = 0):
    """Encoder rows with 1, 2 and 0 images (row 1 left-padded, row 2 right-padded), the images
    per row [B, M=2, H, W, 3], and the same images flattened in row order as the reference
    takes them ([N, 3, H, W])."""
    rng = np.random.default_rng(seed)
    block = image_block(cfg)
    rows = [[*rng.integers(3, 400, 5), *block, *rng.integers(3, 400, 4)],
            [*rng.integers(3, 400, 2), *block, *rng.integers(3, 400, 3), *block, 9],
            list(rng.integers(3, 400, 9))]
    length = max(map(len, rows)) + 2
    enc = np.zeros((3, length), np.int64)
    mask = np.zeros((3, length), np.int64)
    for r, row in enumerate(rows):
        span = slice(length - len(row), length) if r == 1 else slice(0, len(row))
        enc[r, span], mask[r, span] = row, 1
    size = cfg.vision.image_size
    images = np.zeros((3, 2, size, size, 3), np.float32)
    counts = (1, 2, 0)
    for r, n in enumerate(counts):
        images[r, :n] = rng.uniform(-1, 1, (n, size, size, 3))
    flat = np.concatenate([images[r, :n] for r, n in enumerate(counts)])
    return enc, mask, images, flat.transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def converted():
    cfg = tiny_vision_config(**SMALL)
    hf = hf_t5gemma2_model(cfg, seed=3)
    return cfg, hf, t5g2_model(cfg, hf_t5gemma2.from_hf_state_dict(hf.state_dict(), cfg))


def test_image_tokens_match_reference(converted):
    cfg, hf, model = converted
    _, _, images, pixel_values = multimodal_batch(cfg)
    with torch.no_grad():
        theirs = hf.model.encoder.get_image_features(torch.tensor(pixel_values))
    theirs = getattr(theirs, "pooler_output", theirs)
    ours = np.asarray(model.vision(images, model.dtype))
    flat = np.concatenate([ours[0, :1], ours[1, :2]]).reshape(np.asarray(theirs).shape)
    np.testing.assert_allclose(flat, np.asarray(theirs), atol=TOL, rtol=0)
    assert np.abs(flat).max() > 0.1  # the projection is random, not the zero init


def test_logits_with_images_and_padding_match_reference(converted):
    cfg, hf, model = converted
    enc, enc_mask, images, pixel_values = multimodal_batch(cfg)
    dec, dec_mask = padded_batch(np.random.default_rng(1), 400, [6, 4, 5], 6)
    dec[:, 0] = cfg.bos_id
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc_mask),
                    pixel_values=torch.tensor(pixel_values),
                    decoder_input_ids=torch.tensor(dec),
                    decoder_attention_mask=torch.tensor(dec_mask)).logits.numpy()
    ours = np.asarray(model(enc, dec, encoder_segment_ids=enc_mask, decoder_segment_ids=dec_mask,
                            encoder_images=images))
    valid = dec_mask == 1
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=TOL, rtol=0)
    # The images matter: without them (placeholders left as ordinary embeddings) logits move.
    blind = np.asarray(model(enc, dec, encoder_segment_ids=enc_mask,
                             decoder_segment_ids=dec_mask))
    assert np.abs(blind[:2][valid[:2]] - theirs[:2][valid[:2]]).max() > 10 * TOL


def test_hf_round_trip_is_exact_for_every_key(converted):
    cfg, hf, _ = converted
    on_disk = {k: v.numpy() for k, v in hf.state_dict().items()}
    flat = hf_t5gemma2.from_hf_state_dict(on_disk, cfg)
    back = hf_t5gemma2.to_hf_state_dict(flat, cfg)
    vision_keys = {k for k in on_disk if k.startswith(hf_t5gemma2.VISION_PREFIXES)}
    assert vision_keys and vision_keys <= set(back)
    for key in vision_keys:
        same = back[key].dtype == on_disk[key].dtype and np.array_equal(back[key], on_disk[key])
        assert same, key


def test_older_nested_tower_keys_load():
    """Checkpoints written before transformers dropped `vision_model.` from the tower's names."""
    cfg = tiny_vision_config(**SMALL)
    hf = hf_t5gemma2_model(cfg, seed=4)
    sd = {k.replace("vision_tower.", "vision_tower.vision_model."): v
          for k, v in hf.state_dict().items()}
    ours = hf_t5gemma2.from_hf_state_dict(sd, cfg)
    reference = hf_t5gemma2.from_hf_state_dict(hf.state_dict(), cfg)
    assert all(np.array_equal(ours[k], reference[k]) for k in reference)


def test_config_round_trip_and_text_only_marker():
    cfg = tiny_vision_config(**SMALL)
    back = hf_t5gemma2.config_from_hf(hf_t5gemma2.to_hf_config_dict(cfg), dtype=cfg.dtype,
                                      remat=cfg.remat)
    assert differences(back, cfg) == []
    text_only = tiny_config(**SMALL)
    assert hf_t5gemma2.config_from_hf(hf_t5gemma2.to_hf_config_dict(text_only)).vision is None
    # A text-only model converts a multimodal checkpoint's text part, counting the vision keys.
    hf = hf_t5gemma2_model(cfg, seed=5)
    flat = hf_t5gemma2.from_hf_state_dict(hf.state_dict(), text_only)
    assert not any(k.startswith("vision/") for k in flat)


def test_frozen_paths_follow_trainable():
    paths = ["vision/tower/patch_kernel", "vision/projector/projection", "embed/table"]
    expected = {"none": [True, True, False], "projector": [True, False, False],
                "all": [False, False, False]}
    for trainable, frozen in expected.items():
        vision = VisionConfig(trainable=trainable)
        assert [frozen_path(p, vision) for p in paths] == frozen
    assert not any(frozen_path(p, None) for p in paths)


@pytest.mark.parametrize("field,value,message", [
    ("tokens_per_image", 5, "model.vision.tokens_per_image=5 must be a square"),
    ("image_size", 50, "model.vision.image_size=50 is not a multiple"),
    ("trainable", "tower", "model.vision.trainable='tower' is unknown; valid: none, projector"),
    ("num_heads", 5, "model.vision.d_model=32 is not divisible by model.vision.num_heads=5"),
])
def test_bad_vision_config_names_the_field(field, value, message):
    cfg = tiny_vision_config()
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **{field: value}))
    with pytest.raises(ConfigError) as error:
        cfg.validate()
    assert str(error.value).startswith(message)
