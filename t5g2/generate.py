"""Generation: encode once, then decode token by token from per-layer caches in one compiled loop.

The encoder runs once per request. Every decoder layer keeps its own keys/values (after k-norm
and RoPE; a ring buffer of the window on sliding layers, every position on global ones) and its
projection of the encoder outputs (computed once, never windowed). A decoder prompt (or the
decoder start token, bos, alone) is prefilled in one pass; then one `lax.while_loop` picks a
token (greedy, or temperature / top-k / top-p sampling with an explicit PRNG key) and runs one
cached decoder step per iteration, until `max_new_tokens` or every row has emitted EOS (a
finished row emits pad).

Rows are padded on the left or the right, as a batch comes: encoder segment ids 0 mark padding
(by default, tokens equal to pad_id), pad_id marks a decoder prompt's; every row's tokens take
positions 0, 1, ... wherever its padding is, so a row decodes as it would alone.

Images (a model with a vision tower) go with the encoder input: they pass through the tower and
projector once per request, inside the encoder, and fill the input's image placeholders.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from t5g2 import sharding
from t5g2.configlib import ConfigError
from t5g2.model import T5Gemma2


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a token is picked from the logits: temperature 0 is greedy (argmax); otherwise a
    sample from softmax(logits / temperature), restricted to the top_k most likely tokens
    (0: all) and to the nucleus, the smallest set of most likely tokens whose probability
    reaches top_p (1.0: all)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"sampling.temperature={self.temperature!r} must be >= 0 "
                              "(0: greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"sampling.top_k={self.top_k!r} must be an integer >= 0 (0: off)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p={self.top_p!r} must be in (0, 1] (1: off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


@struct.dataclass
class Generated:
    """tokens [B, max_new_tokens] (EOS included, pad after it); lengths [B]: tokens emitted up
    to and including EOS; logits [B, max_new_tokens, V] (float32, before temperature and
    filtering) each token was picked from, when asked for."""

    tokens: np.ndarray
    lengths: np.ndarray
    logits: np.ndarray | None = None


def filtered_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """logits / temperature with the tokens outside top-k and the top-p nucleus at -inf."""
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        ordered = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        count = jnp.sum(before < sampling.top_p, axis=-1, keepdims=True)  # >= 1
        threshold = jnp.take_along_axis(ordered, count - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def pick(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """One token per row of logits [B, V]."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits, sampling)).astype(jnp.int32)


def generate(model: T5Gemma2, encoder_tokens, *, max_new_tokens: int, encoder_segment_ids=None,
             decoder_prompt=None, sampling: Sampling = GREEDY, key: jax.Array | None = None,
             eos_id: int | None = None, max_positions: int | None = None,
             return_logits: bool = False, encoder_images=None) -> Generated:
    """Continues each encoder input [B, S] (padded left or right) with up to `max_new_tokens`
    tokens.

    decoder_prompt [B, P]: a prefix per row (starting with bos, as training's decoder inputs
    do), padded with pad_id on the left or the right; None starts every row from bos alone.
    `key` is required to sample. `eos_id` defaults to the model's. `max_positions`: the longest
    encoder input and decoder sequence (prompt + new tokens) allowed, e.g. the context the model
    serves. `encoder_images` [B, M, H, W, 3]: each row's images, preprocessed to [-1, 1]
    (t5g2.data.images.preprocess), in the order of its placeholder blocks; a row with fewer
    than M images leaves its last slots unused (zeros).
    """
    cfg = model.config
    enc = np.asarray(encoder_tokens)
    if enc.ndim != 2 or enc.shape[0] == 0 or enc.shape[1] == 0:
        raise ConfigError(f"encoder_tokens of shape {enc.shape}: give a non-empty [batch, length] "
                          "array of token ids")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    enc_seg = (enc != cfg.pad_id) if encoder_segment_ids is None else encoder_segment_ids
    enc_seg = np.asarray(enc_seg).astype(np.int32)
    if decoder_prompt is None:
        decoder_prompt = np.full((enc.shape[0], 1), cfg.bos_id)
    prompt = np.asarray(decoder_prompt)
    if prompt.ndim != 2 or prompt.shape[0] != enc.shape[0]:
        raise ConfigError(f"decoder_prompt of shape {prompt.shape} does not match the "
                          f"{enc.shape[0]} encoder inputs: give [batch, prefix_length]")
    prompt_seg = (prompt != cfg.pad_id).astype(np.int32)
    for name, seg in (("encoder input", enc_seg != 0), ("decoder prompt", prompt_seg)):
        runs = seg[:, 0] + np.sum(np.diff(seg.astype(np.int32), axis=1) > 0, axis=1)
        for row in np.flatnonzero(runs != 1)[:1]:
            raise ConfigError(f"{name} row {int(row)} " + (
                "is empty (all padding)" if runs[row] == 0 else
                "has padding between its tokens: pad a row on the left or on the right only"))
    images = None if encoder_images is None else check_images(model, enc, encoder_images)
    total = prompt.shape[1] + int(max_new_tokens)
    if max_positions is not None:
        for name, value in (("encoder input length", enc.shape[1]),
                            ("decoder prompt length + max_new_tokens", total)):
            if value > max_positions:
                raise ConfigError(f"{name}={value} exceeds max_positions={max_positions}: "
                                  "shorten the input or raise the limit")
    if not sampling.greedy and key is None:
        raise ConfigError(f"sampling with temperature={sampling.temperature} needs a PRNG key "
                          "(key=jax.random.key(seed))")
    key = jax.random.key(0) if key is None else key
    rows = enc.shape[0]
    active = sharding.active_mesh()
    if active is not None:  # a batch the mesh's batch axes divide: copies of row 0 fill it
        fill = -rows % sharding.batch_divisor(*active)
        enc, enc_seg, prompt, prompt_seg = (np.concatenate([x, np.repeat(x[:1], fill, 0)])
                                            for x in (enc, enc_seg, prompt, prompt_seg))
        if images is not None:
            images = np.concatenate([images, np.repeat(images[:1], fill, 0)])
    graphdef, state = nnx.split(model)
    tokens, logits = _generate(
        graphdef, state, jnp.asarray(enc, jnp.int32), jnp.asarray(enc_seg),
        None if images is None else jnp.asarray(images),
        jnp.asarray(prompt, jnp.int32), jnp.asarray(prompt_seg), key,
        jnp.int32(cfg.eos_id if eos_id is None else eos_id), max_new_tokens=int(max_new_tokens),
        sampling=sampling, return_logits=return_logits, mesh_rules=active)
    tokens = np.asarray(tokens)[:rows]
    logits = None if logits is None else logits[:rows]
    is_eos = tokens == (cfg.eos_id if eos_id is None else eos_id)
    lengths = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, tokens.shape[1])
    return Generated(tokens, lengths, None if logits is None else np.asarray(logits))


def check_images(model: T5Gemma2, enc: np.ndarray, images) -> np.ndarray:
    """`images` as float32 [B, M, size, size, C] after checking them against the model's tower
    and each encoder row's image placeholders (a whole number of images, at most M)."""
    vision = model.config.vision
    if vision is None:
        raise ConfigError("encoder_images given to a model without a vision tower "
                          "(model.vision is None): generate from text alone, or load a "
                          "multimodal model")
    images = np.asarray(images, np.float32)
    size, channels = vision.image_size, vision.num_channels
    if images.ndim != 5 or images.shape[0] != enc.shape[0] \
            or images.shape[2:] != (size, size, channels):
        raise ConfigError(f"encoder_images of shape {images.shape}: give [{enc.shape[0]} rows, "
                          f"images per row, {size}, {size}, {channels}] (preprocessed, NHWC)")
    per_image = vision.tokens_per_image
    placeholders = np.sum(enc == model.config.image_token_id, axis=1)
    for row, count in enumerate(placeholders):
        if count % per_image or count > images.shape[1] * per_image:
            raise ConfigError(
                f"encoder input row {row} has {int(count)} image placeholder tokens: expected "
                f"{per_image} per image, for at most {images.shape[1]} images per row "
                "(t5g2.data.images.encode_with_images lays them out)")
    return images


# mesh_rules: the active `use_mesh` context, a key of the compile cache only (the traced
# sharding constraints depend on it).
@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling",
                                             "return_logits", "mesh_rules"))
def _generate(graphdef, state, enc, enc_seg, images, prompt, prompt_seg, key, eos_id, *,
              max_new_tokens, sampling, return_logits, mesh_rules):
    del mesh_rules
    model = nnx.merge(graphdef, state)
    pad_id = model.config.pad_id
    batch = enc.shape[0]
    enc_pos = _positions(enc_seg)
    encoded = model.encode(enc, enc_seg, enc_pos, images)  # the vision tower runs here, once
    cache = model.new_decode_cache(encoded, prompt.shape[1] + max_new_tokens)

    def logits_at(hidden, index):  # [B, T, D], [B] -> float32 [B, V]
        last = jnp.take_along_axis(hidden, index[:, None, None], axis=1)
        return model.logits(last)[:, 0].astype(jnp.float32)

    hidden, cache = model.decode_cached(prompt, cache, enc_seg, prompt_seg,
                                        _positions(prompt_seg), enc_pos)
    prompt_len = prompt_seg.sum(axis=1).astype(jnp.int32)
    last = prompt.shape[1] - 1 - jnp.argmax(prompt_seg[:, ::-1], axis=1)  # a row's last token
    logits = logits_at(hidden, last.astype(jnp.int32))
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    seen = jnp.zeros((batch, max_new_tokens, logits.shape[-1]) if return_logits else (0,),
                     jnp.float32)
    done = jnp.zeros((batch,), bool)

    def running(carry):
        i, _, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def step(carry):
        i, logits, cache, key, done, tokens, seen = carry
        key, sub = jax.random.split(key)
        token = jnp.where(done, pad_id, pick(logits, sub, sampling))
        tokens = tokens.at[:, i].set(token)
        if return_logits:
            seen = seen.at[:, i].set(logits)
        done = done | (token == eos_id)
        ones = jnp.ones((batch, 1), jnp.int32)
        hidden, cache = model.decode_cached(token[:, None], cache, enc_seg, ones,
                                            (prompt_len + i)[:, None], enc_pos)
        return i + 1, logits_at(hidden, jnp.zeros((batch,), jnp.int32)), cache, key, done, \
            tokens, seen

    carry = (jnp.int32(0), logits, cache, key, done, tokens, seen)
    _, _, _, _, _, tokens, seen = jax.lax.while_loop(running, step, carry)
    return tokens, (seen if return_logits else None)


def _positions(segment_ids: jax.Array) -> jax.Array:
    """0, 1, ... over each row's tokens (segment != 0), wherever its padding is."""
    return jnp.maximum(jnp.cumsum(segment_ids != 0, axis=1, dtype=jnp.int32) - 1, 0)
