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

All counts are for one example with every token valid and one segment. Every term is linear in
the tokens or counts pairs within a segment, so a packed row's count is the sum of its segments'
counts, and a batch's the sum of its rows'.
"""

from __future__ import annotations

from t5g2.model.attention import decoder_window, encoder_window
from t5g2.model.config import ModelConfig, StackConfig


def window_pairs(n: int, left: int, right: int) -> int:
    """(query, key) pairs i, j in [0, n) with -left <= j - i <= right: a clipped band."""
    return sum(n - abs(d) for d in range(-left, right + 1) if abs(d) < n)


def encoder_pairs(s: StackConfig, length: int, layer: int, *, useful_only: bool = True) -> int:
    """Visible (query, key) pairs of encoder layer `layer` over `length` tokens."""
    if not useful_only or s.is_global(layer):
        return length * length
    return window_pairs(length, *encoder_window(s.sliding_window))


def decoder_self_pairs(s: StackConfig, length: int, layer: int, *,
                       useful_only: bool = True) -> int:
    """Visible (query, key) pairs among the decoder's own tokens in decoder layer `layer`."""
    if not useful_only:
        return length * length
    if s.is_global(layer):
        return length * (length + 1) // 2
    return window_pairs(length, *decoder_window(s.sliding_window))


def _projections(s: StackConfig, tokens: int) -> int:
    """q/k/v/o projections and the GeGLU MLP of one Gemma 3 block over `tokens` tokens."""
    qo = 2 * s.num_heads * s.head_dim
    kv = 2 * s.num_kv_heads * s.head_dim
    return 2 * tokens * s.d_model * (qo + kv + 3 * s.ffn_dim)


def _attention(s: StackConfig, pairs: int) -> int:
    """QK^T and PV over `pairs` (query, key) pairs: 2 FLOPs x heads x head_dim, twice."""
    return 2 * 2 * s.num_heads * s.head_dim * pairs


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
    enc, dec = cfg.encoder, cfg.decoder
    s_len, t_len = encoder_length, decoder_length
    if s_len < 0 or t_len < 0:
        raise ValueError(f"lengths must be >= 0, got encoder {s_len}, decoder {t_len}")
    out = dict.fromkeys(("encoder_matmuls", "encoder_attention", "decoder_matmuls",
                         "decoder_cross_matmuls", "decoder_self_attention",
                         "decoder_cross_attention", "lm_head"), 0)

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
    result = {k: float(v) for k, v in out.items()}
    result["total"] = float(sum(out.values()))
    return result


def train_flops(cfg: ModelConfig, encoder_length: int, decoder_length: int, *,
                useful_only: bool = True) -> float:
    """Model FLOPs of one training step's forward and backward for one example: 3 x forward.

    The backward pass of each matmul is two matmuls of the same size (the gradient with respect
    to the input and to the weight, or for attention to both operands), so backward = 2 x
    forward. Recomputation under `remat` is not added: it is hardware work, not model FLOPs (the
    PaLM MFU convention); an HFU figure would add one more forward per rematerialised layer.
    """
    return 3.0 * forward_flops(cfg, encoder_length, decoder_length,
                               useful_only=useful_only)["total"]
