"""The one list of what a checkpoint decides, read by resuming (checkpoint.py) and by starting from
a Hugging Face checkpoint (init.py)."""

import dataclasses

from t5g2.model import checkpoint_fields
from t5g2.train.checkpoint import model_differences
from tests.reference import tiny_config, tiny_vision_config


def test_differences_name_nested_fields_alike_on_configs_and_their_json():
    cfg = tiny_config()
    stack = dataclasses.replace(cfg.decoder, sliding_window=16, global_rope_scale=1.0)
    other = dataclasses.replace(cfg, decoder=stack, vocab_size=1024, dtype="bfloat16")
    expected = [("decoder.global_rope_scale", 8.0, 1.0), ("decoder.sliding_window", 8, 16),
                ("dtype", "float32", "bfloat16"), ("vocab_size", 512, 1024)]
    assert checkpoint_fields.differences(cfg, other) == expected
    assert checkpoint_fields.differences(cfg.to_dict(), other.to_dict()) == expected
    assert checkpoint_fields.differences(
        cfg, other, ignore=checkpoint_fields.ROPE_FIELDS + ("dtype",)) == [
        ("decoder.sliding_window", 8, 16), ("vocab_size", 512, 1024)]


def test_a_resumed_checkpoint_ignores_only_how_the_model_computes():
    saved = {"model": tiny_config().to_dict()}
    compute_only = tiny_config(dtype="bfloat16", remat="full", attention_query_chunk=64)
    assert model_differences(saved, {"model": compute_only.to_dict()}) == []
    stored = tiny_config(param_dtype="bfloat16", scan_layers=False, global_rope_scale=1.0)
    older = {"model": {k: v for k, v in saved["model"].items() if k != "image_token_id"}}
    assert model_differences(older, {"model": stored.to_dict()}, "its config.json") == [
        "model.decoder.global_rope_scale=8.0 in its config.json, 1.0 now",
        "model.encoder.global_rope_scale=8.0 in its config.json, 1.0 now",
        "model.image_token_id=None in its config.json, 501 now",
        "model.param_dtype='float32' in its config.json, 'bfloat16' now",
        "model.scan_layers=True in its config.json, False now"]


def test_a_checkpoint_from_before_the_vision_fields_is_the_text_only_model():
    now = tiny_config().to_dict()
    older = {"model": {k: v for k, v in now.items() if k not in ("vision", "boi_token_id")}}
    assert model_differences(older, {"model": now}) == []
    with_tower = tiny_vision_config().to_dict()
    assert [d.split("=")[0] for d in model_differences(older, {"model": with_tower})] == [
        "model.vision"]
