"""The T5Gemma 2 encoder-decoder: Gemma 3 blocks on both sides, merged attention in the decoder.

Layers are stacked by attention-pattern period (5 local + 1 global for the released sizes): the
periods share one structure, so their parameters carry a leading `layers` axis and run under one
`lax.scan`, keeping compile time flat in depth; layers past the last whole period form a short
unscanned tail (e.g. 26 = 4 x 6 + 2).
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from t5g2.model.attention import (KV_CACHE_AXES, Attention, Kernel, KVCache, MaskSpec,
                                  decoder_window, encoder_window)
from t5g2.model.config import ModelConfig, StackConfig
from t5g2.model.layer_stack import RESIDUAL, LayerStack
from t5g2.model.layers import MLP, Embedder, RMSNorm, default_init, param, project
from t5g2.model.rope import rope_tables
from t5g2.model.vision import VisionEncoder
from t5g2.sharding import constrain

Rope = tuple[jax.Array, jax.Array]


@struct.dataclass
class StackInputs:
    """What every layer of one stack reads besides its residual stream: RoPE tables and masks."""

    rope_local: Rope
    rope_global: Rope
    mask_local: MaskSpec
    mask_global: MaskSpec
    encoded: jax.Array | None = None  # decoder only: the encoder's final output
    cross_mask: MaskSpec | None = None

    @classmethod
    def build(cls, cfg: StackConfig, positions, segment_ids, *, causal: bool,
              window: tuple[int, int], **cross) -> "StackInputs":
        def mask(w):
            return MaskSpec(positions, segment_ids, positions, segment_ids, causal=causal, window=w,
                            contiguous=True)

        return cls(
            rope_local=rope_tables(positions, cfg.head_dim, cfg.local_rope_theta,
                                   cfg.local_rope_scale),
            rope_global=rope_tables(positions, cfg.head_dim, cfg.global_rope_theta,
                                    cfg.global_rope_scale),
            mask_local=mask(window), mask_global=mask(None), **cross)

    def for_layer(self, is_global: bool) -> tuple[Rope, MaskSpec]:
        if is_global:
            return self.rope_global, self.mask_global
        return self.rope_local, self.mask_local


class Block(nnx.Module):
    """Gemma 3 sandwich block: x + post_norm(attn(pre_norm(x))), then the same around the MLP."""

    def __init__(self, cfg: StackConfig, is_global: bool, *, kernel: Kernel, param_dtype,
                 rngs: nnx.Rngs):
        self.is_global = is_global
        norm = functools.partial(RMSNorm, cfg.d_model, cfg.rms_norm_eps, "embed",
                                 param_dtype=param_dtype, rngs=rngs)
        self.pre_attn_norm, self.post_attn_norm = norm(), norm()
        self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                              cfg.attention_scale, cfg.rms_norm_eps, kernel=kernel,
                              param_dtype=param_dtype, rngs=rngs)
        self.pre_mlp_norm, self.post_mlp_norm = norm(), norm()
        self.mlp = MLP(cfg.d_model, cfg.ffn_dim, param_dtype=param_dtype, rngs=rngs)

    def mlp_block(self, x: jax.Array) -> jax.Array:
        return x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))


class EncoderLayer(Block):
    """Bidirectional self-attention (two-sided window on local layers), then the MLP."""

    def __call__(self, x: jax.Array, ctx: StackInputs) -> jax.Array:
        rope, mask = ctx.for_layer(self.is_global)
        x = x + self.post_attn_norm(self.attn.self_attention(self.pre_attn_norm(x), rope, mask))
        return self.mlp_block(x)


class DecoderLayer(Block):
    """Merged self+cross attention (or causal self-attention and a separate cross block)."""

    def __init__(self, cfg: StackConfig, is_global: bool, *, merged: bool, has_cross: bool,
                 encoder_dim: int, kernel: Kernel, param_dtype, rngs: nnx.Rngs):
        super().__init__(cfg, is_global, kernel=kernel, param_dtype=param_dtype,
                         rngs=rngs)
        self.merged = merged
        self.has_cross = has_cross
        if has_cross:
            norm = functools.partial(RMSNorm, cfg.d_model, cfg.rms_norm_eps, "embed",
                                     param_dtype=param_dtype, rngs=rngs)
            self.pre_cross_norm, self.post_cross_norm = norm(), norm()
            self.cross_attn = Attention(cfg.d_model, cfg.num_heads, cfg.num_kv_heads,
                                        cfg.head_dim, cfg.attention_scale, cfg.rms_norm_eps,
                                        kv_dim=encoder_dim, kernel=kernel,
                                        param_dtype=param_dtype, rngs=rngs)

    def __call__(self, y: jax.Array, ctx: StackInputs) -> jax.Array:
        return self.forward(y, ctx)[0]

    def forward(self, y: jax.Array, ctx: StackInputs,
                cache: "DecoderLayerCache | None" = None):
        """(outputs, updated cache): the one pass that training (no cache: keys of y only, cross
        keys projected from ctx.encoded) and cached generation (past keys from the cache, cross
        keys computed once per request) share."""
        rope, mask = ctx.for_layer(self.is_global)
        self_cache = None if cache is None else cache.self_kv
        cross = self._cross_part(self.attn, ctx, cache) if self.merged else None
        h, self_cache = self.attn.attend(self.pre_attn_norm(y), rope, mask, cross, self_cache)
        y = y + self.post_attn_norm(h)
        if self.has_cross:
            cross = self._cross_part(self.cross_attn, ctx, cache)
            h, _ = self.cross_attn.attend(self.pre_cross_norm(y), None, None, cross)
            y = y + self.post_cross_norm(h)
        cache = None if cache is None else cache.replace(self_kv=self_cache)
        return self.mlp_block(y), cache

    @staticmethod
    def _cross_part(attn: Attention, ctx: StackInputs, cache: "DecoderLayerCache | None"):
        if cache is None:
            return attn.cross_part(ctx.encoded, ctx.cross_mask)
        return cache.cross_k, cache.cross_v, ctx.cross_mask

    def new_cache(self, cfg: StackConfig, encoded: jax.Array, max_length: int,
                  dtype) -> "DecoderLayerCache":
        """An empty self cache (a ring of the window on local layers, `max_length` positions on
        global ones) and this layer's projection of the encoder outputs, if it reads them."""
        batch = encoded.shape[0]
        ring = not self.is_global and cfg.sliding_window < max_length
        length = cfg.sliding_window if ring else max_length
        self_kv = KVCache.empty(batch, length, cfg.num_kv_heads, cfg.head_dim, dtype, ring)
        self_kv = self_kv.replace(k=constrain(self_kv.k, KV_CACHE_AXES),
                                  v=constrain(self_kv.v, KV_CACHE_AXES))
        cross_k = cross_v = None
        if self.merged or self.has_cross:
            attn = self.attn if self.merged else self.cross_attn
            cross_k, cross_v = attn.keys_values(encoded, None)
            cross_k, cross_v = constrain(cross_k, KV_CACHE_AXES), constrain(cross_v, KV_CACHE_AXES)
        return DecoderLayerCache(self_kv, cross_k, cross_v)


@struct.dataclass
class DecoderLayerCache:
    """What one decoder layer keeps between generation steps."""

    self_kv: KVCache
    cross_k: jax.Array | None = None  # [batch, encoder_length, kv_heads, head_dim], fixed
    cross_v: jax.Array | None = None


def _default_ids(tokens, segment_ids, positions):
    """Without segment ids every token is valid (as the reference without an attention mask);
    pass segment ids (0 = padding) to mask padding or to pack several examples per row."""
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return segment_ids, positions


def insert_image_features(x: jax.Array, tokens: jax.Array, features: jax.Array,
                          image_token_id: int) -> jax.Array:
    """Puts image tokens, unscaled, at the placeholders: features [B, M, T, D] hold row b's
    images in order, and row b's k-th placeholder takes token k % T of its image k // T (the
    reference's masked scatter, with each row's images listed in that row)."""
    is_image = tokens == image_token_id
    b, m, t, d = features.shape
    if not isinstance(is_image, jax.core.Tracer):
        counts = np.asarray(is_image.sum(axis=1))
        bad = [(row, int(n)) for row, n in enumerate(counts) if n % t or n > m * t]
        if bad:
            row, n = bad[0]
            raise ValueError(f"row {row} has {n} image placeholder tokens: expected a multiple "
                             f"of {t} tokens per image, for at most {m} images")
    index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, m * t - 1)
    flat = features.reshape(b, m * t, d).astype(x.dtype)
    gathered = jnp.take_along_axis(flat, index[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered, x)


class Encoder(nnx.Module):
    """Bidirectional Gemma 3 stack over (text and, later, image) embeddings."""

    def __init__(self, cfg: StackConfig, *, remat: str, scan: bool, kernel: Kernel,
                 param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg

        def make_layer(i, r):
            return EncoderLayer(cfg, cfg.is_global(i), kernel=kernel,
                                param_dtype=param_dtype, rngs=r)

        self.layers = LayerStack(cfg.num_layers, cfg.sliding_window_pattern, make_layer,
                                 remat=remat, scan=scan, rngs=rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, "embed",
                                  param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, segment_ids, positions) -> jax.Array:
        ctx = StackInputs.build(self.cfg, positions, segment_ids, causal=False,
                                window=encoder_window(self.cfg.sliding_window))
        return self.final_norm(self.layers(x, ctx))


class Decoder(nnx.Module):
    """Causal Gemma 3 stack whose attention also reads the encoder outputs."""

    def __init__(self, cfg: ModelConfig, *, param_dtype, rngs: nnx.Rngs):
        dec = self.cfg = cfg.decoder
        has_cross = cfg.decoder_has_cross

        def make_layer(i, r):
            return DecoderLayer(dec, dec.is_global(i), merged=cfg.cross_attention == "merged",
                                has_cross=has_cross[i], encoder_dim=cfg.encoder.d_model,
                                kernel=cfg.attention_kernel, param_dtype=param_dtype,
                                rngs=r)

        self.layers = LayerStack(dec.num_layers, dec.sliding_window_pattern, make_layer,
                                 remat=cfg.remat, scan=cfg.scan_layers, rngs=rngs)
        self.final_norm = RMSNorm(dec.d_model, dec.rms_norm_eps, "embed",
                                  param_dtype=param_dtype, rngs=rngs)

    def __call__(self, y, segment_ids, positions, encoded, encoder_segment_ids,
                 encoder_positions) -> jax.Array:
        ctx = self._inputs(segment_ids, positions, encoder_segment_ids, encoder_positions,
                           encoded)
        return self.final_norm(self.layers(y, ctx))

    def _inputs(self, segment_ids, positions, encoder_segment_ids, encoder_positions,
                encoded=None) -> StackInputs:
        cross_mask = MaskSpec(positions, segment_ids, encoder_positions, encoder_segment_ids)
        return StackInputs.build(self.cfg, positions, segment_ids, causal=True,
                                 window=decoder_window(self.cfg.sliding_window),
                                 encoded=encoded, cross_mask=cross_mask)

    def new_cache(self, encoded: jax.Array, max_length: int, dtype) -> dict:
        """Every layer's generation cache (`DecoderLayerCache`), laid out like the layers."""
        def init(layer, carry, _):
            return carry, layer.new_cache(self.cfg, encoded, max_length, dtype)

        return self.layers.map_layers(init, None)[1]

    def cached(self, y, segment_ids, positions, cache: dict, encoder_segment_ids,
               encoder_positions) -> tuple[jax.Array, dict]:
        """`__call__` for new tokens after those in `cache`: (final hidden states, new cache)."""
        ctx = self._inputs(segment_ids, positions, encoder_segment_ids, encoder_positions)

        def step(layer, y, layer_cache):
            y, layer_cache = layer.forward(y, ctx, layer_cache)
            return constrain(y, RESIDUAL), layer_cache

        y, cache = self.layers.map_layers(step, y, cache)
        return self.final_norm(y), cache


class T5Gemma2(nnx.Module):
    """Encoder-decoder with tied (one table) or untied (three tables) embeddings."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed = Embedder(cfg.vocab_size, cfg.encoder.d_model, cfg.eoi_token_id,
                              param_dtype=pdt, rngs=rngs)
        if not cfg.tie_embeddings:
            self.decoder_embed = Embedder(cfg.vocab_size, cfg.decoder.d_model, cfg.eoi_token_id,
                                          param_dtype=pdt, rngs=rngs)
            self.lm_head = param(rngs, default_init, (cfg.vocab_size, cfg.decoder.d_model),
                                 ("vocab", "embed"), pdt)
        self.encoder = Encoder(cfg.encoder, remat=cfg.remat, scan=cfg.scan_layers,
                               kernel=cfg.attention_kernel, param_dtype=pdt, rngs=rngs)
        self.decoder = Decoder(cfg, param_dtype=pdt, rngs=rngs)
        self.vision = nnx.data(None if cfg.vision is None else VisionEncoder(
            cfg.vision, cfg.encoder.d_model, remat=cfg.remat, scan=cfg.scan_layers,
            kernel=cfg.attention_kernel, param_dtype=pdt, rngs=rngs))

    @property
    def dtype(self):
        return jnp.dtype(self.config.dtype)

    def encode(self, tokens, segment_ids=None, positions=None, images=None) -> jax.Array:
        """Encoder outputs [B,S,D] (final-normed).

        images [B, M, H, W, C] (preprocessed to [-1, 1]; trailing slots of rows with fewer than
        M images are unused) go through the vision tower and projector; their tokens replace
        the image placeholders and are then ordinary, fully visible encoder positions.
        """
        segment_ids, positions = _default_ids(tokens, segment_ids, positions)
        x = constrain(self.embed(tokens, self.dtype), RESIDUAL)
        if images is not None:
            if self.vision is None:
                raise ValueError("images given to a text-only model (model.vision is None)")
            x = insert_image_features(x, tokens, self.vision(images, self.dtype),
                                      self.config.image_token_id)
        return self.encoder(x, segment_ids, positions)

    def decode(self, tokens, encoded, encoder_segment_ids, encoder_positions=None,
               segment_ids=None, positions=None) -> jax.Array:
        """Decoder final hidden states [B,T,D]; `logits` maps them to the vocabulary."""
        segment_ids, positions = _default_ids(tokens, segment_ids, positions)
        if encoder_positions is None:
            encoder_positions = jnp.zeros_like(encoder_segment_ids)
        return self.decoder(self._decoder_embed(tokens), segment_ids, positions, encoded,
                            encoder_segment_ids, encoder_positions)

    def _decoder_embed(self, tokens) -> jax.Array:
        embed = self.embed if self.config.tie_embeddings else self.decoder_embed
        return constrain(embed(tokens, self.dtype), RESIDUAL)

    def new_decode_cache(self, encoded: jax.Array, max_length: int) -> dict:
        """An empty decoder cache for up to `max_length` decoder positions, holding every
        layer's projection of `encoded` (computed here, once per request)."""
        return self.decoder.new_cache(encoded, max_length, self.dtype)

    def decode_cached(self, tokens, cache: dict, encoder_segment_ids, segment_ids, positions,
                      encoder_positions=None) -> tuple[jax.Array, dict]:
        """`decode` of new tokens [B,T] (segment ids 0: padding, nothing cached) after those in
        `cache`, at their absolute positions: (hidden states [B,T,D], updated cache)."""
        if encoder_positions is None:
            encoder_positions = jnp.zeros_like(encoder_segment_ids)
        return self.decoder.cached(self._decoder_embed(tokens), segment_ids, positions, cache,
                                   encoder_segment_ids, encoder_positions)

    def logits(self, hidden: jax.Array) -> jax.Array:
        table = self.embed.table if self.config.tie_embeddings else self.lm_head
        logits = project(hidden, table[...], transpose_w=True)
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        return constrain(logits, ("batch", "length", "act_vocab"))

    def hidden_states(self, encoder_input_tokens, decoder_input_tokens, *,
                      encoder_segment_ids=None, encoder_positions=None,
                      decoder_segment_ids=None, decoder_positions=None,
                      encoder_images=None) -> jax.Array:
        """Decoder final hidden states [B,T,D] for the decoder inputs given the encoder inputs
        (and their images, see `encode`)."""
        encoder_segment_ids, encoder_positions = _default_ids(
            encoder_input_tokens, encoder_segment_ids, encoder_positions)
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                              encoder_images)
        return self.decode(decoder_input_tokens, encoded, encoder_segment_ids, encoder_positions,
                           decoder_segment_ids, decoder_positions)

    def __call__(self, encoder_input_tokens, decoder_input_tokens, **ids) -> jax.Array:
        """Logits [B,T,V]; `ids`: encoder/decoder segment ids and positions, encoder images (see
        hidden_states)."""
        return self.logits(self.hidden_states(encoder_input_tokens, decoder_input_tokens, **ids))
