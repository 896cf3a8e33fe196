"""Export: a trained run's checkpoint becomes a Hugging Face T5Gemma 2 directory that
transformers loads with the same logits (float32), plus the run's sentencepiece model."""

import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch

from t5g2.configlib import ConfigError
from t5g2.data.denoisers import mixture_from_config
from t5g2.data.pipeline import open_vocabulary
from t5g2.train import export as export_module
from t5g2.train import loop
from t5g2.train.checkpoint import CheckpointError
from t5g2.train.config import TrainConfig
from t5g2.train.export import LoadedRun, export, load_run
from tests.reference import tiny_config
from tests.test_checkpoint import _small_config
from tests.test_parity_hf import TOL, _inputs


def test_trained_run_exports_to_transformers_with_the_same_logits(tmp_path, cache_dir):
    from transformers import T5Gemma2ForConditionalGeneration

    config = _small_config(3)
    config.data.source = "ul2"
    config.data.ul2.cache_dir = cache_dir
    config.train.encoder_length = config.train.decoder_length = 64
    config.model.encoder.sliding_window_pattern = 2  # layer 1 global: RoPE scaling shows
    config.model.decoder.sliding_window_pattern = 2
    workdir, out = tmp_path / "run", tmp_path / "hf"
    assert loop.train(config, str(workdir)).step == 3

    with pytest.MonkeyPatch.context() as blocked:  # writing needs neither torch nor transformers
        blocked.setitem(sys.modules, "transformers", None)
        blocked.setitem(sys.modules, "torch", None)
        exported = export(str(workdir), str(out))
    assert exported.step == 3
    # Files get open()'s mode (0o666 less the umask), as save_pretrained's do, not a temp file's.
    umask = os.umask(0o022)
    os.umask(umask)
    assert sorted(exported.files) == sorted(p.name for p in out.iterdir())
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {
        name: oct(0o666 & ~umask) for name in exported.files}
    run = load_run(str(workdir))
    hf = T5Gemma2ForConditionalGeneration.from_pretrained(str(out), attn_implementation="eager")
    enc, enc_mask, dec, dec_mask = _inputs(run.model_cfg)
    with torch.no_grad():
        ref = hf.eval()(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc_mask),
                        decoder_input_ids=torch.tensor(dec),
                        decoder_attention_mask=torch.tensor(dec_mask)).logits.numpy()
    ours = np.asarray(run.model(enc, dec, encoder_segment_ids=enc_mask,
                                decoder_segment_ids=dec_mask))
    valid = dec_mask.astype(bool)
    error = np.abs(ours[valid] - ref[valid]).max()
    assert error <= TOL, error
    assert np.abs(ref[valid]).max() > 0.1  # the comparison is not between near-zero logits

    # Run at 4x the trained context: the global layers' RoPE interpolated, the local ones kept,
    # in the exported config as transformers reads it; the same weights, new logits.
    exported = export(str(workdir), str(tmp_path / "hf_x4"), context_scale=4)
    saved = json.loads((tmp_path / "hf_x4" / "config.json").read_text())
    for stack in (saved["encoder"]["text_config"], saved["decoder"]):
        assert stack["rope_parameters"]["full_attention"] == {
            "rope_type": "linear", "factor": 4.0 * run.model_cfg.encoder.global_rope_scale,
            "rope_theta": run.model_cfg.encoder.global_rope_theta}
        assert stack["rope_parameters"]["sliding_attention"]["rope_type"] == "default"
    longer = load_run(str(workdir), context_scale=4).model
    hf4 = T5Gemma2ForConditionalGeneration.from_pretrained(str(tmp_path / "hf_x4"),
                                                           attn_implementation="eager")
    with torch.no_grad():
        ref4 = hf4.eval()(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc_mask),
                          decoder_input_ids=torch.tensor(dec),
                          decoder_attention_mask=torch.tensor(dec_mask)).logits.numpy()
    ours4 = np.asarray(longer(enc, dec, encoder_segment_ids=enc_mask,
                              decoder_segment_ids=dec_mask))
    assert np.abs(ours4[valid] - ref4[valid]).max() <= TOL
    assert np.abs(ours4[valid] - ours[valid]).max() > 100 * TOL  # the scale took effect

    # The run's vocabulary travels with the weights.
    pipeline_cfg = loop.pipeline_config(config, TrainConfig.from_config_dict(config.train))
    vocab = open_vocabulary(pipeline_cfg, mixture_from_config(pipeline_cfg.mixture))
    text = "Return the number of items in a container."
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.encode(text) == list(vocab.encode(text))
    note = json.loads((out / "t5g2_vocabulary.json").read_text())
    assert note["sentinel_ids"] == vocab.sentinel_ids.tolist()
    assert note["size"] == vocab.size <= run.model_cfg.vocab_size


def test_export_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match=r"context_scale=0.5: must be a finite number >= 1"):
        tiny_config().with_longer_context(0.5)
    with pytest.raises(CheckpointError, match="no checkpoints/ directory"):
        export(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty; pass --overwrite"):
        export(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_only_merged_attention_runs_export(tmp_path, monkeypatch):
    """The Hugging Face T5Gemma 2 has merged attention only: a run with separate cross-attention
    blocks is refused, naming the setting, before anything is written."""
    cfg = dataclasses.replace(tiny_config(), cross_attention="separate")
    monkeypatch.setattr(export_module, "load_run",
                        lambda workdir, step, context_scale: LoadedRun(7, {}, cfg, model=None))
    with pytest.raises(ConfigError, match=r"step 7 has model.cross_attention='separate'; the "
                                          r"Hugging Face T5Gemma 2 has merged attention only"):
        export(str(tmp_path / "run"), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
