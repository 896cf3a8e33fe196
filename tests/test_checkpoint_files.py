"""Bad checkpoints give clear errors naming the file or tensor; nothing is silently dropped."""

import json
import os
import stat

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from t5g2.convert import checkpoint_files, hf_t5gemma2
from t5g2.convert.checkpoint_files import CheckpointError
from t5g2.model import T5Gemma2
from t5g2.model.params import flat_params
from tests.reference import tiny_config

CFG = tiny_config(num_layers=7)


def _state_dict():
    return hf_t5gemma2.to_hf_state_dict(flat_params(T5Gemma2(CFG, rngs=nnx.Rngs(0))), CFG)


def _write(path, sd):
    checkpoint_files.write_checkpoint(str(path), sd, {"model_type": "t5gemma2"})


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        checkpoint_files.read_config(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        checkpoint_files.read_state_dict(str(tmp_path))


def test_state_dict_survives_a_write_and_read(tmp_path):
    sd = _state_dict()
    _write(tmp_path, sd)
    back = checkpoint_files.read_state_dict(str(tmp_path))
    assert set(back) == set(sd)
    assert all(np.array_equal(back[k], sd[k]) for k in sd)


def test_tensors_are_memory_mapped_and_read_as_safetensors_reads_them(tmp_path):
    from safetensors import safe_open

    sd = {"bf16": np.arange(24, dtype=np.float32).reshape(2, 3, 4).astype(ml_dtypes.bfloat16),
          "f32": np.linspace(-1, 1, 10, dtype=np.float32), "i64": np.arange(5),
          "empty": np.zeros((0, 3), np.float32)}
    _write(tmp_path, sd)
    back = checkpoint_files.read_state_dict(str(tmp_path))
    with safe_open(str(tmp_path / checkpoint_files.SINGLE_FILE), framework="numpy") as f:
        reference = {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    for key in sd:
        assert back[key].dtype == reference[key].dtype == sd[key].dtype, key
        np.testing.assert_array_equal(back[key], reference[key])
    assert isinstance(back["f32"], np.memmap)  # read lazily, page by page


def test_truncated_file_is_reported(tmp_path):
    _write(tmp_path, _state_dict())
    file = tmp_path / checkpoint_files.SINGLE_FILE
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or unreadable safetensors"):
        checkpoint_files.read_state_dict(str(tmp_path))


def test_missing_shard_is_reported(tmp_path):
    (tmp_path / checkpoint_files.INDEX_FILE).write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: shard named"):
        checkpoint_files.read_state_dict(str(tmp_path))


def test_unknown_and_missing_tensors_are_errors():
    sd = _state_dict()
    with pytest.raises(ValueError, match="tensors t5g2 does not know: .'model.decoder.extra'"):
        hf_t5gemma2.from_hf_state_dict({**sd, "model.decoder.extra": np.zeros(2)}, CFG)
    del sd["model.decoder.layers.3.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="model.decoder.layers.3.mlp.up_proj.weight"):
        hf_t5gemma2.from_hf_state_dict(sd, CFG)


def test_tied_copies_must_agree():
    sd = _state_dict()
    bad = {**sd, "lm_head.out_proj.weight": sd["model.encoder.embed_tokens.weight"] + 1}
    with pytest.raises(ValueError, match="lm_head.out_proj.weight differs"):
        hf_t5gemma2.from_hf_state_dict(bad, CFG)


def test_sharded_write_is_laid_out_as_save_pretrained_does(tmp_path):
    """Shards as huggingface_hub splits them (what save_pretrained uses); read back exactly."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards

    sd = _state_dict()
    files = checkpoint_files.write_checkpoint(str(tmp_path), sd, {"model_type": "t5gemma2"},
                                              max_shard_bytes=200_000)
    split = split_torch_state_dict_into_shards({k: torch.from_numpy(v) for k, v in sd.items()},
                                               max_shard_size=200_000)
    index = json.loads((tmp_path / checkpoint_files.INDEX_FILE).read_text())
    assert len(split.filename_to_tensors) > 2
    assert index["weight_map"] == split.tensor_to_filename
    assert index["metadata"]["total_size"] == split.metadata["total_size"]
    assert files == ["config.json", *sorted(split.filename_to_tensors), checkpoint_files.INDEX_FILE]
    back = checkpoint_files.read_state_dict(str(tmp_path))
    assert back.keys() == sd.keys() and all(np.array_equal(back[k], sd[k]) for k in sd)


def test_rewriting_a_directory_leaves_no_stale_shards(tmp_path):
    sd = _state_dict()
    checkpoint_files.write_checkpoint(str(tmp_path), sd, {}, max_shard_bytes=200_000)
    (tmp_path / "tokenizer.model").write_bytes(b"kept")
    smaller = {k: v for k, v in sd.items() if "layers.6." not in k}
    assert checkpoint_files.write_checkpoint(str(tmp_path), smaller, {}) == [
        "config.json", checkpoint_files.SINGLE_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", checkpoint_files.SINGLE_FILE, "tokenizer.model"]
    assert checkpoint_files.read_state_dict(str(tmp_path)).keys() == smaller.keys()


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_written_files_get_the_umasks_mode(tmp_path, umask):
    """Every file written (shards, index, config) has the mode open() gives under the umask, as
    save_pretrained's files do, not the 0600 of safetensors' renamed temp file."""
    previous = os.umask(umask)
    try:
        files = checkpoint_files.write_checkpoint(str(tmp_path), _state_dict(), {},
                                                  max_shard_bytes=200_000)
        with open(tmp_path / "reference", "w"):
            pass
    finally:
        os.umask(previous)
    expected = stat.S_IMODE((tmp_path / "reference").stat().st_mode)
    assert expected == 0o666 & ~umask
    assert len(files) > 3
    assert {f: oct(stat.S_IMODE((tmp_path / f).stat().st_mode)) for f in files} == {
        f: oct(expected) for f in files}
