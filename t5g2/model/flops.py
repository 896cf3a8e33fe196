"""Model FLOPs of one training example, for MFU.

MFU follows the PaLM paper's appendix B convention: *model* FLOPs per second over the hardware's
peak, where model FLOPs are what the architecture needs for one example, whatever the
implementation does. So:

* Counted: every matmul with a weight (q/k/v/o projections, GeGLU gate/up/down, the LM head, and
  for T5Gemma 2 the encoder outputs projected by every decoder layer's k/v weights, or by the
  separate cross-attention block's k/v), and the attention scores and values (QK^T and PV).
  A multiply-add is 2 FLOPs.
* Not counted: embedding lookups (gathers), norms, RoPE, softmax, GELU, residual adds, softcap.
  They are elementwise, a few percent of the total at the released sizes, and not what peak FLOPs
  measure (matrix-unit throughput).
* Not counted: rematerialisation. `remat` recomputes the forward in the backward pass: those are
  hardware FLOPs, not model FLOPs, so MFU does not rise when remat is switched on.

Attention is counted per (query, visible key) pair: 2 * num_heads * head_dim FLOPs for the score
and as many for the value product. With `useful_only=True` (the default, for MFU) only visible
pairs count: local encoder layers see their two-sided window of W keys ((W+1)//2 - 1 left,
W // 2 right, clipped at the sequence edges), global encoder layers all S keys; the decoder's own
keys are causal (and windowed to W keys on local layers); encoder keys (merged or separate cross
attention) are all visible. With `useful_only=False` every query is counted against every key, as
a dense attention computes (the reference does; `dot_product_attention` does too while a
sequence is shorter than its band, and skips out-of-window keys beyond): S*S per encoder layer,
T*(T+S) per merged decoder layer, T*T + T*S with a separate cross block. The dense count is what
XLA's own cost analysis reports for an unbanded forward (tests/test_flops.py checks that), the
useful count is the one for MFU.

`forward_flops` / `train_flops` count one example: one segment, every token valid. A packed or
padded batch does the model FLOPs of the tokens really in it: each segment (a pair of encoder and
decoder runs with the same non-zero segment id in one row) with its own lengths and its own
visible pairs (its queries see only its own keys, cross attention only its own encoder tokens);
padding (segment id 0) does none. `batch_train_flops` counts that: the same formula evaluated for
every segment's lengths at once (numpy arrays), summed. It is the MFU numerator of the training
loop and of `benchmarks/train_step.py`, so padding never counts as work.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from t5g2.model.masks import decoder_window, encoder_window
from t5g2.model.config import ModelConfig, StackConfig, VisionConfig


TRAIN_OVER_FORWARD = 3  # forward + backward, the backward being 2 x forward (see train_flops)

Lengths = int | np.ndarray  # one length, or an int64 array of lengths (one per segment)


def window_pairs(n: Lengths, left: int, right: int) -> Lengths:
    """(query, key) pairs i, j in [0, n) with -left <= j - i <= right: a clipped band.

    Offset d >= 0 (up to min(right, n - 1)) and d < 0 (down to -min(left, n - 1)) each hold
    n - |d| pairs; summed in closed form, so `n` may be an array of lengths.
    """
    r = np.minimum(right, n - 1)
    l = np.minimum(left, n - 1)
    return (r + 1) * n - r * (r + 1) // 2 + l * n - l * (l + 1) // 2


def encoder_pairs(s: StackConfig, length: Lengths, layer: int, *,
                  useful_only: bool = True) -> Lengths:
    """Visible (query, key) pairs of encoder layer `layer` over `length` tokens."""
    if not useful_only or s.is_global(layer):
        return length * length
    return window_pairs(length, *encoder_window(s.sliding_window))


def decoder_self_pairs(s: StackConfig, length: Lengths, layer: int, *,
                       useful_only: bool = True) -> Lengths:
    """Visible (query, key) pairs among the decoder's own tokens in decoder layer `layer`."""
    if not useful_only:
        return length * length
    if s.is_global(layer):
        return length * (length + 1) // 2
    return window_pairs(length, *decoder_window(s.sliding_window))


def _projections(s: StackConfig, tokens: Lengths) -> Lengths:
    """q/k/v/o projections and the GeGLU MLP of one Gemma 3 block over `tokens` tokens."""
    qo = 2 * s.num_heads * s.head_dim
    kv = 2 * s.num_kv_heads * s.head_dim
    return 2 * tokens * s.d_model * (qo + kv + 3 * s.ffn_dim)


def _attention(s: StackConfig, pairs: Lengths) -> Lengths:
    """QK^T and PV over `pairs` (query, key) pairs: 2 FLOPs x heads x head_dim, twice."""
    return 2 * 2 * s.num_heads * s.head_dim * pairs


PARTS = ("encoder_matmuls", "encoder_attention", "decoder_matmuls", "decoder_cross_matmuls",
         "decoder_self_attention", "decoder_cross_attention", "lm_head")


def forward_flops(cfg: ModelConfig, encoder_length: int, decoder_length: int, *,
                  useful_only: bool = True) -> dict[str, float]:
    """Model FLOPs of one forward pass of one example (see the module docstring).

    Returns disjoint parts and their sum, `total`:
      encoder_matmuls: q/k/v/o and MLP of every encoder layer;
      encoder_attention: scores and values of every encoder layer;
      decoder_matmuls: q/k/v/o and MLP of every decoder layer over the decoder tokens;
      decoder_cross_matmuls: merged: every decoder layer's k/v projection of the encoder outputs;
        separate / global_only: the cross block's q and o (decoder tokens), k/v (encoder outputs);
      decoder_self_attention: scores and values over the decoder's own keys;
      decoder_cross_attention: scores and values over the encoder keys (merged or separate);
      lm_head: the vocabulary projection of every decoder token.
    """
    if encoder_length < 0 or decoder_length < 0:
        raise ValueError(f"lengths must be >= 0, got encoder {encoder_length}, decoder "
                         f"{decoder_length}")
    parts = _forward_parts(cfg, np.int64(encoder_length), np.int64(decoder_length),
                           useful_only)
    result = {k: float(v) for k, v in parts.items()}
    result["total"] = float(sum(parts.values()))
    return result


def _forward_parts(cfg: ModelConfig, s_len: Lengths, t_len: Lengths,
                   useful_only: bool) -> dict[str, Lengths]:
    """`forward_flops`'s parts, exact integers, elementwise over int64 arrays of lengths."""
    enc, dec = cfg.encoder, cfg.decoder
    out = dict.fromkeys(PARTS, 0)

    for i in range(enc.num_layers):
        out["encoder_matmuls"] += _projections(enc, s_len)
        out["encoder_attention"] += _attention(
            enc, encoder_pairs(enc, s_len, i, useful_only=useful_only))

    # k/v of the encoder outputs (width enc.d_model) with the decoder's heads.
    cross_kv = 2 * s_len * enc.d_model * 2 * dec.num_kv_heads * dec.head_dim
    cross_qo = 2 * t_len * dec.d_model * 2 * dec.num_heads * dec.head_dim
    cross_attention = _attention(dec, t_len * s_len)  # every encoder key is visible
    merged = cfg.cross_attention == "merged"
    for i, has_cross in enumerate(cfg.decoder_has_cross):
        out["decoder_matmuls"] += _projections(dec, t_len)
        out["decoder_self_attention"] += _attention(
            dec, decoder_self_pairs(dec, t_len, i, useful_only=useful_only))
        if merged:
            out["decoder_cross_matmuls"] += cross_kv
        elif has_cross:
            out["decoder_cross_matmuls"] += cross_kv + cross_qo
        if merged or has_cross:
            out["decoder_cross_attention"] += cross_attention

    out["lm_head"] = 2 * t_len * dec.d_model * cfg.vocab_size
    return out


def train_flops(cfg: ModelConfig, encoder_length: int, decoder_length: int, *,
                useful_only: bool = True) -> float:
    """Model FLOPs of one training step's forward and backward for one example: 3 x forward.

    The backward pass of each matmul is two matmuls of the same size (the gradient with respect
    to the input and to the weight, or for attention to both operands), so backward = 2 x
    forward. Recomputation under `remat` is not added: it is hardware work, not model FLOPs (the
    PaLM MFU convention); an HFU figure would add one more forward per rematerialised layer.
    """
    return TRAIN_OVER_FORWARD * forward_flops(cfg, encoder_length, decoder_length,
                                              useful_only=useful_only)["total"]


def segment_lengths(batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(encoder lengths, decoder lengths), int64, of every packed segment of a batch.

    A segment is one (row, segment id > 0): its encoder and decoder tokens carry the same id
    (the packer's contract, t5g2/data/packing.py); one side may be empty. Read from the
    `encoder_segment_ids` / `decoder_segment_ids` arrays [rows, length] (0 = padding).
    """
    enc_ids = np.asarray(batch["encoder_segment_ids"])
    dec_ids = np.asarray(batch["decoder_segment_ids"])
    if enc_ids.ndim != 2 or dec_ids.ndim != 2 or enc_ids.shape[0] != dec_ids.shape[0]:
        raise ValueError(f"segment ids must be [rows, length] with the same rows; got encoder "
                         f"{enc_ids.shape}, decoder {dec_ids.shape}")
    rows, enc_width = enc_ids.shape
    if min(enc_ids.min(initial=0), dec_ids.min(initial=0)) < 0:
        raise ValueError("segment ids must be >= 0 (0 = padding)")
    ids = 1 + max(int(enc_ids.max(initial=0)), int(dec_ids.max(initial=0)))
    if ids > enc_width + dec_ids.shape[1] + 1:  # not numbered 1, 2, ...: renumber, 0 kept
        values, inverse = np.unique(np.concatenate([enc_ids, dec_ids], axis=1),
                                    return_inverse=True)
        inverse = inverse.reshape(rows, -1) + int(values[0] != 0)
        enc_ids, dec_ids = inverse[:, :enc_width], inverse[:, enc_width:]
        ids = 1 + int(inverse.max(initial=0))

    def counts(segment_ids):  # tokens per (row, id), ids 1.. (0 = padding dropped)
        keys = np.arange(rows, dtype=np.int64)[:, None] * ids + segment_ids
        return np.bincount(keys.ravel(), minlength=rows * ids).reshape(rows, ids)[:, 1:]

    enc, dec = counts(enc_ids), counts(dec_ids)
    present = (enc > 0) | (dec > 0)
    return enc[present].astype(np.int64), dec[present].astype(np.int64)


def batch_forward_flops(cfg: ModelConfig, batch: Mapping[str, np.ndarray], *,
                        useful_only: bool = True) -> dict[str, float]:
    """`forward_flops`'s parts and total for a batch (host numpy arrays in the batch contract):
    each part summed over the batch's packed segments, padding excluded.

    Every segment must have positions 0, 1, ... in order (as the packer makes them): its window
    pairs are counted from its length. `useful_only=False` is the dense count per segment.
    """
    enc, dec = segment_lengths(batch)
    # Each distinct (encoder, decoder) length pair once, times how often it occurs: a row of
    # many tiny segments costs no more than one of a few long ones.
    base = int(dec.max(initial=0)) + 1
    key, count = np.unique(enc * base + dec, return_counts=True)
    enc, dec = np.divmod(key, base)
    parts = {k: int(np.sum(v * count))
             for k, v in _forward_parts(cfg, enc, dec, useful_only).items()}
    result = {k: float(v) for k, v in parts.items()}
    result["total"] = float(sum(parts.values()))
    return result


VISION_PARTS = ("patch_embedding", "tower", "projector")


def vision_forward_flops(vision: VisionConfig, text_dim: int) -> dict[str, int]:
    """Model FLOPs of the vision path's forward for one image, by part: the patch embedding (a
    matmul over each flattened patch), the tower's layers (q/k/v/o and the MLP per patch, scores
    and values over every pair of patches) and the projector's matmul per image token."""
    n, d = vision.patches_per_side ** 2, vision.d_model
    per_layer = 2 * n * d * (4 * d + 2 * vision.ffn_dim) + 2 * 2 * n * n * d
    return {"patch_embedding": 2 * n * vision.patch_size ** 2 * vision.num_channels * d,
            "tower": vision.num_layers * per_layer,
            "projector": 2 * vision.tokens_per_image * d * text_dim}


def vision_train_flops(vision: VisionConfig, text_dim: int) -> int:
    """Model FLOPs one image costs a training step. A frozen part runs forward only; a trained
    part adds its backward (2 x forward: the gradients of input and weight), less the input
    gradient where nothing before it trains (the pixels; the tower's output when only the
    projector trains)."""
    f = vision_forward_flops(vision, text_dim)
    if vision.trainable == "none":
        return sum(f.values())
    if vision.trainable == "projector":
        return f["patch_embedding"] + f["tower"] + 2 * f["projector"]
    return 2 * f["patch_embedding"] + TRAIN_OVER_FORWARD * (f["tower"] + f["projector"])


def batch_images(cfg: ModelConfig, batch: Mapping[str, np.ndarray]) -> int:
    """The images a batch really holds: its image placeholders over the tokens per image (empty
    image slots, computed but unread, are padding)."""
    if cfg.vision is None or "encoder_images" not in batch:
        return 0
    placeholders = int(np.sum(np.asarray(batch["encoder_input_tokens"]) == cfg.image_token_id))
    return placeholders // cfg.vision.tokens_per_image


def batch_train_flops(cfg: ModelConfig, batch: Mapping[str, np.ndarray], *,
                      useful_only: bool = True) -> float:
    """Model FLOPs of one training step on `batch`: `train_flops` of each packed segment, summed,
    plus `vision_train_flops` of each image it holds (the MFU numerator: padding and empty image
    slots are not work)."""
    text = TRAIN_OVER_FORWARD * batch_forward_flops(cfg, batch, useful_only=useful_only)["total"]
    images = batch_images(cfg, batch)
    if not images:
        return text
    return text + float(images * vision_train_flops(cfg.vision, cfg.encoder.d_model))
