"""Packed (or padded) denoised examples -> the encoder-decoder batch contract.

Grain's `FirstFitPackIterDataset` with `length_struct={"inputs": L_enc, "targets": L_dec}` packs
variable-length `{"inputs", "targets"}` examples into fixed-length rows and adds
`inputs_segment_ids`, `inputs_positions`, `targets_segment_ids`, `targets_positions`: segment ids
count 1, 2, ... per row (0 = padding), positions restart at 0 per example, and an example's inputs
and targets get the *same* segment id -- so they serve directly as the encoder and decoder segment
ids (tests/test_packing.py checks this). What packing does not do is make decoder inputs:
`to_batch_contract` shifts the targets right within each segment and puts the start id at every
segment start, so no example's first decoder input is the previous example's last target.

The contract (names as seqio/t5x's EncDecFeatureConverter): int32 `[batch, length]` arrays
encoder_input_tokens, encoder_segment_ids, encoder_positions, decoder_input_tokens,
decoder_target_tokens, decoder_segment_ids, decoder_positions, and float32 decoder_loss_weights
(1 on real target tokens, 0 on padding).

`pad_example` is the unpacked special case (one example per row, in the same packed layout), for
evaluation and for checking that packing changes nothing (`unpacked_batch`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

PACKED_KEYS = ("inputs", "targets", "inputs_segment_ids", "inputs_positions",
               "targets_segment_ids", "targets_positions")
CONTRACT_KEYS = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
                 "decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
                 "decoder_positions", "decoder_loss_weights")


def shift_right_per_segment(targets: np.ndarray, segment_ids: np.ndarray,
                            positions: np.ndarray, *, start_id: int) -> np.ndarray:
    """Decoder inputs: each target moved one step right inside its own segment.

    A segment's first position gets `start_id`, padding (segment id 0) gets 0. Works on any
    leading shape; the last axis is the sequence.
    """
    shifted = np.zeros_like(targets)
    shifted[..., 1:] = targets[..., :-1]
    starts = (positions == 0) & (segment_ids != 0)
    return np.where(starts, start_id, np.where(segment_ids != 0, shifted, 0)).astype(np.int32)


def to_batch_contract(packed: Mapping[str, np.ndarray], *, start_id: int) -> dict[str, np.ndarray]:
    """Grain's packed `{inputs, targets, *_segment_ids, *_positions}` -> the batch contract."""
    missing = [k for k in PACKED_KEYS if k not in packed]
    if missing:
        raise KeyError(f"packed example lacks {', '.join(missing)} (has {', '.join(packed)}); "
                       "expected grain FirstFitPackIterDataset output over inputs/targets")
    arrays = {k: np.asarray(packed[k]) for k in PACKED_KEYS}
    for side in ("inputs", "targets"):
        shapes = {k: arrays[k].shape for k in (side, f"{side}_segment_ids", f"{side}_positions")}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"{side} arrays differ in shape: {shapes}")
    targets = arrays["targets"].astype(np.int32)
    segment_ids = arrays["targets_segment_ids"].astype(np.int32)
    positions = arrays["targets_positions"].astype(np.int32)
    return dict(
        encoder_input_tokens=arrays["inputs"].astype(np.int32),
        encoder_segment_ids=arrays["inputs_segment_ids"].astype(np.int32),
        encoder_positions=arrays["inputs_positions"].astype(np.int32),
        decoder_input_tokens=shift_right_per_segment(targets, segment_ids, positions,
                                                     start_id=start_id),
        decoder_target_tokens=targets,
        decoder_segment_ids=segment_ids,
        decoder_positions=positions,
        decoder_loss_weights=(segment_ids != 0).astype(np.float32),
    )


def pad_example(example: Mapping[str, np.ndarray], *, encoder_length: int,
                decoder_length: int) -> dict[str, np.ndarray]:
    """One example alone in a row, padded, in grain's packed layout (segment id 1)."""
    row = {}
    for side, length in (("inputs", encoder_length), ("targets", decoder_length)):
        tokens = np.asarray(example[side], np.int32)
        if tokens.ndim != 1 or len(tokens) > length:
            raise ValueError(f"{side} of shape {tokens.shape} does not fit one row of "
                             f"length {length}")
        n = len(tokens)
        row[side] = np.pad(tokens, (0, length - n))
        row[f"{side}_segment_ids"] = (np.arange(length) < n).astype(np.int32)
        row[f"{side}_positions"] = np.where(np.arange(length) < n, np.arange(length),
                                            0).astype(np.int32)
    return row


def unpacked_batch(examples: Sequence[Mapping[str, np.ndarray]], *, encoder_length: int,
                   decoder_length: int, start_id: int) -> dict[str, np.ndarray]:
    """The batch contract with one example per row (padded), e.g. for evaluation."""
    rows = [pad_example(e, encoder_length=encoder_length, decoder_length=decoder_length)
            for e in examples]
    stacked = {k: np.stack([r[k] for r in rows]) for k in PACKED_KEYS}
    return to_batch_contract(stacked, start_id=start_id)
