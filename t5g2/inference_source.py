"""Where inference reads a model from: a training run's workdir or a Hugging Face T5Gemma 2
directory, as one `InferenceSource` (model, vocabulary, context limits) for generation and lm_eval.

- A run (`workdir`): the parameters of one checkpoint step (`t5g2.train.export.load_run`) and the
  run's own tokenizer (its UL2 pipeline's sentencepiece model, sentinels and mode tokens). It
  serves inputs up to its training lengths x `context_scale`.
- A Hugging Face directory (`hf`): config.json + safetensors (`hf_t5gemma2.load_pretrained`) and
  its `tokenizer.model`. When the directory also has `t5g2_vocabulary.json` (written by
  `python -m launch.export`), the sentinel and mode-token ids come from it, so an exported run
  generates exactly what the run does; without it no mode token is known. It serves inputs up to
  each stack's `max_position_embeddings` x `context_scale`.
`context_scale` > 1 interpolates the global layers' RoPE (`ModelConfig.with_longer_context`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
from flax import nnx

from t5g2 import sharding
from t5g2.configlib import ConfigError
from t5g2.convert import checkpoint_files, hf_t5gemma2
from t5g2.convert.checkpoint_files import CheckpointError
from t5g2.data.vocab import Vocabulary
from t5g2.model import ModelConfig
from t5g2.model.config import DTYPES
from t5g2.train.export import TOKENIZER_MODEL, VOCABULARY_NOTE, load_run, run_vocabulary
from t5g2.train.init import place_params
from t5g2.train import samples
from t5g2.train.loop import check_vocabulary_fits_model
from t5g2.train.state import model_graphdef

# transformers' T5Gemma 2 text-config default, for a config.json that does not list it
DEFAULT_MAX_POSITION_EMBEDDINGS = 131_072
# The mode token of the prefix-LM (S) denoiser, which reads an input as a prompt.
PROMPT_MODE_TOKEN = "[S]"


@dataclasses.dataclass
class InferenceSource:
    """A model ready for inference, the vocabulary that reads and writes its text, and the
    longest inputs it serves."""

    name: str  # the workdir or directory as given, for messages
    step: int | None  # the run's checkpoint step; None for a Hugging Face directory
    model_cfg: ModelConfig
    model: nnx.Module  # on this host's first device
    vocab: Vocabulary
    encoder_length: int  # the longest encoder input served (context_scale included)
    decoder_length: int  # the longest decoder sequence served, decoder start token included

    @property
    def max_positions(self) -> int:
        """The longest input either stack serves: generation's `max_positions`."""
        return max(self.encoder_length, self.decoder_length)

    def decode(self, ids) -> str:
        """The text of generated ids; an id of the model's table that the tokenizer lacks (a
        table padded past the vocabulary) reads `<id N>` instead of failing."""
        return samples.decode(self.vocab, ids)

    def mode_head(self, mode_token: str | None, where: str = "--mode_token") -> list[int]:
        """The ids that lead each encoder input: [id of `mode_token`], or [] for ''. None picks
        the default: [S] where the vocabulary has mode tokens, none where it has none."""
        if mode_token is None:
            mode_token = PROMPT_MODE_TOKEN if self.vocab.mode_tokens else ""
        if not mode_token:
            return []
        if not self.vocab.mode_tokens:
            raise ConfigError(f"{where}={mode_token!r}: {self.name} has no {VOCABULARY_NOTE}, "
                              "so no mode token is known; pass an empty one for none")
        if mode_token not in self.vocab.mode_tokens:
            raise ConfigError(f"{where}={mode_token!r} is not one of {self.name}'s mode tokens "
                              f"{list(self.vocab.mode_tokens)}; or an empty one for none")
        return [self.vocab.mode_id(mode_token)]


def open_source(workdir: str | None = None, hf: str | None = None, *, step: int | None = None,
                context_scale: float = 1.0, dtype: str | None = None,
                flag_prefix: str = "--") -> InferenceSource:
    """The model of exactly one of `workdir` (step `step`, default the latest) and `hf`;
    `dtype` replaces the compute dtype. `flag_prefix` spells the option names in errors
    ('--' for a command line, '' for lm_eval's model_args)."""
    if bool(workdir) == bool(hf):
        raise ConfigError(f"{flag_prefix}workdir={workdir!r} and {flag_prefix}hf={hf!r}: give "
                          f"exactly one ({flag_prefix}workdir: a training run; {flag_prefix}hf: "
                          "a Hugging Face T5Gemma 2 directory)")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"{flag_prefix}dtype={dtype!r}: valid are {', '.join(DTYPES)}")
    if hf:
        if step is not None:
            raise ConfigError(f"{flag_prefix}step={step} names a run's checkpoint; "
                              f"{flag_prefix}hf={hf!r} has one model: leave the step out")
        return load_hf(hf, context_scale, dtype)
    return _load_workdir(workdir, step, context_scale, dtype)


def _load_workdir(workdir: str, step: int | None, context_scale: float,
                  dtype: str | None) -> InferenceSource:
    run = load_run(workdir, step, context_scale, dtype=dtype)
    vocab = run_vocabulary(run.config)
    if vocab is None:
        raise ConfigError(f"{workdir} trained on data.source="
                          f"{run.config.get('data', {}).get('source')!r}, which has no "
                          "tokenizer; generation and lm_eval need a run on the UL2 pipeline")
    check_vocabulary_fits_model(vocab, run.model_cfg)
    train = run.config["train"]
    return InferenceSource(workdir, run.step, run.model_cfg, run.model, vocab,
                           encoder_length=int(train["encoder_length"] * context_scale),
                           decoder_length=int(train["decoder_length"] * context_scale))


def load_hf(path: str, context_scale: float = 1.0, dtype: str | None = None) -> InferenceSource:
    """A Hugging Face T5Gemma 2 directory with its tokenizer (see the module docstring). The
    parameters keep config.json's dtype (float32 when it names none t5g2 has); the compute dtype
    is `dtype`, default that same one."""
    hf_config = checkpoint_files.read_config(path)  # a missing directory / config.json: one line
    stored = hf_config.get("dtype") or hf_config.get("torch_dtype")
    param_dtype = stored if stored in DTYPES else "float32"
    try:
        model_cfg, flat = hf_t5gemma2.load_pretrained(path, param_dtype=param_dtype,
                                                      dtype=dtype or param_dtype)
    except ConfigError as e:
        raise ConfigError(f"{path}/config.json: {e}") from e
    except (KeyError, TypeError, ValueError) as e:  # not a T5Gemma 2 config, a missing tensor
        raise CheckpointError(f"{path}: not a T5Gemma 2 checkpoint t5g2 reads "
                              f"({e.args[0] if e.args else e!r})") from e
    model_cfg = model_cfg.with_longer_context(context_scale)
    vocab = hf_vocabulary(path)
    try:
        check_vocabulary_fits_model(vocab, model_cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}/{TOKENIZER_MODEL} does not fit {path}/config.json: {e}") from e
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    graphdef, abstract = model_graphdef(model_cfg)
    try:
        params = place_params(flat, model_cfg, sharding.param_shardings(abstract, mesh))
    except ValueError as e:  # tensors that differ from config.json's model: names or shapes
        raise CheckpointError(f"{path}: {e}") from e
    lengths = [int(part.get("max_position_embeddings") or DEFAULT_MAX_POSITION_EMBEDDINGS)
               for part in (hf_config["encoder"].get("text_config", {}), hf_config["decoder"])]
    return InferenceSource(path, None, model_cfg, nnx.merge(graphdef, params), vocab,
                           encoder_length=int(lengths[0] * context_scale),
                           decoder_length=int(lengths[1] * context_scale))


def hf_vocabulary(path: str) -> Vocabulary:
    """`path`/tokenizer.model, with the sentinel and mode-token ids of `path`/
    t5g2_vocabulary.json when there is one (checked against what the model file gives);
    without it, no sentinels and no mode tokens."""
    model_file = os.path.join(path, TOKENIZER_MODEL)
    if not os.path.isfile(model_file):
        raise CheckpointError(f"{path}: no {TOKENIZER_MODEL} (t5g2 reads and writes text with "
                              "the directory's sentencepiece model): copy the model's "
                              f"{TOKENIZER_MODEL} there")
    note_file = os.path.join(path, VOCABULARY_NOTE)
    if not os.path.exists(note_file):
        return Vocabulary.from_file(model_file, num_sentinels=0, mode_tokens=())
    try:
        with open(note_file, encoding="utf-8") as f:
            note = json.load(f)
        sentinels, modes = list(note["sentinel_ids"]), dict(note["mode_ids"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{note_file}: unreadable vocabulary note ({e!r})") from e
    vocab = Vocabulary.from_file(model_file, num_sentinels=len(sentinels), mode_tokens=modes)
    derived = dict(sentencepiece_size=vocab.sp_size, extra_ids=vocab.extra_ids, size=vocab.size,
                   pad_id=vocab.pad_id, eos_id=vocab.eos_id, bos_id=vocab.bos_id,
                   unk_id=vocab.unk_id, sentinel_ids=[int(i) for i in vocab.sentinel_ids],
                   mode_ids={t: vocab.mode_id(t) for t in vocab.mode_tokens})
    for name, value in derived.items():
        if name in note and note[name] != value:
            raise CheckpointError(f"{note_file}: {name}={note[name]!r} but {model_file} gives "
                                  f"{value!r}: the note belongs to another tokenizer")
    return vocab
