"""The lm-evaluation-harness model "t5g2": EleutherAI's `lm_eval` scores a training run or a
Hugging Face T5Gemma 2 directory (t5g2/inference_source.py).

    python -m launch.lm_eval run --model t5g2 --model_args workdir=workdir/tiny,dtype=float32 \
        --tasks <task> [--include_path <dir of task yamls>]
    python -m launch.lm_eval run --model t5g2 --model_args hf=<dir> --tasks <task>
    lm_eval.simple_evaluate(model=T5G2LM(workdir="workdir/tiny"), tasks=[...])   # in Python

An encoder-decoder reads a request the T5 way, as the run's S denoiser trained it (prefix LM):
- `loglikelihood(context, continuation)`: encoder input = [mode token] + context + EOS, decoder
  input = BOS + continuation[:-1]; the sum of log p(continuation token) and whether every one is
  the argmax. A context longer than the encoder length keeps its last tokens.
- `loglikelihood_rolling(text)`: the text's tokens in windows of the decoder length, each scored
  by the decoder with the previous window's tokens as encoder context (the first window: an
  empty context), summed.
- `generate_until(context, gen_kwargs)`: encoder input as for loglikelihood, the decoder
  starts from BOS alone, and t5g2.generate continues it (greedy, or sampled when `do_sample`:
  `temperature`, `top_k` (default 0: all), `top_p`, from the model argument `seed`) until EOS or
  `max_gen_toks` tokens (default the model argument, 256, as lm_eval's Hugging Face model;
  capped at the decoder length less BOS); the text is cut at the first of the `until` strings.
  Any other generation argument is an error, not silently ignored. Requests with the same
  arguments share batches.
Requests go in batches of `batch_size` rows, padded to a few bucketed lengths so that one
compiled program serves them all. Importing this module registers the model with lm_eval.
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
from lm_eval.defaults import DEFAULT_MAX_GEN_TOKS
from lm_eval.models.utils import normalize_gen_kwargs

from t5g2.configlib import ConfigError
from t5g2.generate import GREEDY, Sampling, generate

log = logging.getLogger(__name__)

_MIN_BUCKET = 8
# The generation arguments t5g2 honours (after normalize_gen_kwargs: max_gen_toks's aliases
# max_new_tokens / max_tokens / max_completion_tokens are folded into it).
_GENERATION_KWARGS = frozenset(("until", "max_gen_toks", "do_sample", "temperature", "top_k",
                                "top_p"))


@register_model("t5g2")
class T5G2LM(LM):
    """A t5g2 run's checkpoint or a T5Gemma 2 directory as an lm_eval model (see the module
    docstring)."""

    def __init__(self, workdir: str | None = None, hf: str | None = None,
                 step: int | None = None, batch_size: int | str = 8, dtype: str | None = None,
                 mode_token: str | None = None, max_encoder_length: int | None = None,
                 max_decoder_length: int | None = None, context_scale: float = 1.0,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 0, **unused: Any):
        super().__init__()
        from t5g2.inference_source import open_source

        if unused:
            log.info("t5g2 ignores lm_eval arguments %s", sorted(unused))
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.default_max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        try:
            self.seed = int(seed)
        except (TypeError, ValueError):
            raise ConfigError(f"seed={seed!r}: must be an integer") from None
        source = open_source(workdir, hf, step=None if step is None else int(step),
                             context_scale=float(context_scale), dtype=dtype, flag_prefix="")
        self.vocab, self.cfg, self.max_positions = source.vocab, source.model_cfg, \
            source.max_positions
        self.max_encoder_length = _positive_int(max_encoder_length or source.encoder_length,
                                                "max_encoder_length")
        self.max_decoder_length = _positive_int(max_decoder_length or source.decoder_length,
                                                "max_decoder_length")
        self.head = source.mode_head(mode_token, "mode_token")
        self._source = source  # the model, its vocabulary and limits
        self._capped: set[int] = set()  # max_gen_toks values already warned about
        self._graphdef, self._state = nnx.split(source.model)
        log.info("t5g2 lm_eval model: %s%s, batch %d, lengths %d/%d", source.name,
                 "" if source.step is None else f" step {source.step}", self.batch_size,
                 self.max_encoder_length, self.max_decoder_length)

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

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        del disable_tqdm
        groups: dict[tuple, list[tuple[int, list[int], list[str]]]] = {}
        for index, (context, gen_kwargs) in enumerate(r.args for r in requests):
            sampling, max_new, until = self.generation_settings(gen_kwargs)
            groups.setdefault((sampling, max_new), []).append(
                (index, self.encoder_input(self.vocab.encode(context)), until))
        results: list[str | None] = [None] * len(requests)
        calls = 0  # the sampling key of each batch: the seed's, folded with its number
        for (sampling, max_new), items in groups.items():
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                key = jax.random.fold_in(jax.random.key(self.seed), calls)
                calls += 1
                texts = self.continuations([e for _, e, _ in chunk], max_new, sampling, key)
                for (index, _, until), text in zip(chunk, texts):
                    results[index] = cut_at_stop(text, until)
                    self.cache_hook.add_partial("generate_until", requests[index].args,
                                                results[index])
        return results

    def generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[Sampling, int, list[str]]:
        """(sampling, max new tokens, stop strings) of one request's generation arguments,
        read as lm_eval's Hugging Face model reads them (`normalize_gen_kwargs`)."""
        if not isinstance(gen_kwargs, dict):
            raise ConfigError(f"generation arguments {gen_kwargs!r}: expected a dict")
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.default_max_gen_toks))
        unknown = sorted(set(kwargs) - _GENERATION_KWARGS)
        if unknown:
            given = ", ".join(f"{k}={kwargs[k]!r}" for k in unknown)
            raise ConfigError(f"generation_kwargs {given}: t5g2 generates with "
                              f"{', '.join(sorted(_GENERATION_KWARGS))} only; remove the "
                              "others from the task's generation_kwargs")
        until = kwargs["until"]
        if not all(isinstance(u, str) for u in until):
            raise ConfigError(f"generation_kwargs until={until!r}: give a string or a list of "
                              "strings")
        max_new = kwargs["max_gen_toks"]
        room = self.max_decoder_length - 1  # the decoder start token takes position 0
        if max_new <= 0:
            raise ConfigError(f"generation_kwargs max_gen_toks={max_new}: must be a positive "
                              "integer")
        if room <= 0:
            raise ConfigError(f"max_decoder_length={self.max_decoder_length} leaves no room to "
                              "generate after the decoder start token")
        if max_new > room and max_new not in self._capped:
            self._capped.add(max_new)
            log.warning("max_gen_toks=%d capped at %d: the decoder length %d less its start "
                        "token (raise max_decoder_length or context_scale)", max_new, room,
                        self.max_decoder_length)
        max_new = min(max_new, room)
        temperature = float(kwargs.get("temperature", 0.0))
        if not kwargs["do_sample"]:
            return GREEDY, max_new, until
        if temperature <= 0:
            raise ConfigError(f"generation_kwargs do_sample=True with temperature={temperature}"
                              ": give a temperature > 0, or do_sample=False for greedy")
        try:
            top_k, top_p = int(kwargs.get("top_k", 0)), float(kwargs.get("top_p", 1.0))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"generation_kwargs top_k={kwargs.get('top_k')!r} / top_p="
                              f"{kwargs.get('top_p')!r}: give numbers ({e})") from None
        return Sampling(temperature, top_k, top_p), max_new, until

    # ---------------------------------------------------------------- scoring

    def encoder_input(self, context: Sequence[int]) -> list[int]:
        """[mode token] + the context's last tokens + EOS, at most max_encoder_length."""
        room = self.max_encoder_length - len(self.head) - 1
        if room < 0:
            raise ConfigError(f"max_encoder_length={self.max_encoder_length} leaves no room "
                              "for the mode token and EOS")
        kept = [int(t) for t in context][-room:] if room else []
        return self.head + kept + [self.vocab.eos_id]

    def continuations(self, encoder_rows: Sequence[list[int]], max_new_tokens: int,
                 sampling: Sampling, key: jax.Array) -> list[str]:
        """The decoded continuation of each encoder input (up to EOS), in one generate call of
        `batch_size` rows at a bucketed length (unused rows repeat the first)."""
        enc_len = _bucket(max(len(e) for e in encoder_rows), self.max_encoder_length)
        enc = np.full((self.batch_size, enc_len), self.cfg.pad_id, np.int32)
        for i in range(self.batch_size):
            row = encoder_rows[i] if i < len(encoder_rows) else encoder_rows[0]
            enc[i, :len(row)] = row
        out = generate(self._source.model, enc, max_new_tokens=max_new_tokens,
                       sampling=sampling, key=key, max_positions=self.max_positions)
        return [self._source.decode(out.tokens[i, :out.lengths[i]])
                for i in range(len(encoder_rows))]

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


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any of the (non-empty) stop strings."""
    cut = min((i for i in (text.find(u) for u in until if u) if i >= 0), default=len(text))
    return text[:cut]


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
