"""Typed, validated model configuration.

Configs live as ml_collections data in `configs/`; `ModelConfig.from_config_dict` checks that data
once, at start, and turns it into frozen (hashable) dataclasses the model reads. Every error names
the field, the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from t5g2.configlib import ConfigError, build, positive, to_dict
from t5g2.model.kernels import IMPLS as ATTENTION_IMPLS
from t5g2.model.kernels import Kernel

CROSS_ATTENTION_MODES = ("merged", "separate", "global_only")
REMAT_POLICIES = ("none", "full", "save_dots")
DTYPES = ("float32", "bfloat16", "float16")
VISION_TRAINABLE = ("none", "projector", "all")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The SigLIP tower (no pooling head) and the projector into the encoder's width.

    Defaults are the released so400m/14 tower at 896 pixels: 64 x 64 patches, average-pooled to
    16 x 16 = 256 tokens per image.
    """

    image_size: int = 896
    patch_size: int = 14
    num_channels: int = 3
    d_model: int = 1152
    ffn_dim: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    layer_norm_eps: float = 1e-6
    tokens_per_image: int = 256
    # What trains: "none" (tower and projector frozen, the recipe), "projector", or "all".
    trainable: str = "none"

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pool(self) -> int:
        """The average-pooling kernel (= stride) from patches to image tokens, per side."""
        return self.patches_per_side // math.isqrt(self.tokens_per_image)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def validate(self, prefix: str) -> None:
        for name in ("image_size", "patch_size", "num_channels", "d_model", "ffn_dim",
                     "num_layers", "num_heads", "tokens_per_image"):
            positive(getattr(self, name), f"{prefix}.{name}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"{prefix}.image_size={self.image_size} is not a multiple of "
                              f"{prefix}.patch_size={self.patch_size}")
        side = math.isqrt(self.tokens_per_image)
        if side * side != self.tokens_per_image or self.patches_per_side % side:
            raise ConfigError(
                f"{prefix}.tokens_per_image={self.tokens_per_image} must be a square whose side "
                f"divides the {self.patches_per_side} patches per side (image_size / patch_size)"
                f": the projector average-pools the patch grid to it")
        if self.d_model % self.num_heads:
            raise ConfigError(f"{prefix}.d_model={self.d_model} is not divisible by "
                              f"{prefix}.num_heads={self.num_heads}")
        if self.trainable not in VISION_TRAINABLE:
            raise ConfigError(f"{prefix}.trainable={self.trainable!r} is unknown; valid: "
                              f"{', '.join(VISION_TRAINABLE)}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise ConfigError(f"{prefix}.layer_norm_eps={self.layer_norm_eps!r} must be > 0")


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """One transformer stack (encoder or decoder) built from Gemma 3 blocks."""

    num_layers: int
    d_model: int
    ffn_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int
    # Layer i is global iff (i + 1) % sliding_window_pattern == 0: 5 local then 1 global for 6.
    sliding_window_pattern: int = 6
    local_rope_theta: float = 10_000.0
    global_rope_theta: float = 1_000_000.0
    # Linear RoPE position interpolation factor (positions are divided by it).
    local_rope_scale: float = 1.0
    global_rope_scale: float = 1.0
    rms_norm_eps: float = 1e-6

    def is_global(self, layer: int) -> bool:
        return (layer + 1) % self.sliding_window_pattern == 0

    @property
    def attention_scale(self) -> float:
        # The reference scales by query_pre_attn_scalar ** -0.5, not head_dim ** -0.5.
        return self.query_pre_attn_scalar**-0.5

    @property
    def layer_types(self) -> tuple[str, ...]:
        return tuple("global" if self.is_global(i) else "local" for i in range(self.num_layers))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The T5Gemma 2 encoder-decoder (text path)."""

    encoder: StackConfig
    decoder: StackConfig
    vocab_size: int
    # One table for encoder input, decoder input and LM head, or three separate tables.
    tie_embeddings: bool = True
    # merged: one attention over [decoder prefix | encoder outputs] with one set of projections;
    # separate: a classic cross-attention block in every decoder layer; global_only: that block in
    # the global layers only.
    cross_attention: str = "merged"
    final_logit_softcap: float | None = None
    pad_id: int = 0
    eos_id: int = 1
    bos_id: int = 2  # also the decoder start token
    eoi_token_id: int = 256_000  # end-of-image: replaced by a learned, unscaled embedding
    image_token_id: int = 256_001  # the placeholders that the image tokens replace
    boi_token_id: int = 255_999  # begin-of-image: an ordinary token
    vision: VisionConfig | None = None  # None: text only, no vision parameters
    dtype: str = "bfloat16"  # compute dtype; softmax, norms and loss stay float32
    param_dtype: str = "float32"
    remat: str = "none"
    # Scan the layer periods (compile time flat in depth) or unroll them (no stacked-activation
    # copies; faster steps on CPU, slower compiles).
    scan_layers: bool = True
    # Attention over query chunks of this many tokens (0: all at once); same numbers, memory
    # [chunk x keys] instead of [queries x keys] per head: needed at 16K tokens.
    attention_query_chunk: int = 0
    # The attention kernel: auto (this backend's fused kernels where they fit, else xla), xla,
    # splash (TPU), cudnn or gpu_flash (GPU). Same numbers up to float rounding.
    attention_impl: str = "xla"

    @property
    def attention_kernel(self) -> Kernel:
        return Kernel(self.attention_impl, self.attention_query_chunk)

    @property
    def decoder_has_cross(self) -> tuple[bool, ...]:
        """Whether decoder layer i has a separate cross-attention block."""
        d = self.decoder
        if self.cross_attention == "separate":
            return (True,) * d.num_layers
        if self.cross_attention == "global_only":
            return tuple(d.is_global(i) for i in range(d.num_layers))
        return (False,) * d.num_layers

    @classmethod
    def from_config_dict(cls, cd: Mapping[str, Any], prefix: str = "model") -> "ModelConfig":
        """Builds and validates from an ml_collections ConfigDict (or any mapping)."""
        d = to_dict(cd)
        stacks = {}
        for side in ("encoder", "decoder"):
            if side not in d:
                raise ConfigError(f"{prefix}.{side} is missing: give the {side} stack's dimensions")
            stacks[side] = build(StackConfig, to_dict(d.pop(side)), f"{prefix}.{side}")
        if d.get("vision") is not None:
            d["vision"] = build(VisionConfig, to_dict(d["vision"]), f"{prefix}.vision")
        cfg = build(cls, {**d, **stacks}, prefix)
        cfg.validate(prefix)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_longer_context(self, factor: float, where: str = "context_scale") -> "ModelConfig":
        """This model run at `factor` times the context it was trained with: position
        interpolation on the global layers of both stacks (their linear RoPE scale multiplied by
        `factor`); local layers see only their window and keep theirs. RoPE has no parameters,
        so the same weights serve; an exported config records it in `rope_parameters`."""
        if not (math.isfinite(factor) and factor >= 1.0):
            raise ConfigError(f"{where}={factor!r}: must be a finite number >= 1 (the factor by "
                              "which the inference context exceeds the training context)")
        if factor == 1.0:
            return self
        longer = {side: dataclasses.replace(getattr(self, side), global_rope_scale=getattr(
            self, side).global_rope_scale * factor) for side in ("encoder", "decoder")}
        return dataclasses.replace(self, **longer)

    def validate(self, prefix: str = "model") -> None:
        for side in ("encoder", "decoder"):
            _validate_stack(getattr(self, side), f"{prefix}.{side}")
        positive(self.vocab_size, f"{prefix}.vocab_size")
        if self.vision is not None:
            if not isinstance(self.vision, VisionConfig):
                raise ConfigError(f"{prefix}.vision={self.vision!r} must be the vision tower's "
                                  "fields or None")
            self.vision.validate(f"{prefix}.vision")
            for name in ("boi_token_id", "eoi_token_id", "image_token_id"):
                value = getattr(self, name)
                if not 0 <= value < self.vocab_size:
                    raise ConfigError(f"{prefix}.{name}={value} is outside the vocabulary [0, "
                                      f"{self.vocab_size}): a model that reads images embeds it")
        if self.cross_attention not in CROSS_ATTENTION_MODES:
            raise ConfigError(
                f"{prefix}.cross_attention={self.cross_attention!r} is unknown; "
                f"valid: {', '.join(CROSS_ATTENTION_MODES)}"
            )
        enc, dec = self.encoder.d_model, self.decoder.d_model
        if self.cross_attention == "merged" and enc != dec:
            raise ConfigError(
                f"{prefix}.encoder.d_model={enc} != {prefix}.decoder.d_model={dec}: merged "
                "attention projects encoder outputs with the decoder's k/v weights, so the widths "
                "must match (use cross_attention='separate' for unbalanced stacks)"
            )
        if self.tie_embeddings and enc != dec:
            raise ConfigError(
                f"{prefix}.encoder.d_model={enc} != {prefix}.decoder.d_model={dec}: tied "
                "embeddings share one table, so the widths must match (set tie_embeddings=False)"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(
                    f"{prefix}.{name}={getattr(self, name)!r} is unknown; "
                    f"valid: {', '.join(DTYPES)}"
                )
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(
                f"{prefix}.remat={self.remat!r} is unknown; valid: {', '.join(REMAT_POLICIES)}"
            )
        if self.attention_query_chunk < 0:
            raise ConfigError(f"{prefix}.attention_query_chunk={self.attention_query_chunk} must "
                              "be >= 0 (0: no chunking)")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"{prefix}.attention_impl={self.attention_impl!r} is unknown; "
                              f"valid: {', '.join(ATTENTION_IMPLS)}")
        if self.final_logit_softcap is not None and not self.final_logit_softcap > 0:
            raise ConfigError(
                f"{prefix}.final_logit_softcap={self.final_logit_softcap} must be > 0 or None"
            )
        for name in ("pad_id", "eos_id", "bos_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConfigError(
                    f"{prefix}.{name}={value} is outside the vocabulary [0, {self.vocab_size})"
                )


def _validate_stack(s: StackConfig, prefix: str) -> None:
    for name in ("num_layers", "d_model", "ffn_dim", "num_heads", "num_kv_heads", "head_dim",
                 "sliding_window", "sliding_window_pattern"):
        positive(getattr(s, name), f"{prefix}.{name}")
    if s.num_heads % s.num_kv_heads:
        raise ConfigError(
            f"{prefix}.num_heads={s.num_heads} is not divisible by {prefix}.num_kv_heads="
            f"{s.num_kv_heads}: grouped-query attention needs whole groups"
        )
    if s.head_dim % 2:
        raise ConfigError(f"{prefix}.head_dim={s.head_dim} must be even for rotary embeddings")
    for name in ("query_pre_attn_scalar", "local_rope_theta", "global_rope_theta",
                 "local_rope_scale", "global_rope_scale", "rms_norm_eps"):
        value = getattr(s, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{prefix}.{name}={value!r} must be a positive number")
