"""Images: decoding and preprocessing against HF's Gemma3ImageProcessor, the placeholder layout
against Gemma3Processor, and bad image files under the on_bad policy."""

import io
import pickle
import zlib

import numpy as np
import pytest
from PIL import Image

from t5g2.data import images
from t5g2.data.images import (IMAGE_MARKER, ImageError, ImageProblems, decode_image,
                              encode_with_images, image_token_block, load_image, preprocess,
                              read_image_bytes)
from t5g2.data.vocab import Vocabulary, train_sentencepiece
from tests import fake_store

# The released T5Gemma 2 preprocessor_config.json (only `size` is changed per test).
RELEASED_PREPROCESSOR = dict(do_convert_rgb=None, do_resize=True, do_rescale=True,
                             do_normalize=True, do_pan_and_scan=None, resample=2,
                             rescale_factor=0.00392156862745098, image_mean=[0.5, 0.5, 0.5],
                             image_std=[0.5, 0.5, 0.5], size={"height": 896, "width": 896})
# What Gemma3Processor passes to its image processor where the released config says null.
AS_THE_PROCESSOR = dict(do_convert_rgb=True, do_pan_and_scan=False)
TOKENS_PER_IMAGE = 4  # the tiny vision config's


def reference_image_processor(size: int):
    # the class `Gemma3ImageProcessor` resolves to without torchvision (as installed here)
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    return Gemma3ImageProcessorPil(**{**RELEASED_PREPROCESSOR,
                                      "size": {"height": size, "width": size}})


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def generated_image(rng, height, width, mode) -> Image.Image:
    """A random image of `mode`; "P" gets a palette with one transparent colour."""
    if mode in ("RGB", "CMYK", "RGBA"):
        channels = len(mode)
        return Image.fromarray(rng.integers(0, 256, (height, width, channels), np.uint8), mode)
    if mode in ("L", "1"):
        return Image.fromarray(rng.integers(0, 256, (height, width), np.uint8), "L").convert(mode)
    if mode == "LA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 2), np.uint8), "LA")
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 16, (height, width), np.uint8), "P")
        image.putpalette(rng.integers(0, 256, 16 * 3, np.uint8).tolist())
        image.info["transparency"] = 3
        return image
    raise ValueError(mode)


# (height, width, mode, file format, target size): smaller, equal and larger than the target,
# square and not, every conversion to RGB the reference makes.
PARITY_CASES = [
    (20, 30, "RGB", "PNG", 56),
    (56, 56, "RGB", "PNG", 56),
    (150, 61, "RGB", "PNG", 56),
    (61, 150, "L", "PNG", 56),
    (90, 70, "RGBA", "PNG", 56),
    (40, 100, "P", "PNG", 56),
    (64, 48, "LA", "PNG", 28),
    (33, 47, "1", "PNG", 28),
    (50, 80, "CMYK", "JPEG", 56),
    (300, 200, "RGB", "JPEG", 224),
    (700, 1000, "RGB", "PNG", 896),
    (3, 1200, "RGB", "PNG", 896),
]


@pytest.mark.parametrize("height,width,mode,fmt,size", PARITY_CASES)
def test_decode_and_preprocess_equal_the_reference_processor(height, width, mode, fmt, size):
    rng = np.random.default_rng([height, width, size])
    data = encoded(generated_image(rng, height, width, mode), fmt)
    ours = preprocess(decode_image(data, "generated"), size)
    reference = reference_image_processor(size)(Image.open(io.BytesIO(data)), **AS_THE_PROCESSOR,
                                                return_tensors="np")["pixel_values"]
    assert reference.shape == (1, 3, size, size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32
    assert np.abs(ours - reference[0].transpose(1, 2, 0)).max() <= 1e-6
    assert ours.min() >= -1 and ours.max() <= 1


def test_preprocess_of_an_array_equals_the_reference_processor():
    """The array path (no file): uint8 HWC in, as a caller holding decoded pixels passes it."""
    rng = np.random.default_rng(7)
    for height, width in [(17, 90), (128, 128), (400, 31)]:
        array = rng.integers(0, 256, (height, width, 3), np.uint8)
        reference = reference_image_processor(56)(array, **AS_THE_PROCESSOR,
                                                  return_tensors="np")["pixel_values"]
        assert np.abs(preprocess(array, 56) - reference[0].transpose(1, 2, 0)).max() <= 1e-6


def test_decoding_turns_the_image_upright_by_its_exif_orientation():
    """As transformers' load_image: an image stored sideways with orientation 6 (rotate 90
    clockwise to view) decodes as it displays."""
    rng = np.random.default_rng(3)
    stored = rng.integers(0, 256, (20, 30, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.fromarray(stored).save(out, format="PNG", exif=exif)
    decoded = decode_image(out.getvalue(), "rotated.png")
    assert decoded.shape == (30, 20, 3)
    np.testing.assert_array_equal(decoded, np.rot90(stored, k=-1))


def test_preprocess_refuses_what_is_not_uint8_rgb():
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\].*float32"):
        preprocess(np.zeros((4, 4, 3), np.float32), 8)
    with pytest.raises(ValueError, match="size=0"):
        preprocess(np.zeros((4, 4, 3), np.uint8), 0)


# -- bad image files ---------------------------------------------------------------------


def noise_file(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    return encoded(Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)), fmt)


def one_line_error(excinfo, *parts) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)
    assert "on_bad='skip'" in message  # the way out for a dataset with a few bad files
    return message


def test_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "nowhere.png")
    with pytest.raises(ImageError) as excinfo:
        load_image(path, "train.jsonl line 5, image 0")
    one_line_error(excinfo, f"train.jsonl line 5, image 0 ({path}): image file not found")
    assert excinfo.value.reason == "missing_image"


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as excinfo:
        load_image(str(path), "train.jsonl line 3, image 1")
    one_line_error(excinfo, "train.jsonl line 3, image 1", str(path), "zero-byte image")
    assert excinfo.value.reason == "empty_image"


def test_corrupt_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_bytes(b"this is not an image at all\n" * 10)
    with pytest.raises(ImageError) as excinfo:
        load_image(str(path))
    one_line_error(excinfo, str(path), "cannot decode the image: no format Pillow reads "
                   "recognises it (it starts b'this is not ')")
    assert excinfo.value.reason == "corrupt_image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_fails_at_decode_not_later(fmt):
    data = noise_file(fmt)
    assert decode_image(data, "whole").shape == (64, 64, 3)
    # Pillow opens the truncated file lazily without complaint; only decoding finds the cut
    Image.open(io.BytesIO(data[:len(data) // 2]))
    with pytest.raises(ImageError) as excinfo:
        decode_image(data[:len(data) // 2], "shard-3.parquet row 17, image 0")
    one_line_error(excinfo, "shard-3.parquet row 17, image 0", "corrupt or truncated")


def test_truncated_file_fails_even_where_a_library_allowed_truncated_images(monkeypatch):
    from PIL import ImageFile
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as tensorflow_datasets does
    data = noise_file("JPEG")
    with pytest.raises(ImageError, match="truncated"):
        decode_image(data[:len(data) // 2], "cut.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageError) as excinfo:
        decode_image(noise_file("PNG"), "big.png", max_pixels=64 * 64 - 1)
    one_line_error(excinfo, "big.png", "64x64 = 4096 pixels", "limit of 4095 pixels")
    assert excinfo.value.reason == "image_too_large"
    # real bombs: tiny files whose header declares a huge image, refused from the header alone
    limit = Image.MAX_IMAGE_PIXELS
    over_ours, over_pillows = int(limit ** 0.5) + 8, int((2 * limit) ** 0.5) + 8
    for side, expected in [(over_ours, "is over the limit of"), (over_pillows, "too large")]:
        with pytest.raises(ImageError, match=f"bomb.png: .*{expected}") as excinfo:
            decode_image(png_header_only(side, side), "bomb.png")
        assert excinfo.value.reason == "image_too_large"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a width x height 1-bit grey image and holds (almost) no pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (len(body).to_bytes(4, "big") + kind + body
                + zlib.crc32(kind + body).to_bytes(4, "big"))
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def test_object_store_paths_read_through_fs(tmp_path):
    (tmp_path / "bucket").mkdir()
    (tmp_path / "bucket" / "cat.jpg").write_bytes(noise_file("JPEG"))
    with fake_store.fake_gcs(str(tmp_path)) as calls:
        assert load_image("gs://bucket/cat.jpg").shape == (64, 64, 3)
        with pytest.raises(ImageError, match="gs://bucket/dog.jpg: image file not found"):
            read_image_bytes("gs://bucket/dog.jpg")
    assert ("open", "gs://bucket/cat.jpg") in calls


def test_on_bad_skip_counts_error_raises(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    bad = [str(tmp_path / "missing.png"), str(empty), str(empty)]
    skipping = ImageProblems("skip")
    for path in bad:
        try:
            load_image(path)
        except ImageError as e:
            skipping(e)
    assert skipping.counts == {"empty_image": 2, "missing_image": 1}
    assert len(skipping) == 3
    assert skipping.examples[0] == f"{bad[0]}: image file not found"
    assert skipping.report().startswith("images: skipped empty_image=2, missing_image=1 (first: ")
    assert ImageProblems("skip").report() == "images: nothing skipped"

    with pytest.raises(ImageError, match="zero-byte image"):
        try:
            load_image(str(empty))
        except ImageError as e:
            ImageProblems("error")(e)
    # a prompt that does not match its images is never skipped
    with pytest.raises(ImageError, match="marker"):
        try:
            encode_with_images(list, "no marker", 1, tokens_per_image=1, boi_id=1, image_id=2,
                               eoi_id=3)
        except ImageError as e:
            skipping(e)
    with pytest.raises(ValueError, match="on_bad='drop'; valid: error, skip"):
        ImageProblems("drop")


def test_image_error_pickles_with_its_reason():
    """Grain workers send exceptions between processes."""
    with pytest.raises(ImageError) as excinfo:
        decode_image(b"", "x.png")
    again = pickle.loads(pickle.dumps(excinfo.value))
    assert (str(again), again.reason, again.where, again.problem) == (
        str(excinfo.value), "empty_image", "x.png", "zero-byte image")
    assert pickle.loads(pickle.dumps(ImageProblems("skip"))).on_bad == "skip"


# -- the placeholder layout --------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(our Vocabulary, the reference GemmaTokenizer) over one small sentencepiece model with
    Gemma's image tokens and whitespace pieces "\\n\\n" and "\\n\\n\\n" (as Gemma's own
    vocabulary has), so the newlines around an image can merge with the text's own."""
    from tokenizers.models import BPE
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    texts = ["A photo of a cat. The dog ran to the park.", "Describe this image in detail.",
             "What is the second picture? first and second, hello world"] * 20
    path = train_sentencepiece(
        texts, str(tmp_path_factory.mktemp("vocab") / "sp"), vocab_size=320, mode_tokens=(),
        user_defined_symbols=("<start_of_image>", "<end_of_image>", "<image_soft_token>",
                              "\n\n\n", "\n\n"))
    ours = Vocabulary.from_file(path, num_sentinels=0, mode_tokens=())
    extracted = SentencePieceExtractor(path).extract(BPE)
    reference = GemmaTokenizer(
        vocab=extracted["vocab"], merges=extracted["merges"],
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})
    reference.add_tokens(["\n\n\n", "\n\n"])  # sentencepiece's user symbols, at their own ids
    return ours, reference


def reference_processor(tokenizer):
    from transformers import Gemma3Processor
    return Gemma3Processor(image_processor=reference_image_processor(28), tokenizer=tokenizer,
                           image_seq_length=TOKENS_PER_IMAGE)


def special_ids(tokenizer):
    return dict(boi_id=tokenizer.boi_token_id, image_id=tokenizer.image_token_id,
                eoi_id=tokenizer.eoi_token_id, tokens_per_image=TOKENS_PER_IMAGE)


PROMPTS = [
    ("A photo of a cat.", 0),
    ("Describe\n<start_of_image> in detail.", 1),  # "\n" + "\n\n" is one token
    ("<start_of_image>first and<start_of_image>\n\nsecond", 2),
    ("What is the second picture?<start_of_image><start_of_image>", 2),
]


@pytest.mark.parametrize("text,num_images", PROMPTS)
def test_token_layout_equals_gemma3_processor(tokenizers, text, num_images):
    vocab, tokenizer = tokenizers
    ids = special_ids(tokenizer)
    assert len({ids["boi_id"], ids["image_id"], ids["eoi_id"]}) == 3
    pictures = [np.full((10 + k, 12, 3), 40 * k, np.uint8) for k in range(num_images)]
    reference = reference_processor(tokenizer)(
        text=[text], images=[pictures] if pictures else None, return_tensors="np",
        add_special_tokens=False)
    expected = reference["input_ids"][0]
    assert (expected == ids["image_id"]).sum() == num_images * TOKENS_PER_IMAGE
    if pictures:  # the processor's own image path agrees too (it sets do_convert_rgb)
        ours = np.stack([preprocess(p, 28) for p in pictures]).transpose(0, 3, 1, 2)
        assert np.abs(ours - reference["pixel_values"]).max() <= 1e-6
    # our tokenizer (the one training uses) and the reference's
    for encode in (vocab.encode, lambda s: tokenizer.encode(s, add_special_tokens=False)):
        got = encode_with_images(encode, text, num_images, **ids)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, expected)


def test_the_newlines_merge_with_the_text_as_in_the_reference(tokenizers):
    """The case above is a real test of the merging: encoding the newlines apart would differ."""
    vocab, _ = tokenizers
    assert list(vocab.encode("Describe\n\n\n")) != \
        list(vocab.encode("Describe\n")) + list(vocab.encode("\n\n"))


def test_images_without_text_as_the_reference(tokenizers):
    """The reference, given images and no text, prompts with the markers joined by spaces."""
    _, tokenizer = tokenizers
    pictures = [np.zeros((8, 8, 3), np.uint8)] * 2
    reference = reference_processor(tokenizer)(images=[pictures], return_tensors="np",
                                               add_special_tokens=False)
    got = encode_with_images(lambda s: tokenizer.encode(s, add_special_tokens=False),
                             " ".join([IMAGE_MARKER] * 2), 2, **special_ids(tokenizer))
    np.testing.assert_array_equal(got, reference["input_ids"][0])


def test_image_token_block_is_one_lone_image(tokenizers):
    vocab, tokenizer = tokenizers
    ids = special_ids(tokenizer)
    block = image_token_block(vocab.encode("\n\n"), **ids)
    reference = reference_processor(tokenizer)(
        text=[IMAGE_MARKER], images=[[np.zeros((8, 8, 3), np.uint8)]], return_tensors="np",
        add_special_tokens=False)["input_ids"][0]
    np.testing.assert_array_equal(block, reference)
    newline = vocab.encode("\n\n")[0]
    assert block.tolist() == [newline, ids["boi_id"], *[ids["image_id"]] * TOKENS_PER_IMAGE,
                              ids["eoi_id"], newline]


@pytest.mark.parametrize("text,num_images,markers", [
    ("two <start_of_image> and <start_of_image>", 1, 2),  # more markers than images
    ("one <start_of_image>", 2, 1),                         # more images than markers
    ("no marker at all", 1, 0),                             # the reference refuses it too
])
def test_marker_count_mismatch_is_a_clear_error(tokenizers, text, num_images, markers):
    vocab, tokenizer = tokenizers
    with pytest.raises(ImageError) as excinfo:
        encode_with_images(vocab.encode, text, num_images, where="train.jsonl line 9",
                           **special_ids(tokenizer))
    message = str(excinfo.value)
    assert message.startswith(f"train.jsonl line 9: {num_images} image(s) but {markers} "
                              f"{IMAGE_MARKER} marker(s)")
    assert "\n" not in message and excinfo.value.reason == "image_count"
    with pytest.raises(ValueError, match="number of"):  # and so does the reference
        reference_processor(tokenizer)(text=[text], images=[[np.zeros((8, 8, 3), np.uint8)]
                                                            * num_images])


def test_image_token_strings_in_the_text_are_refused(tokenizers):
    """Soft tokens without an image would leave the model more placeholders than images."""
    vocab, tokenizer = tokenizers
    with pytest.raises(ImageError, match="ex 4: its text encodes to an image token id"):
        encode_with_images(vocab.encode, "sneaky <image_soft_token>", 0, where="ex 4",
                           **special_ids(tokenizer))


def test_module_functions_pickle():
    """Grain workers receive these by reference."""
    for fn in (images.load_image, images.decode_image, images.preprocess,
               images.encode_with_images):
        assert pickle.loads(pickle.dumps(fn)) is fn
