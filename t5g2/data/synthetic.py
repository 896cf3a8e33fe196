"""A synthetic batch source behind the same interface as the real pipeline.

Each host yields only its rows of the global batch; row r of step s is a pure function of
(seed, s, r), so any number of processes sees the same global batch and a restored position
continues exactly, on any number of processes (the position is the step, the same on all). The
task is copying: the decoder must reproduce the first decoder_length encoder tokens. With
`distinct_batches=k` the source cycles through k batches, so a working train step drives the
loss towards zero (k=1: one repeated batch, the CPU smoke run's setting).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

FIELDS = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
          "decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
          "decoder_positions", "decoder_loss_weights")


class SyntheticCopySource:
    def __init__(self, *, global_batch_size: int, encoder_length: int, decoder_length: int,
                 vocab_size: int, seed: int, process_index: int = 0, process_count: int = 1,
                 bos_id: int = 2, first_id: int = 3, max_id: int = 32_000,
                 distinct_batches: int = 0):
        if global_batch_size % process_count:
            raise ValueError(f"global batch {global_batch_size} is not divisible by "
                             f"{process_count} processes")
        if decoder_length > encoder_length:
            raise ValueError(f"decoder_length={decoder_length} > encoder_length={encoder_length}:"
                             " the copy task needs the targets inside the encoder input")
        local = global_batch_size // process_count
        self.rows = range(process_index * local, (process_index + 1) * local)
        self.encoder_length, self.decoder_length = encoder_length, decoder_length
        self.seed, self.bos_id, self.distinct_batches = seed, bos_id, distinct_batches
        self.id_range = (first_id, min(vocab_size, max_id))
        self.step = 0

    def _row(self, step: int, row: int) -> np.ndarray:
        if self.distinct_batches:
            step %= self.distinct_batches
        return np.random.default_rng([self.seed, step, row]).integers(
            *self.id_range, size=self.encoder_length, dtype=np.int32)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        enc = np.stack([self._row(step, r) for r in self.rows])
        n, t = len(self.rows), self.decoder_length
        targets = enc[:, :t]
        dec = np.concatenate([np.full((n, 1), self.bos_id, np.int32), targets[:, :-1]], axis=1)
        ones_e, ones_d = np.ones_like(enc), np.ones_like(targets)

        def positions(length):
            return np.broadcast_to(np.arange(length, dtype=np.int32), (n, length))

        return dict(encoder_input_tokens=enc, encoder_segment_ids=ones_e,
                    encoder_positions=positions(self.encoder_length),
                    decoder_input_tokens=dec, decoder_target_tokens=targets,
                    decoder_segment_ids=ones_d, decoder_positions=positions(t),
                    decoder_loss_weights=ones_d.astype(np.float32))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        """The position after the batches returned so far (what a checkpoint records)."""
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def restore_position(self, states: Sequence[dict]) -> None:
        """Continues the position every process of the saving run recorded (any number of
        them): the step, which they all share."""
        steps = sorted({int(state["step"]) for state in states})
        if len(steps) != 1:
            raise ValueError(f"the saved data positions disagree: steps {steps}")
        self.step = steps[0]
