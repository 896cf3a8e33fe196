"""Image-text examples as prefix-LM rows mixed into the UL2 rows: the row holds the example (T
placeholders per image where its marker was, the preprocessed pixels, the target), the mix rate,
UL2 rows unchanged, exact resume with 0 and 2 workers, sharding, JSONL = Parquet, bad input."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from t5g2.configlib import ConfigError
from t5g2.data import images as image_io
from t5g2.data.denoisers import MIXTURES
from t5g2.data.image_text import (ImageSpec, ImageTextConfig, ImageTextSource, open_records)
from t5g2.data.packing import CONTRACT_KEYS
from t5g2.data.pipeline import PipelineConfig, Ul2Source, sentinels_needed
from t5g2.data.sources import SourceError
from t5g2.data.vocab import default_vocabulary
from tests.test_pipeline import assert_same

LENGTHS = dict(encoder_length=64, decoder_length=64)
VOCAB_SIZE = 512  # the vocabulary of tests/test_pipeline.py (shared cache entry)
SIZE, T, M = 56, 4, 2
SPEC = ImageSpec(image_size=SIZE, tokens_per_image=T, boi_id=1000, image_id=1001, eoi_id=1002)
MARKER = "<start_of_image>"
BATCH = 4


@pytest.fixture(scope="module")
def vocab(cache_dir):
    needed = sentinels_needed(MIXTURES["t5gemma2"], **LENGTHS)
    return default_vocabulary(vocab_size=VOCAB_SIZE, num_sentinels=needed, cache_dir=cache_dir)


def _image(rng, height, width, path, fmt):
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, fmt)


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """A directory with 5 images (PNG and JPEG, several sizes) and 9 examples with 0, 1 or 2
    images (relative paths), each target unique."""
    root = tmp_path_factory.mktemp("image_text")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i, (h, w) in enumerate([(56, 56), (30, 80), (100, 40), (17, 23), (64, 64)]):
        fmt = "PNG" if i % 2 == 0 else "JPEG"
        names.append(f"img/{i}.{fmt.lower()}")
        _image(rng, h, w, root / names[-1], fmt)
    records = []
    for i in range(9):
        n = i % 3
        chosen = [names[(i + j) % len(names)] for j in range(n)]
        text = {0: f"Question {i}: what is it?",
                1: f"{MARKER} Describe picture {i}.",
                2: f"Compare {MARKER} with {MARKER} for case {i}."}[n]
        records.append(dict(text=text, images=chosen, target=f"The answer is {i}."))
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root, records


def pipeline_cfg(cache_dir, **overrides):
    return PipelineConfig(**{**LENGTHS, "batch_size": BATCH, "seed": 0,
                             "vocab_size": VOCAB_SIZE, "cache_dir": cache_dir, **overrides})


def image_cfg(path, **overrides):
    return ImageTextConfig(**{"paths": (str(path),), "rate": 0.5, "max_images": M, **overrides})


def make_source(cache_dir, documents, vocab, path, *, pipeline=None, **overrides):
    kw = dict(process_index=0, process_count=1)
    kw.update({k: overrides.pop(k) for k in ("process_index", "process_count")
               if k in overrides})
    return ImageTextSource(pipeline or pipeline_cfg(cache_dir), image_cfg(path, **overrides),
                           SPEC, documents=documents, vocab=vocab, **kw)


def take(src, n):
    return [next(src) for _ in range(n)]


def flat_rows(batches):
    return [{k: v[r] for k, v in b.items()} for b in batches
            for r in range(b["encoder_input_tokens"].shape[0])]


def target_text(row, vocab):
    tokens = row["decoder_target_tokens"][row["decoder_segment_ids"] > 0]
    assert tokens[-1] == vocab.eos_id
    return vocab.decode(tokens[:-1])


def is_image_text(row, records, vocab):
    """An image-text row (of any record) rather than a UL2 row: one segment whose target is one
    of the records' targets."""
    return (row["decoder_segment_ids"].max() == 1
            and target_text(row, vocab) in {r["target"] for r in records})


# ---------------------------------------------------------------------------- the rows

def test_an_image_text_row_holds_its_example(cache_dir, documents, vocab, examples):
    root, records = examples
    src = make_source(cache_dir, documents, vocab, root / "train.jsonl", rate=1.0)
    batches = take(src, 5)  # 20 rows: every one of the 9 records at least twice
    seen = set()
    for batch in batches:
        assert set(batch) == set(CONTRACT_KEYS) | {"encoder_images"}
        assert batch["encoder_images"].shape == (BATCH, M, SIZE, SIZE, 3)
        assert batch["encoder_images"].dtype == np.float32
    for row in flat_rows(batches):
        record = next(r for r in records if r["target"] == target_text(row, vocab))
        seen.add(record["target"])
        # encoder: one segment, the text's pieces around one block per image, then EOS
        n = len(record["images"])
        real = row["encoder_segment_ids"] > 0
        assert np.all(row["encoder_segment_ids"][real] == 1) and real[:real.sum()].all()
        tokens = row["encoder_input_tokens"][real]
        assert tokens[-1] == vocab.eos_id
        block = [SPEC.boi_id] + [SPEC.image_id] * T + [SPEC.eoi_id]
        starts = [i for i in range(len(tokens)) if tokens[i] == SPEC.boi_id]
        assert len(starts) == n and np.sum(tokens == SPEC.image_id) == n * T
        pieces, at = [], 0
        for s in starts:
            assert tokens[s:s + T + 2].tolist() == block
            pieces.append(tokens[at:s])
            at = s + T + 2
        pieces.append(tokens[at:-1])
        texts = record["text"].split(MARKER)
        expected = [("\n\n" if k else "") + t + ("\n\n" if k < n else "")
                    for k, t in enumerate(texts)]
        assert [vocab.decode(p) for p in pieces] == expected
        assert np.all(row["encoder_positions"][real] == np.arange(real.sum()))
        # decoder: the target then EOS, weighted 1, shifted right after BOS; padding weighted 0
        target = np.append(vocab.encode(record["target"]), vocab.eos_id)
        dec = row["decoder_segment_ids"] > 0
        np.testing.assert_array_equal(row["decoder_target_tokens"][dec], target)
        np.testing.assert_array_equal(row["decoder_loss_weights"], dec.astype(np.float32))
        np.testing.assert_array_equal(row["decoder_input_tokens"][dec],
                                      np.concatenate([[vocab.bos_id], target[:-1]]))
        # images: the preprocessed files in order, then zero slots
        for k in range(M):
            if k < n:
                with Image.open(root / record["images"][k]) as image:
                    pixels = np.asarray(image.convert("RGB"))
                want = image_io.preprocess(pixels, SIZE)
            else:
                want = np.zeros((SIZE, SIZE, 3), np.float32)
            np.testing.assert_array_equal(row["encoder_images"][k], want)
    assert seen == {r["target"] for r in records}
    assert src.consumed()["image_text_rows"] == 20
    src.close()


def test_a_mode_token_starts_the_encoder_input(cache_dir, documents, vocab, examples):
    root, _ = examples
    plain = flat_rows(take(make_source(cache_dir, documents, vocab, root / "train.jsonl",
                                       rate=1.0), 2))
    src = make_source(cache_dir, documents, vocab, root / "train.jsonl", rate=1.0,
                      mode_token="[S]")
    for row, without in zip(flat_rows(take(src, 2)), plain):
        n = int(without["encoder_segment_ids"].sum())
        assert row["encoder_input_tokens"][0] == vocab.mode_id("[S]")
        np.testing.assert_array_equal(row["encoder_input_tokens"][1:n + 1],
                                      without["encoder_input_tokens"][:n])
    with pytest.raises(ConfigError, match="mode_token='\\[Q\\]' is not a mode token"):
        make_source(cache_dir, documents, vocab, root / "train.jsonl", mode_token="[Q]")


def test_rows_mix_at_the_configured_rate_and_text_rows_are_the_ul2_rows(
        cache_dir, documents, vocab, examples):
    root, records = examples
    rate, n_batches = 0.3, 30
    src = make_source(cache_dir, documents, vocab, root / "train.jsonl", rate=rate)
    mixed = flat_rows(take(src, n_batches))
    chosen = [is_image_text(r, records, vocab) for r in mixed]
    # the documented rule: row k of shard 0 is image-text when rng([seed, 0, k, 1]) < rate
    rule = [np.random.default_rng([0, 0, k, 1]).random() < rate for k in range(len(mixed))]
    assert chosen == rule
    n = len(mixed)
    assert abs(sum(chosen) - rate * n) < 4 * np.sqrt(n * rate * (1 - rate)), sum(chosen)
    # the text rows are exactly the UL2 pipeline's rows, in order, with no images
    text_rows = [r for r, c in zip(mixed, chosen) if not c]
    assert all(not r["encoder_images"].any() for r in text_rows)
    plain = Ul2Source(pipeline_cfg(cache_dir), documents=documents, vocab=vocab,
                      process_index=0, process_count=1)
    reference = flat_rows(take(plain, -(-len(text_rows) // BATCH)))[:len(text_rows)]
    assert_same([{k: v for k, v in r.items() if k != "encoder_images"} for r in text_rows],
                reference)
    assert src.consumed()["rows"] == n
    src.close()


# ---------------------------------------------------------------------- resume, workers

def test_resume_gives_exactly_the_next_batches(cache_dir, documents, vocab, examples):
    root, _ = examples
    src = make_source(cache_dir, documents, vocab, root / "train.jsonl")
    take(src, 3)
    state = json.loads(json.dumps(src.get_state()))
    after = take(src, 4)
    restored = make_source(cache_dir, documents, vocab, root / "train.jsonl")
    restored.set_state(state)
    assert_same(take(restored, 4), after)
    assert len(json.dumps(state)) < 8000  # positions, not pixels


def test_two_workers_give_the_same_batches_and_resume(cache_dir, documents, vocab, examples):
    root, _ = examples
    reference = take(make_source(cache_dir, documents, vocab, root / "train.jsonl"), 6)
    src = make_source(cache_dir, documents, vocab, root / "train.jsonl", num_workers=2)
    try:
        first = take(src, 3)
        state = json.loads(json.dumps(src.get_state()))
        rest = take(src, 3)
    finally:
        src.close()
    assert_same(first + rest, reference)
    restored = make_source(cache_dir, documents, vocab, root / "train.jsonl", num_workers=2)
    try:
        restored.set_state(state)
        assert_same(take(restored, 3), rest)
    finally:
        restored.close()
    with pytest.raises(ValueError, match="image_workers=2 \\(now 0\\)"):
        make_source(cache_dir, documents, vocab, root / "train.jsonl").set_state(state)


def test_a_state_restores_only_into_the_same_mix(cache_dir, documents, vocab, examples):
    root, _ = examples
    state = make_source(cache_dir, documents, vocab, root / "train.jsonl").get_state()
    with pytest.raises(ValueError, match="image_text="):
        make_source(cache_dir, documents, vocab, root / "train.jsonl",
                    rate=0.25).set_state(state)
    plain = Ul2Source(pipeline_cfg(cache_dir), documents=documents, vocab=vocab,
                      process_index=0, process_count=1)
    with pytest.raises(ValueError, match="image_text=.*now not set"):
        plain.set_state(state)  # an image-text run continued without images


def test_two_shards_split_the_global_batch(cache_dir, documents, vocab, examples):
    root, records = examples
    cfg = pipeline_cfg(cache_dir, shards=2)
    whole = take(make_source(cache_dir, documents, vocab, root / "train.jsonl", pipeline=cfg,
                             rate=1.0), 2)
    halves = [take(make_source(cache_dir, documents, vocab, root / "train.jsonl", pipeline=cfg,
                               rate=1.0, process_index=p, process_count=2), 2) for p in (0, 1)]
    for step in range(2):
        for key in whole[step]:
            np.testing.assert_array_equal(
                whole[step][key], np.concatenate([halves[0][step][key], halves[1][step][key]]))
    # in the first epoch the two shards read different records
    targets = [{target_text(r, vocab) for r in flat_rows(h)} for h in halves]
    assert not targets[0] & targets[1] and len(targets[0] | targets[1]) == 8


# -------------------------------------------------------------------------- the formats

def test_parquet_with_image_bytes_gives_the_jsonl_rows(cache_dir, documents, vocab, examples,
                                                       tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, records = examples
    inline = [dict(r, images=[(root / p).read_bytes() for p in r["images"]]) for r in records]
    # Hugging Face datasets' Image feature: {"bytes", "path"} structs
    structs = [dict(r, images=[{"bytes": (root / p).read_bytes(), "path": None}
                               for p in r["images"]]) for r in records]
    jsonl = take(make_source(cache_dir, documents, vocab, root / "train.jsonl", rate=1.0), 3)
    for name, table in (("bytes", inline), ("structs", structs)):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(table), path, row_group_size=4)
        src = make_source(cache_dir, documents, vocab, path, kind="parquet", rate=1.0)
        assert_same(take(src, 3), jsonl)
    # JSONL with base64 bytes objects and absolute paths
    lines = [dict(r, images=[{"bytes": base64.b64encode((root / p).read_bytes()).decode()}
                             if k % 2 else str(root / p) for k, p in enumerate(r["images"])])
             for r in records]
    path = tmp_path / "inline.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert_same(take(make_source(cache_dir, documents, vocab, path, rate=1.0), 3), jsonl)


def test_a_parquet_file_without_a_configured_column_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist([dict(text="a", images=[])]), path)
    with pytest.raises(SourceError, match="no column 'target'"):
        open_records(image_cfg(path, kind="parquet"))


# ----------------------------------------------------------------------------- bad input

def _write(tmp_path, records, name="bad.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture
def bad_images(tmp_path, examples):
    """Examples whose image is missing, zero bytes or corrupt, between good ones."""
    root, records = examples
    (tmp_path / "empty.png").write_bytes(b"")
    good = io.BytesIO()
    Image.new("RGB", (20, 20), (9, 8, 7)).save(good, "PNG")
    (tmp_path / "cut.png").write_bytes(good.getvalue()[:40])
    (tmp_path / "good.png").write_bytes(good.getvalue())
    bad = [dict(text=f"{MARKER} x", images=[name], target=f"bad {name}")
           for name in ("missing.png", "empty.png", "cut.png")]
    goods = [dict(text=f"{MARKER} y{i}", images=["good.png"], target=f"good {i}")
             for i in range(3)]
    return _write(tmp_path, [goods[0], bad[0], goods[1], bad[1], bad[2], goods[2]])


@pytest.mark.parametrize("name, message", [("missing.png", "image file not found"),
                                           ("empty.png", "zero-byte image"),
                                           ("cut.png", "cannot decode the image")])
def test_a_bad_image_is_an_error_naming_it(cache_dir, documents, vocab, tmp_path, examples,
                                           name, message):
    root, _ = examples
    (tmp_path / "empty.png").write_bytes(b"")
    good = io.BytesIO()
    Image.new("RGB", (20, 20)).save(good, "PNG")
    (tmp_path / "cut.png").write_bytes(good.getvalue()[:40])
    path = _write(tmp_path, [dict(text=MARKER, images=[name], target="t")])
    src = make_source(cache_dir, documents, vocab, path, rate=1.0)
    with pytest.raises(image_io.ImageError, match=f"{name}.*{message}"):
        next(src)


def test_bad_images_are_skipped_and_counted(cache_dir, documents, vocab, bad_images):
    src = make_source(cache_dir, documents, vocab, bad_images, rate=1.0, on_bad="skip")
    targets = [target_text(r, vocab) for r in flat_rows(take(src, 3))]
    assert set(targets) == {"good 0", "good 1", "good 2"}  # 12 rows, only the good examples
    counts = src.consumed()
    assert counts["image_text_rows"] == 12
    # 12 good rows = 4 epochs of the shard: each epoch skipped the 3 bad ones once (the 4th
    # epoch's bad ones may come after its last good one)
    for reason in ("skipped_missing_image", "skipped_empty_image", "skipped_corrupt_image"):
        assert counts[reason] in (3, 4), counts


def test_every_example_bad_is_an_error_not_a_hang(cache_dir, documents, vocab, tmp_path):
    path = _write(tmp_path, [dict(text=MARKER, images=["missing.png"], target="t")] * 3)
    src = make_source(cache_dir, documents, vocab, path, rate=1.0, on_bad="skip")
    with pytest.raises(SourceError, match="6 image-text examples in a row were bad"):
        next(src)


def test_markers_that_do_not_match_the_images_are_an_error_even_when_skipping(
        cache_dir, documents, vocab, tmp_path, examples):
    root, records = examples
    image = str(root / records[1]["images"][0])
    for text, images in ((f"{MARKER} and {MARKER}", [image]), ("no marker", [image])):
        path = _write(tmp_path, [dict(text=text, images=images, target="t")])
        src = make_source(cache_dir, documents, vocab, path, rate=1.0, on_bad="skip")
        with pytest.raises(image_io.ImageError, match="marker"):
            next(src)


@pytest.mark.parametrize("record, reason, message", [
    (dict(text=f"{MARKER}{MARKER}{MARKER}", images=["a", "b", "c"], target="t"),
     "too_many_images", "3 images, over data.image_text.max_images=2"),
    (dict(text="word " * 80, images=[], target="t"), "too_long",
     "encoder tokens .*over train.encoder_length=64"),
    (dict(text="q", images=[], target="word " * 80), "too_long",
     "decoder tokens .*over train.decoder_length=64"),
    (dict(text="q", images=[]), "bad_record", "no field 'target'"),
    (dict(text="q", images="a.png", target="t"), "bad_record", "'images' is str, not a list"),
    (dict(text="q", images=[], target=f"{MARKER}"), "bad_record", "images go in the encoder"),
    (dict(text=MARKER, images=[7], target="t"), "bad_record", "image 0 is int"),
])
def test_a_bad_example_is_an_error_or_a_counted_skip(cache_dir, documents, vocab, tmp_path,
                                                     record, reason, message):
    path = _write(tmp_path, [record])
    with pytest.raises(SourceError, match=f"bad.jsonl: record 1 .*{message}"):
        next(make_source(cache_dir, documents, vocab, path, rate=1.0))
    good = dict(text="fine", images=[], target="ok")
    path = _write(tmp_path, [record, good], name="mixed.jsonl")
    src = make_source(cache_dir, documents, vocab, path, rate=1.0, on_bad="skip")
    assert {target_text(r, vocab) for r in flat_rows(take(src, 1))} == {"ok"}
    assert src.consumed()[f"skipped_{reason}"] >= 3


# --------------------------------------------------------------------------------- config

@pytest.mark.parametrize("field, value, message", [
    ("rate", 1.5, "data.image_text.rate=1.5 must be a fraction"),
    ("rate", 0.0, "rate=0: set the fraction"),
    ("max_images", 0, "data.image_text.max_images=0 must be an integer >= 1"),
    ("kind", "csv", "data.image_text.kind='csv'"),
    ("on_bad", "ignore", "data.image_text.on_bad='ignore'"),
    ("target_field", "text", "three different fields"),
    ("num_workers", -1, "data.image_text.num_workers=-1"),
])
def test_bad_config_values_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ImageTextConfig(**{"paths": ("x.jsonl",), "rate": 0.5, field: value}).validate()


def test_config_from_a_mapping_names_unknown_fields():
    cfg = ImageTextConfig.from_mapping({"paths": ["a.jsonl"], "rate": 1})
    assert cfg.paths == ("a.jsonl",) and cfg.rate == 1.0
    with pytest.raises(ConfigError, match="data.image_text.ratio"):
        ImageTextConfig.from_mapping({"ratio": 0.5})


def test_the_image_spec_comes_from_the_model_config():
    from types import SimpleNamespace

    from t5g2.model.config import VisionConfig

    with pytest.raises(ConfigError, match="model.vision is None"):
        ImageSpec.from_model(SimpleNamespace(vision=None))
    vision = VisionConfig(image_size=56, patch_size=14, d_model=32, ffn_dim=64, num_layers=2,
                          num_heads=2, tokens_per_image=4)
    model = SimpleNamespace(vision=vision, boi_token_id=7, image_token_id=8, eoi_token_id=9)
    assert ImageSpec.from_model(model) == ImageSpec(56, 4, 7, 8, 9)


def test_a_position_continues_on_another_process_count(cache_dir, documents, vocab, examples):
    root, _ = examples
    cfg = pipeline_cfg(cache_dir, shards=2)
    path = root / "train.jsonl"
    two = [make_source(cache_dir, documents, vocab, path, pipeline=cfg, process_index=p,
                       process_count=2) for p in (0, 1)]
    for src in two:
        take(src, 2)
    states = [json.loads(json.dumps(src.get_state())) for src in two]
    after = [take(src, 2) for src in two]
    one = make_source(cache_dir, documents, vocab, path, pipeline=pipeline_cfg(cache_dir),
                      process_count=1)
    one.restore_position(states)  # the saved 2 shards, both run by this one process
    for step, batch in enumerate(take(one, 2)):
        for key in batch:
            np.testing.assert_array_equal(
                batch[key], np.concatenate([after[0][step][key], after[1][step][key]]))


# ------------------------------------------------------------------------------ the run

def test_the_run_mixes_image_text_when_paths_are_set(cache_dir, examples):
    import ml_collections

    from configs import tiny
    from t5g2.model import ModelConfig
    from t5g2.train import loop
    from t5g2.train.config import TrainConfig

    root, records = examples
    config = tiny.get_config()
    config.train.update(encoder_length=64, decoder_length=64, batch_size=BATCH)
    config.data.ul2.update(vocab_size=VOCAB_SIZE, cache_dir=cache_dir)
    config.eval.holdout_documents = 0
    config.model.update(vocab_size=1024, boi_token_id=1000, image_token_id=1001,
                        eoi_token_id=1002)
    config.model.vision = ml_collections.ConfigDict(dict(
        image_size=SIZE, patch_size=14, d_model=32, ffn_dim=64, num_layers=2, num_heads=2,
        tokens_per_image=T))
    config.data.image_text = ml_collections.ConfigDict(dict(
        paths=(str(root / "train.jsonl"),), rate=1.0, max_images=M))
    model_cfg = ModelConfig.from_config_dict(config.model)
    train_cfg = TrainConfig.from_config_dict(config.train)
    source = loop.make_source(config, model_cfg, train_cfg)
    try:
        assert isinstance(source, ImageTextSource)
        batch = next(source)
        assert batch["encoder_images"].shape == (BATCH, M, SIZE, SIZE, 3)
        assert np.sum(batch["encoder_input_tokens"] == 1001) == T * sum(
            len(next(r for r in records if r["target"] == target_text(row, source.vocab)
                     )["images"]) for row in flat_rows([batch]))
    finally:
        source.close()
    config.data.image_text.paths = ()
    assert type(loop.make_source(config, model_cfg, train_cfg)) is Ul2Source
    config.data.image_text.paths = (str(root / "train.jsonl"),)
    config.model.vision = None
    with pytest.raises(ConfigError, match="model.vision is None"):
        loop.make_source(config, ModelConfig.from_config_dict(config.model), train_cfg)
