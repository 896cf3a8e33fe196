"""Packing: grain's first-fit packer + `to_batch_contract` give the model exactly what an unpacked
batch gives it, example by example."""

import grain
import numpy as np
import pytest
from flax import nnx

from t5g2.data.packing import (CONTRACT_KEYS, pad_example, shift_right_per_segment,
                               to_batch_contract, unpacked_batch)
from t5g2.model import T5Gemma2
from tests.reference import SMALL_STACK, tiny_config

START = 2


def _examples(lengths, seed=0, low=3, high=400):
    """Examples with the given (inputs, targets) lengths; token values unique across examples."""
    rng = np.random.default_rng(seed)
    pool = rng.permutation(np.arange(low, high))
    examples, used = [], 0
    for n_in, n_out in lengths:
        inputs, targets = pool[used:used + n_in], pool[used + n_in:used + n_in + n_out]
        used += n_in + n_out
        examples.append(dict(inputs=inputs.astype(np.int32), targets=targets.astype(np.int32)))
    return examples


def _pack(examples, encoder_length, decoder_length, bins):
    ds = grain.experimental.FirstFitPackIterDataset(
        grain.MapDataset.source(examples).to_iter_dataset(),
        length_struct={"inputs": encoder_length, "targets": decoder_length},
        num_packing_bins=bins, shuffle_bins=False)
    rows = list(ds)
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _segments(batch, prefix, key):
    """{(row, segment id): tokens of that segment} for one side of a contract batch."""
    seg = batch[f"{prefix}_segment_ids"]
    return {(r, s): batch[key][r][seg[r] == s]
            for r in range(seg.shape[0]) for s in np.unique(seg[r]) if s}


def test_grain_first_fit_gives_an_examples_inputs_and_targets_the_same_segment_id():
    examples = _examples([(9, 3), (5, 8), (7, 2), (3, 6), (4, 4)])
    packed = _pack(examples, encoder_length=16, decoder_length=12, bins=2)
    assert packed["inputs"].shape[1] == 16 and packed["targets"].shape[1] == 12
    found = []
    for row in range(packed["inputs"].shape[0]):
        in_seg, out_seg = packed["inputs_segment_ids"][row], packed["targets_segment_ids"][row]
        assert set(np.unique(in_seg[in_seg > 0])) == set(np.unique(out_seg[out_seg > 0]))
        for s in np.unique(in_seg[in_seg > 0]):
            inputs = packed["inputs"][row][in_seg == s]
            targets = packed["targets"][row][out_seg == s]
            match = [i for i, e in enumerate(examples) if np.array_equal(e["inputs"], inputs)
                     and np.array_equal(e["targets"], targets)]
            assert len(match) == 1, (row, s)  # the same id names one example on both sides
            np.testing.assert_array_equal(packed["inputs_positions"][row][in_seg == s],
                                          np.arange(len(inputs)))
            found += match
    assert sorted(found) == list(range(len(examples)))  # every example once, none split


def test_decoder_inputs_are_the_targets_shifted_right_within_each_segment():
    packed = dict(inputs=np.array([[5, 6, 7, 8, 9, 0]]),
                  inputs_segment_ids=np.array([[1, 1, 1, 2, 2, 0]]),
                  inputs_positions=np.array([[0, 1, 2, 0, 1, 0]]),
                  targets=np.array([[11, 12, 13, 21, 22, 31, 0, 0]]),
                  targets_segment_ids=np.array([[1, 1, 1, 2, 2, 3, 0, 0]]),
                  targets_positions=np.array([[0, 1, 2, 0, 1, 0, 0, 0]]))
    batch = to_batch_contract(packed, start_id=START)
    np.testing.assert_array_equal(batch["decoder_input_tokens"],
                                  [[START, 11, 12, START, 21, START, 0, 0]])
    np.testing.assert_array_equal(batch["decoder_loss_weights"], [[1, 1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["decoder_target_tokens"], packed["targets"])
    np.testing.assert_array_equal(batch["encoder_segment_ids"], packed["inputs_segment_ids"])
    assert set(batch) == set(CONTRACT_KEYS)
    for key, value in batch.items():
        expected = np.float32 if key == "decoder_loss_weights" else np.int32
        assert value.dtype == expected, key


def test_shift_works_on_grain_packed_rows_of_random_examples():
    examples = _examples([(5, 7), (6, 3), (2, 9), (8, 1), (3, 5), (4, 4)], seed=3)
    batch = to_batch_contract(_pack(examples, 16, 16, bins=3), start_id=START)
    targets = _segments(batch, "decoder", "decoder_target_tokens")
    inputs = _segments(batch, "decoder", "decoder_input_tokens")
    assert len(targets) == len(examples)
    for key, t in targets.items():
        np.testing.assert_array_equal(inputs[key], np.concatenate([[START], t[:-1]]))
    padding = batch["decoder_segment_ids"] == 0
    assert padding.any()  # the check below is not vacuous
    assert not batch["decoder_input_tokens"][padding].any()
    assert not batch["decoder_loss_weights"][padding].any()


def test_shift_handles_any_leading_shape():
    targets, seg, pos = np.array([4, 5, 6]), np.array([1, 1, 2]), np.array([0, 1, 0])
    np.testing.assert_array_equal(shift_right_per_segment(targets, seg, pos, start_id=9),
                                  [9, 4, 9])


def test_bad_packed_input_is_named():
    with pytest.raises(KeyError, match="targets_segment_ids"):
        to_batch_contract(dict(inputs=np.zeros((1, 4)), targets=np.zeros((1, 4))), start_id=2)
    with pytest.raises(ValueError, match="targets of shape \\(9,\\) does not fit one row of "
                                         "length 8"):
        pad_example(dict(inputs=np.ones(3), targets=np.ones(9)), encoder_length=8,
                    decoder_length=8)


def test_packed_and_unpacked_examples_get_the_same_logits():
    """The model + packing contract: an example's logits do not depend on its row-mates."""
    cfg = tiny_config(**SMALL_STACK)
    assert cfg.dtype == "float32"
    model = T5Gemma2(cfg, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, b: m(
        b["encoder_input_tokens"], b["decoder_input_tokens"],
        encoder_segment_ids=b["encoder_segment_ids"], encoder_positions=b["encoder_positions"],
        decoder_segment_ids=b["decoder_segment_ids"], decoder_positions=b["decoder_positions"]))
    # Longer than the sliding window (8) on both sides for some, shorter for others.
    examples = _examples([(13, 9), (6, 5), (10, 11), (4, 3)], seed=7, high=cfg.eoi_token_id)
    enc_len, dec_len = 24, 16
    packed = to_batch_contract(_pack(examples, enc_len, dec_len, bins=2), start_id=cfg.bos_id)
    assert packed["encoder_segment_ids"].max() >= 2  # some row really holds several examples
    alone = unpacked_batch(examples, encoder_length=enc_len, decoder_length=dec_len,
                           start_id=cfg.bos_id)
    packed_logits = np.asarray(forward(model, packed))
    alone_logits = np.asarray(forward(model, alone))

    seg = packed["decoder_segment_ids"]
    compared = 0
    for i, example in enumerate(examples):
        # find the example by its targets, then compare its decoder positions' logits
        rows = [(r, s) for r in range(seg.shape[0]) for s in np.unique(seg[r]) if s and
                np.array_equal(packed["decoder_target_tokens"][r][seg[r] == s],
                               example["targets"])]
        assert len(rows) == 1
        r, s = rows[0]
        n = len(example["targets"])
        np.testing.assert_allclose(packed_logits[r][seg[r] == s], alone_logits[i][:n],
                                   atol=1e-5, rtol=0)
        compared += 1
    assert compared == len(examples)
    # and the unpacked rows are themselves a contract batch: weights only on the targets
    np.testing.assert_array_equal(alone["decoder_loss_weights"].sum(1),
                                  [len(e["targets"]) for e in examples])
