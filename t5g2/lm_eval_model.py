"""The lm-evaluation-harness model "t5g2": EleutherAI's `lm_eval` scores a training run.

    python -m launch.lm_eval run --model t5g2 --model_args workdir=workdir/tiny,dtype=float32 \
        --tasks <task> [--include_path <dir of task yamls>]
    lm_eval.simple_evaluate(model=T5G2LM(workdir="workdir/tiny"), tasks=[...])   # in Python

An encoder-decoder reads a request the T5 way, as the run's S denoiser trained it (prefix LM):
- `loglikelihood(context, continuation)`: encoder input = [mode token] + context + EOS, decoder
  input = BOS + continuation[:-1]; the sum of log p(continuation token) and whether every one is
  the argmax. A context longer than the encoder length keeps its last tokens.
- `loglikelihood_rolling(text)`: the text's tokens in windows of the decoder length, each scored
  by the decoder with the previous window's tokens as encoder context (the first window: an
  empty context), summed.
- `generate_until`: not yet (it needs cached generation).
Requests go in batches of `batch_size` rows, padded to a few bucketed lengths so that one
compiled scorer serves them all. Importing this module registers the model with lm_eval.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from t5g2.configlib import ConfigError
from t5g2.model.config import DTYPES

log = logging.getLogger(__name__)

_MIN_BUCKET = 8


@register_model("t5g2")
class T5G2LM(LM):
    """A t5g2 run's checkpoint as an lm_eval model (see the module docstring)."""

    def __init__(self, workdir: str, step: int | None = None, batch_size: int | str = 8,
                 dtype: str | None = None, mode_token: str | None = "[S]",
                 max_encoder_length: int | None = None, max_decoder_length: int | None = None,
                 context_scale: float = 1.0, **unused: Any):
        super().__init__()
        from t5g2.train.export import load_run, run_vocabulary

        if unused:
            log.info("t5g2 ignores lm_eval arguments %s", sorted(unused))
        if dtype is not None and dtype not in DTYPES:
            raise ConfigError(f"dtype={dtype!r}: valid are {', '.join(DTYPES)}")
        self.batch_size = _positive_int(batch_size, "batch_size")
        run = load_run(workdir, None if step is None else int(step), float(context_scale),
                       dtype=dtype)
        self.vocab = run_vocabulary(run.config)
        if self.vocab is None:
            raise ConfigError(f"{workdir} was trained on data.source="
                              f"{run.config.get('data', {}).get('source')!r}, which has no "
                              "tokenizer; lm_eval needs a run on the UL2 pipeline")
        self.cfg = run.model_cfg
        train = run.config["train"]
        self.max_encoder_length = _positive_int(max_encoder_length or train["encoder_length"],
                                                "max_encoder_length")
        self.max_decoder_length = _positive_int(max_decoder_length or train["decoder_length"],
                                                "max_decoder_length")
        self.head = []
        if mode_token:
            if mode_token not in self.vocab.mode_tokens:
                raise ConfigError(f"mode_token={mode_token!r} is not one of the run's mode "
                                  f"tokens {list(self.vocab.mode_tokens)}; or pass mode_token=")
            self.head = [self.vocab.mode_id(mode_token)]
        self._graphdef, self._state = nnx.split(run.model)
        log.info("t5g2 lm_eval model: %s step %d, batch %d, lengths %d/%d", workdir, run.step,
                 self.batch_size, self.max_encoder_length, self.max_decoder_length)

    # ---------------------------------------------------------------- lm_eval's three requests

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for context, continuation in (r.args for r in requests):
            target = [int(t) for t in self.vocab.encode(continuation)]
            if len(target) > self.max_decoder_length:
                raise ConfigError(f"a continuation of {len(target)} tokens is longer than "
                                  f"max_decoder_length={self.max_decoder_length}: "
                                  f"{continuation[:60]!r}...")
            pairs.append((self.encoder_input(self.vocab.encode(context)), target))
        return self.score(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        results = []
        for (text,) in (r.args for r in requests):
            tokens = [int(t) for t in self.vocab.encode(text)]
            n = self.max_decoder_length
            windows = [(self.encoder_input(tokens[max(0, i - n):i]), tokens[i:i + n])
                       for i in range(0, len(tokens), n)]
            results.append(sum(logp for logp, _ in self.score(windows)) if windows else 0.0)
        return results

    def generate_until(self, requests) -> list[str]:
        raise NotImplementedError("t5g2's lm_eval model does not generate yet: loglikelihood "
                                  "and loglikelihood_rolling tasks only")

    # ---------------------------------------------------------------- scoring

    def encoder_input(self, context: Sequence[int]) -> list[int]:
        """[mode token] + the context's last tokens + EOS, at most max_encoder_length."""
        room = self.max_encoder_length - len(self.head) - 1
        if room < 0:
            raise ConfigError(f"max_encoder_length={self.max_encoder_length} leaves no room "
                              "for the mode token and EOS")
        kept = [int(t) for t in context][-room:] if room else []
        return self.head + kept + [self.vocab.eos_id]

    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(target), every target token the argmax) for (encoder ids, target ids)
        pairs, in batches."""
        out: list[tuple[float, bool]] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            enc_len = _bucket(max(len(e) for e, _ in chunk), self.max_encoder_length)
            dec_len = _bucket(max(max(len(t), 1) for _, t in chunk), self.max_decoder_length)
            arrays = _batch(chunk, self.batch_size, enc_len, dec_len, self.cfg.bos_id,
                            self.cfg.pad_id)
            logp, greedy = _score(self._graphdef, self._state, *arrays)
            out += [(float(lp), bool(g)) for lp, g in zip(np.asarray(logp)[:len(chunk)],
                                                          np.asarray(greedy)[:len(chunk)])]
        return out


@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, state, enc, enc_seg, dec_in, dec_seg, targets, weights):
    model = nnx.merge(graphdef, state)
    logits = model(enc, dec_in, encoder_segment_ids=enc_seg,
                   decoder_segment_ids=dec_seg).astype(jnp.float32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None],
                               axis=-1)[..., 0]
    hit = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
    return (logp * weights).sum(-1), hit.all(-1)


def _batch(chunk, rows: int, enc_len: int, dec_len: int, bos_id: int, pad_id: int):
    """Right-padded int32 arrays for `rows` rows (unused rows: one padding-free dummy token)."""
    enc = np.full((rows, enc_len), pad_id, np.int32)
    dec_in = np.full((rows, dec_len), pad_id, np.int32)
    targets = np.full((rows, dec_len), pad_id, np.int32)
    enc_seg = np.zeros((rows, enc_len), np.int32)
    dec_seg = np.zeros((rows, dec_len), np.int32)
    enc_seg[:, 0] = dec_seg[:, 0] = 1  # every row has a token: no all-masked softmax
    dec_in[:, 0] = bos_id
    for i, (e, t) in enumerate(chunk):
        enc[i, :len(e)], enc_seg[i, :len(e)] = e, 1
        dec_in[i, 1:len(t)] = t[:-1]
        targets[i, :len(t)] = t
        dec_seg[i, :max(len(t), 1)] = 1
    weights = (targets != pad_id) & (np.arange(dec_len) < np.array(
        [len(t) for _, t in chunk] + [0] * (rows - len(chunk)))[:, None])
    return enc, enc_seg, dec_in, dec_seg, targets, weights.astype(np.float32)


def _bucket(n: int, limit: int) -> int:
    """The smallest power of two >= n (at least _MIN_BUCKET), capped at `limit`."""
    return min(limit, max(_MIN_BUCKET, 1 << max(0, n - 1).bit_length()))


def _positive_int(value, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number <= 0:
        raise ConfigError(f"{name}={value!r}: must be a positive integer")
    return number
