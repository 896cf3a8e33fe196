"""The image path: a SigLIP vision tower and the projector that turns its patches into encoder
tokens (T5Gemma 2 §6: images go to the encoder only).

Tower: a patch embedding (a stride = kernel convolution, written as one matmul over the
flattened patches), learned position embeddings, pre-LayerNorm transformer layers with biases
and full (unmasked) attention, a final LayerNorm; no pooling head. Projector: average pooling of
the patch grid to `tokens_per_image` tokens, Gemma's RMSNorm, and a bias-free projection into the
text width. The tower is frozen by default: its output is under `stop_gradient`, and training
neither differentiates nor keeps optimizer state for it (`frozen_path`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from t5g2.model.attention import Kernel, MaskSpec, dot_product_attention
from t5g2.model.config import VisionConfig
from t5g2.model.layers import RMSNorm, default_init, gelu_tanh, param, project, zeros_init
from t5g2.model.layer_stack import LayerStack

TOWER, PROJECTOR = "vision/tower/", "vision/projector/"


def frozen_path(path: str, vision: VisionConfig | None) -> bool:
    """Whether the flat parameter `path` ('/'-joined) is frozen under `vision.trainable`."""
    if vision is None or vision.trainable == "all":
        return False
    if vision.trainable == "projector":
        return path.startswith(TOWER)
    return path.startswith((TOWER, PROJECTOR))


class LayerNorm(nnx.Module):
    """Standard LayerNorm (mean and variance, weight and bias), computed in float32."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), ("embed",), param_dtype)
        self.bias = param(rngs, zeros_init, (dim,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32)
                + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def _bias(rngs, shape, axes, param_dtype) -> nnx.Param:
    return param(rngs, zeros_init, shape, axes, param_dtype)


class VisionAttention(nnx.Module):
    """Multi-head attention with biases, scale head_dim^-0.5, every patch seeing every patch."""

    def __init__(self, cfg: VisionConfig, *, kernel: Kernel, param_dtype, rngs: nnx.Rngs):
        d, h, hd = cfg.d_model, cfg.num_heads, cfg.head_dim
        self.scale = hd ** -0.5
        self.kernel = kernel
        for name in ("q", "k", "v"):
            setattr(self, name, param(rngs, default_init, (d, h, hd),
                                      ("embed", "heads", "head_dim"), param_dtype))
            setattr(self, f"{name}_bias", _bias(rngs, (h, hd), ("heads", "head_dim"),
                                                 param_dtype))
        self.o = param(rngs, default_init, (h, hd, d), ("heads", "head_dim", "embed"),
                       param_dtype)
        self.o_bias = _bias(rngs, (d,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = (project(x, getattr(self, n)[...]) + getattr(self, f"{n}_bias")[...].astype(
            x.dtype) for n in ("q", "k", "v"))
        ones = jnp.ones(x.shape[:2], jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        everything = MaskSpec(positions, ones, positions, ones)
        out = dot_product_attention(q, [(k, v, everything)], self.scale, self.kernel)
        return project(out, self.o[...], contract=2) + self.o_bias[...].astype(x.dtype)


class VisionMLP(nnx.Module):
    """fc2(gelu_tanh(fc1(x))), with biases."""

    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        self.fc1 = param(rngs, default_init, (cfg.d_model, cfg.ffn_dim), ("embed", "mlp"),
                         param_dtype)
        self.fc1_bias = _bias(rngs, (cfg.ffn_dim,), ("mlp",), param_dtype)
        self.fc2 = param(rngs, default_init, (cfg.ffn_dim, cfg.d_model), ("mlp", "embed"),
                         param_dtype)
        self.fc2_bias = _bias(rngs, (cfg.d_model,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = gelu_tanh(project(x, self.fc1[...]) + self.fc1_bias[...].astype(x.dtype))
        return project(h, self.fc2[...]) + self.fc2_bias[...].astype(x.dtype)


class VisionLayer(nnx.Module):
    """Pre-LayerNorm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: VisionConfig, *, kernel: Kernel, param_dtype, rngs: nnx.Rngs):
        norm = functools.partial(LayerNorm, cfg.d_model, cfg.layer_norm_eps,
                                 param_dtype=param_dtype, rngs=rngs)
        self.attn_norm, self.mlp_norm = norm(), norm()
        self.attn = VisionAttention(cfg, kernel=kernel, param_dtype=param_dtype,
                                    rngs=rngs)
        self.mlp = VisionMLP(cfg, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, _ctx=None) -> jax.Array:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


def patches(images: jax.Array, patch_size: int) -> jax.Array:
    """[N, H, W, C] -> [N, (H/P)(W/P), P, P, C], patches in row-major grid order."""
    n, h, w, c = images.shape
    p = patch_size
    x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p, p, c)


class SiglipTower(nnx.Module):
    """Images [N, H, W, C] (normalised to [-1, 1]) -> patch features [N, patches, d_model]."""

    def __init__(self, cfg: VisionConfig, *, remat: str, scan: bool, kernel: Kernel,
                 param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.d_model
        self.patch_kernel = param(rngs, default_init, (p, p, c, d),
                                  ("patch", "patch", "channels", "embed"), param_dtype)
        self.patch_bias = _bias(rngs, (d,), ("embed",), param_dtype)
        self.position = param(rngs, default_init, (cfg.patches_per_side ** 2, d),
                              ("image_patches", "embed"), param_dtype)

        def make_layer(_, r):
            return VisionLayer(cfg, kernel=kernel, param_dtype=param_dtype, rngs=r)

        self.layers = LayerStack(cfg.num_layers, 1, make_layer, remat=remat, scan=scan,
                                 rngs=rngs)
        self.final_norm = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, images: jax.Array, dtype) -> jax.Array:
        x = patches(images.astype(dtype), self.cfg.patch_size)
        x = project(x, self.patch_kernel[...], contract=3) + self.patch_bias[...].astype(dtype)
        x = x + self.position[...].astype(dtype)
        return self.final_norm(self.layers(x, None))


class Projector(nnx.Module):
    """Patch features -> `tokens_per_image` encoder tokens: average pooling of the patch grid
    (row-major), RMSNorm (1 + w), and x @ W into the text width (W zero-initialised)."""

    def __init__(self, cfg: VisionConfig, text_dim: int, *, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.norm = RMSNorm(cfg.d_model, cfg.layer_norm_eps, "embed", param_dtype=param_dtype,
                            rngs=rngs)
        self.projection = param(rngs, zeros_init, (cfg.d_model, text_dim),
                                ("vision_embed", "embed"), param_dtype)

    def __call__(self, features: jax.Array) -> jax.Array:
        n, _, d = features.shape
        side, k = self.cfg.patches_per_side // self.cfg.pool, self.cfg.pool
        grid = features.reshape(n, side, k, side, k, d)
        pooled = grid.astype(jnp.float32).mean(axis=(2, 4)).astype(features.dtype)
        return project(self.norm(pooled.reshape(n, side * side, d)), self.projection[...])


class VisionEncoder(nnx.Module):
    """Images [B, M, H, W, C] -> image tokens [B, M, tokens_per_image, text width]."""

    def __init__(self, cfg: VisionConfig, text_dim: int, *, remat: str, scan: bool,
                 kernel: Kernel, param_dtype, rngs: nnx.Rngs):
        self.trainable = cfg.trainable
        self.tower = SiglipTower(cfg, remat=remat, scan=scan, kernel=kernel,
                                 param_dtype=param_dtype, rngs=rngs)
        self.projector = Projector(cfg, text_dim, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, images: jax.Array, dtype) -> jax.Array:
        b, m = images.shape[:2]
        features = self.tower(images.reshape(b * m, *images.shape[2:]), dtype)
        if self.trainable != "all":  # frozen: nothing of the tower is kept for a backward pass
            features = jax.lax.stop_gradient(features)
        tokens = self.projector(features)
        if self.trainable == "none":
            tokens = jax.lax.stop_gradient(tokens)
        return tokens.reshape(b, m, *tokens.shape[1:])
