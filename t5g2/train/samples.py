"""Greedy samples on held-out inputs: what the model does, in words, at the end of a run.

For each denoiser of the mixture, the first `eval.samples` examples of its held-out batches (the
evaluator's own: packed rows, one example per segment) are continued greedily from BOS by
`t5g2.generate`, for up to the example's target length, and shown as (denoiser, input, target,
generated) text through the run's vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from t5g2.generate import generate

HostBatch = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Sample:
    denoiser: str
    input: str
    target: str
    generated: str

    def render(self, width: int = 300) -> str:
        """Three lines, line breaks shown as ⏎, each text cut to `width` characters."""
        def shown(text):
            text = text.replace("\n", "⏎")
            return text if len(text) <= width else text[:width - 1] + "…"

        head = f"[{self.denoiser}] "
        return "\n".join(f"{head if i == 0 else ' ' * len(head)}{label:<11}{shown(text)}"
                         for i, (label, text) in enumerate((("input:", self.input),
                                                            ("target:", self.target),
                                                            ("generated:", self.generated))))


def packed_examples(batch: HostBatch, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first `count` (encoder tokens, target tokens) examples of a packed batch, in row
    and then segment order."""
    out = []
    for row in range(batch["encoder_segment_ids"].shape[0]):
        enc_seg, dec_seg = batch["encoder_segment_ids"][row], batch["decoder_segment_ids"][row]
        for segment in np.unique(enc_seg[enc_seg > 0]):
            if len(out) == count:
                return out
            out.append((batch["encoder_input_tokens"][row][enc_seg == segment],
                        batch["decoder_target_tokens"][row][dec_seg == segment]))
    return out


def greedy_samples(model, vocab, batches: Mapping[str, Sequence[HostBatch]],
                   per_denoiser: int) -> list[Sample]:
    """`per_denoiser` samples of each denoiser, all generated in one batch."""
    named = [(name, example) for name, found in batches.items()
             for example in _first_examples(found, per_denoiser)]
    if not named:
        return []
    pad = model.config.pad_id
    enc = np.full((len(named), max(len(e) for _, (e, _) in named)), pad, np.int32)
    for i, (_, (tokens, _)) in enumerate(named):
        enc[i, :len(tokens)] = tokens
    out = generate(model, enc, max_new_tokens=max(len(t) for _, (_, t) in named))
    return [Sample(name, decode(vocab, e), decode(vocab, t),
                   decode(vocab, out.tokens[i, :min(out.lengths[i], len(t))]))
            for i, (name, (e, t)) in enumerate(named)]


def _first_examples(batches: Sequence[HostBatch], count: int):
    found: list[tuple[np.ndarray, np.ndarray]] = []
    for batch in batches:
        found += packed_examples(batch, count - len(found))
    return found


def decode(vocab, ids) -> str:
    """The text of `ids`; an id the model can emit but the tokenizer lacks (the model's table is
    larger) reads `<id N>` rather than failing."""
    parts, run = [], []
    for i in (int(i) for i in np.asarray(ids).reshape(-1)):
        if 0 <= i < vocab.size:
            run.append(i)
        else:
            parts += [vocab.decode(run), f"<id {i}>"]
            run = []
    return "".join(parts + [vocab.decode(run)])
