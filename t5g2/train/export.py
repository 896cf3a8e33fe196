"""A training run's checkpoint as a Hugging Face T5Gemma 2 directory.

Reads only the parameters of one step (not the optimizer state) onto one device, converts them
with t5g2.convert.hf_t5gemma2 and writes config.json + model.safetensors, which
`transformers.T5Gemma2ForConditionalGeneration.from_pretrained` loads; writing needs neither
torch nor transformers. Only merged-attention runs export: the Hugging Face T5Gemma 2 has no
separate cross-attention blocks. When the run trained on the UL2 pipeline its sentencepiece model
is known and is written too, as `tokenizer.model`, with `t5g2_vocabulary.json` listing the
special, sentinel and mode-token ids the model was trained with. No transformers tokenizer config
is written: transformers' T5Tokenizer, rebuilt from a sentencepiece file, does not reproduce
sentencepiece's ids (measured: different ids and an EOS of its own), so
`sentencepiece.SentencePieceProcessor(model_file=...)` is the way to read it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from t5g2 import sharding
from t5g2.configlib import ConfigError
from t5g2.convert import checkpoint_files, hf_t5gemma2
from t5g2.model import ModelConfig
from t5g2.model.params import flat_params
from t5g2.train.checkpoint import Checkpointer, CheckpointError
from t5g2.train.config import TrainConfig
from t5g2.train.state import TrainState, model_graphdef

log = logging.getLogger(__name__)

TOKENIZER_MODEL = "tokenizer.model"
VOCABULARY_NOTE = "t5g2_vocabulary.json"


@dataclasses.dataclass
class Exported:
    step: int
    out: str
    files: list[str]


@dataclasses.dataclass
class LoadedRun:
    step: int
    config: dict[str, Any]  # the run's config, as the checkpoint recorded it
    model_cfg: ModelConfig
    model: nnx.Module  # the model with the step's parameters, on this host's first device


def load_run(workdir: str, step: int | None = None, context_scale: float = 1.0,
             dtype: str | None = None) -> LoadedRun:
    """The model of step `step` (default: the latest) of a run; reads no optimizer state.
    `context_scale` > 1 runs it at that many times its training context
    (`ModelConfig.with_longer_context`); `dtype` replaces the compute dtype (e.g. float32)."""
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        steps = checkpointer.steps()
        if not steps:
            raise CheckpointError(f"{checkpointer.directory} holds no complete checkpoint")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"step {step} is not in {checkpointer.directory}: {steps}")
        config = checkpointer.saved_config(step)
        model_cfg = ModelConfig.from_config_dict(config["model"]).with_longer_context(
            context_scale)
        if dtype is not None:
            model_cfg = dataclasses.replace(model_cfg, dtype=dtype)
            model_cfg.validate()
        mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
        graphdef, abstract_params = model_graphdef(model_cfg)
        shardings = TrainState(step=NamedSharding(mesh, PartitionSpec()),
                               params=sharding.param_shardings(abstract_params, mesh),
                               opt_state=None)
        abstract = TrainState(step=None, params=abstract_params, opt_state=None)
        params = checkpointer.restore(step, abstract, shardings, items=("params",),
                                      with_data=False).state.params
    finally:
        checkpointer.close()
    return LoadedRun(step, config, model_cfg, nnx.merge(graphdef, params))


def export(workdir: str, out: str, *, step: int | None = None, overwrite: bool = False,
           context_scale: float = 1.0) -> Exported:
    """Writes step `step` (default: the latest) of `workdir`'s checkpoints to `out`, for a
    context `context_scale` times the training one (its RoPE in the config's
    `rope_parameters`)."""
    checkpoint_files.require_empty(out, overwrite)
    run = load_run(workdir, step, context_scale)
    if run.model_cfg.cross_attention != "merged":
        raise ConfigError(f"{workdir} step {run.step} has model.cross_attention="
                          f"{run.model_cfg.cross_attention!r}; the Hugging Face T5Gemma 2 has "
                          "merged attention only, so only merged-attention runs export")
    state_dict = hf_t5gemma2.to_hf_state_dict(flat_params(run.model), run.model_cfg)
    dtype = next(iter(state_dict.values())).dtype.name  # one param_dtype for every tensor
    hf_config = hf_t5gemma2.to_hf_config_dict(run.model_cfg, dtype=dtype)
    os.makedirs(out, exist_ok=True)
    files = checkpoint_files.write_checkpoint(out, state_dict, hf_config)
    files += _write_tokenizer(run.config, out)
    log.info("exported step %d of %s to %s (%s)", run.step, workdir, out, ", ".join(files))
    return Exported(step=run.step, out=out, files=files)


def run_vocabulary(config: dict[str, Any]):
    """The vocabulary (t5g2.data.vocab.Vocabulary) a run trained with: its UL2 pipeline's
    sentencepiece model, sentinels and mode tokens; None for a run on another data source."""
    if config.get("data", {}).get("source") != "ul2":
        return None
    from t5g2.data.denoisers import mixture_from_config
    from t5g2.data.pipeline import open_vocabulary
    from t5g2.train.loop import pipeline_config

    train_cfg = TrainConfig.from_config_dict(config["train"])
    pipeline_cfg = pipeline_config(ml_collections.ConfigDict(config), train_cfg)
    return open_vocabulary(pipeline_cfg, mixture_from_config(pipeline_cfg.mixture))


def _write_tokenizer(config: dict[str, Any], out: str) -> list[str]:
    """The run's sentencepiece model and sentinel/mode ids, when it used the UL2 pipeline."""
    for stale in (TOKENIZER_MODEL, VOCABULARY_NOTE):  # from an earlier export into `out`
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    vocab = run_vocabulary(config)
    if vocab is None:
        log.info("no tokenizer written: the run's data source was %r",
                 config.get("data", {}).get("source"))
        return []
    shutil.copyfile(vocab.model_file, os.path.join(out, TOKENIZER_MODEL))
    note = dict(sentencepiece_size=vocab.sp_size, extra_ids=vocab.extra_ids, size=vocab.size,
                pad_id=vocab.pad_id, eos_id=vocab.eos_id, bos_id=vocab.bos_id,
                unk_id=vocab.unk_id, sentinel_ids=[int(i) for i in vocab.sentinel_ids],
                mode_ids={t: vocab.mode_id(t) for t in vocab.mode_tokens})
    with open(os.path.join(out, VOCABULARY_NOTE), "w", encoding="utf-8") as f:
        json.dump(note, f, indent=2)
    return [TOKENIZER_MODEL, VOCABULARY_NOTE]
