"""Generation with images: greedy tokens equal Hugging Face `generate` with `pixel_values` on a
tiny random multimodal model (rows with one, two and no images, padded on both sides), the same
under a sharded mesh that fills the batch, and bad image inputs are named. `launch.generate
--image` on a multimodal Hugging Face directory generates what the reference does from the
reference processor's pixels and token layout; its mistakes are one line."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from configs import base
from t5g2.configlib import ConfigError
from t5g2.convert import checkpoint_files, hf_t5gemma2
from t5g2.generate import generate
from t5g2.model.config import VisionConfig
from t5g2.model.params import abstract_model
from t5g2.train.export import TOKENIZER_MODEL, VOCABULARY_NOTE
from tests.reference import hf_t5gemma2_model, t5g2_model, tiny_config, tiny_vision_config
from tests.test_generate_cli import _generate
from tests.test_vision import multimodal_batch

WINDOW = 4
SMALL = dict(num_layers=3, sliding_window_pattern=2, sliding_window=WINDOW)
NEW = 12  # past the window: the sliding layers' ring buffers wrap


@pytest.fixture(scope="module")
def converted():
    cfg = tiny_vision_config(**SMALL)
    hf = hf_t5gemma2_model(cfg, seed=6)
    return cfg, hf, t5g2_model(cfg, hf_t5gemma2.from_hf_state_dict(hf.state_dict(), cfg))


def _reference_tokens(hf, cfg, enc, mask, pixel_values) -> np.ndarray:
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(enc), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pixel_values), max_new_tokens=NEW,
                          do_sample=False).numpy()
    assert np.all(ref[:, 0] == cfg.bos_id)  # the decoder starts from bos
    ref = ref[:, 1:]
    return np.pad(ref, ((0, 0), (0, NEW - ref.shape[1])), constant_values=cfg.pad_id)


def test_greedy_with_images_equals_hugging_face_generate(converted):
    cfg, hf, model = converted
    # rows with 1, 2 and 0 images; row 1 padded on the left, rows 0 and 2 on the right
    enc, mask, images, pixel_values = multimodal_batch(cfg, seed=2)
    ref = _reference_tokens(hf, cfg, enc, mask, pixel_values)
    out = generate(model, enc, encoder_segment_ids=mask, encoder_images=images,
                   max_new_tokens=NEW, return_logits=True)
    np.testing.assert_array_equal(out.tokens, ref)
    assert len(set(map(tuple, ref))) == 3  # three different continuations, not one degenerate
    # Sanity: the images are read. Without them (the placeholders' own embeddings) the rows
    # with images start from other logits; the row without images is unchanged.
    blind = generate(model, enc, encoder_segment_ids=mask, max_new_tokens=NEW,
                     return_logits=True)
    first, blind_first = out.logits[:, 0], blind.logits[:, 0]
    assert np.abs(first[:2] - blind_first[:2]).max(axis=-1).min() > 1e-2
    np.testing.assert_allclose(first[2], blind_first[2], atol=1e-5, rtol=0)


@pytest.mark.slow  # the mesh fill is the text path's (tests/test_generate.py), rows with images
def test_images_under_a_sharded_mesh_match_one_device(converted):
    """3 rows on 4 batch shards (data x fsdp; kv heads over tensor): the batch, its images
    included, is filled with copies of row 0 and cut after."""
    from t5g2.sharding import make_mesh, use_mesh

    cfg, _, model = converted
    enc, mask, images, _ = multimodal_batch(cfg, seed=3)
    plain = generate(model, enc, encoder_segment_ids=mask, encoder_images=images,
                     max_new_tokens=4, return_logits=True)
    with use_mesh(make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        sharded = generate(model, enc, encoder_segment_ids=mask, encoder_images=images,
                           max_new_tokens=4, return_logits=True)
    np.testing.assert_array_equal(sharded.tokens, plain.tokens)
    assert np.abs(sharded.logits - plain.logits).max() <= 1e-5


def test_bad_images_are_clear_errors():
    cfg = tiny_vision_config(**SMALL)
    model = abstract_model(cfg)  # every error is raised before the model runs
    enc, mask, images, _ = multimodal_batch(cfg)
    with pytest.raises(ConfigError, match="without a vision tower"):
        generate(abstract_model(tiny_config(**SMALL)), enc, encoder_images=images,
                 max_new_tokens=2)
    with pytest.raises(ConfigError, match=r"encoder_images of shape \(3, 2, 28, 28, 3\): give "
                                          r"\[3 rows, images per row, 56, 56, 3\]"):
        generate(model, enc, encoder_images=images[:, :, :28, :28], max_new_tokens=2)
    with pytest.raises(ConfigError, match=r"encoder_images of shape \(2, 2, 56, 56, 3\)"):
        generate(model, enc, encoder_images=images[:2], max_new_tokens=2)
    # row 1 has two images' placeholders, for one image slot per row
    with pytest.raises(ConfigError, match="row 1 has 8 image placeholder tokens: expected 4 "
                                          "per image, for at most 1 images per row"):
        generate(model, enc, encoder_images=images[:, :1], max_new_tokens=2)
    cut = enc.copy()
    cut[0, np.flatnonzero(cut[0] == cfg.image_token_id)[0]] = 9  # 3 placeholders: not one image
    with pytest.raises(ConfigError, match="row 0 has 3 image placeholder tokens"):
        generate(model, cut, encoder_images=images, max_new_tokens=2)


# --------------------------------------------------------------------------- launch.generate

PROMPTS = ["<start_of_image> The data pipeline packs",
           "Compare <start_of_image> with <start_of_image> now"]
BOI = 502  # tiny_vision_config's: inside the tiny vocabulary, past the tokenizer's ids


@pytest.fixture(scope="module")
def multimodal_export(ul2_export, tmp_path_factory):
    """The UL2 run's export (its tokenizer and note, its text config) with a tiny vision tower
    and random weights everywhere, as written by t5g2's export; the reference model with those
    weights; three image files of different sizes and formats."""
    text_only = hf_t5gemma2.config_from_hf(checkpoint_files.read_config(ul2_export))
    # untied: with a tied table, two random layers mostly repeat their input token
    cfg = dataclasses.replace(text_only, vision=VisionConfig(**base.TINY_VISION),
                              boi_token_id=BOI, tie_embeddings=False)
    cfg.validate()
    hf = hf_t5gemma2_model(cfg, seed=10)
    flat = hf_t5gemma2.from_hf_state_dict(hf.state_dict(), cfg)
    out = tmp_path_factory.mktemp("multimodal") / "hf"
    checkpoint_files.write_checkpoint(str(out), hf_t5gemma2.to_hf_state_dict(flat, cfg),
                                      hf_t5gemma2.to_hf_config_dict(cfg))
    for name in (TOKENIZER_MODEL, VOCABULARY_NOTE):
        shutil.copyfile(f"{ul2_export}/{name}", out / name)
    rng = np.random.default_rng(9)
    paths = []
    for i, (h, w, ext) in enumerate([(40, 70, "png"), (56, 56, "jpg"), (90, 33, "png")]):
        path = out.parent / f"image{i}.{ext}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return cfg, hf, str(out), paths


def _reference_inputs(cfg, vocab, paths):
    """PROMPTS as the reference processor lays them out (each marker: the text before it with
    "\n\n", begin-of-image, T placeholders, end-of-image, "\n\n" with the text after it),
    after the [S] mode token and before EOS; and its image processor's pixels."""
    from transformers import Gemma3ImageProcessorPil

    block = [BOI] + [cfg.image_token_id] * cfg.vision.tokens_per_image + [cfg.eoi_token_id]
    rows = []
    for prompt in PROMPTS:
        pieces = prompt.split("<start_of_image>")
        ids = []
        for k, piece in enumerate(pieces):
            text = ("\n\n" if k else "") + piece + ("\n\n" if k < len(pieces) - 1 else "")
            ids += vocab.encode(text).tolist() + (block if k < len(pieces) - 1 else [])
        rows.append([vocab.mode_id("[S]"), *ids, vocab.eos_id])
    size = cfg.vision.image_size
    processor = Gemma3ImageProcessorPil(size=dict(height=size, width=size))
    pixels = processor(images=[Image.open(p) for p in paths], return_tensors="np")
    return rows, pixels["pixel_values"]


def test_the_command_line_with_images_generates_what_the_reference_does(multimodal_export):
    from t5g2.inference_source import hf_vocabulary

    cfg, hf, directory, paths = multimodal_export
    done = _generate("--hf", directory, *(a for p in PROMPTS for a in ("--prompt", p)),
                     *(a for p in paths for a in ("--image", p)), "--max_new_tokens", "6",
                     "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    assert printed["images"] == 3 and printed["prompts"] == 2

    rows, pixel_values = _reference_inputs(cfg, hf_vocabulary(directory), paths)
    assert [r["encoder_tokens"] for r in printed["results"]] == rows
    ids = np.zeros((2, max(map(len, rows))), np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pixel_values), max_new_tokens=6,
                          do_sample=False).numpy()[:, 1:]
    for result, expected in zip(printed["results"], ref):
        assert result["tokens"] == expected[:len(result["tokens"])].tolist()
        assert len(result["tokens"]) == 6 or result["tokens"][-1] == cfg.eos_id
        assert len(set(result["tokens"])) > 2  # not a degenerate repetition
    # the continuations depend on the pictures: the same prompts with the pixels inverted
    with torch.no_grad():
        inverted = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                               pixel_values=-torch.tensor(pixel_values), max_new_tokens=6,
                               do_sample=False).numpy()[:, 1:]
    assert all(not np.array_equal(a, b) for a, b in zip(inverted, ref))


@pytest.mark.parametrize("image, prompt, message", [
    ("{tmp}/nowhere.png", PROMPTS[0], "error: --image={tmp}/nowhere.png: image file not found"),
    ("{tmp}/empty.png", PROMPTS[0], "error: --image={tmp}/empty.png: zero-byte image"),
    ("{tmp}/corrupt.png", PROMPTS[0], "error: --image={tmp}/corrupt.png: cannot decode the "
                                      "image"),
    ("{image}", "no marker here", "error: 1 --image file(s) but 0 <start_of_image> marker(s) "
                                  "in the prompts: give one --image per marker and put one "
                                  "<start_of_image> where each image goes"),
])
def test_bad_images_are_one_line(multimodal_export, tmp_path, image, prompt, message):
    (tmp_path / "empty.png").write_bytes(b"")
    _, _, directory, paths = multimodal_export
    whole = open(paths[0], "rb").read()
    (tmp_path / "corrupt.png").write_bytes(whole[:len(whole) // 2])  # a truncated PNG
    done = _generate("--hf", directory, "--prompt", prompt, "--image",
                     image.format(tmp=tmp_path, image=paths[0]))
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(message.format(tmp=tmp_path)), done.stderr[-500:]


def test_images_for_a_text_only_model_are_one_line(ul2_export, multimodal_export):
    _, _, directory, paths = multimodal_export
    done = _generate("--hf", ul2_export, "--prompt", PROMPTS[0], "--image", paths[0])
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: --image given but {ul2_export} is a text-only model (no vision tower): leave "
        "out --image, or load a multimodal model")
