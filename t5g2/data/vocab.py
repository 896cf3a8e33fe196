"""The vocabulary: a sentencepiece model plus sentinel ids and denoiser mode-token ids.

Sentinels mark corrupted spans (T5's `<extra_id_k>`). A 16K-token input needs ~910-1260 of them
under T5's span arithmetic, far more than T5's customary 100, so their number is configured and
checked (`require_sentinels`). Where they come from:
* a Gemma 3-style model (its pieces include `<unused0>`, `<unused1>`, ...): sentinel k is the k-th
  `<unusedN>` piece by N, i.e. `<unusedk>` while the numbering has no gap (Gemma 3 has 6242 of
  them; T5Gemma 2's tokenizer lacks `<unused99>`, which became `<image_soft_token>`, so there its
  sentinels 99.. are `<unused100>`..); no ids are added (`extra_ids == 0`), so the model's
  embedding table fits as is;
* any other model: `extra_ids = num_sentinels` ids appended above the model in T5 order
  (`<extra_id_k>` = size - 1 - k), exactly what `seqio.SentencePieceVocabulary(model_file,
  extra_ids=N, reverse_extra_ids=True)` gives.

Mode tokens ([R]/[X]/[S], or UL2's [NLU]/[NLG]/[S2S]) are prepended to the encoder input by the
denoisers and must be one piece each, so seqio tokenizing "[R]" gives the same single id. Models
trained here carry them as user-defined symbols. In a Gemma model a mode string that is not a single
piece gets a reserved `<unusedN>` piece instead, taken from the top of the unused range (the first
mode token gets the highest), disjoint from the sentinels; such a mode id decodes as `<unusedN>`.

`train_sentencepiece` trains small models deterministically with Gemma's conventions (pad 0, eos 1,
bos 2, unk 3, byte fallback so any text encodes, identity normalisation and no dummy prefix so
decode(encode(text)) == text); `default_vocabulary` trains one on the embedded corpus, once, and
caches it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from t5g2.data.corpus import cache_root, embedded_corpus_path, write_atomically

DEFAULT_MODE_TOKENS = ("[R]", "[X]", "[S]")
UL2_MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
_SPECIAL_PIECES = dict(pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>")
_BYTE_PIECES = 256
_TRAINING_SEED = 0
# Training reads at most this many characters of text: bounds time and memory, and the cut is a
# prefix, so it is deterministic (sentencepiece's own sampling is not used).
MAX_TRAINING_CHARS = 50_000_000
# Bump when the training options change: part of default_vocabulary's cache key.
_TRAINER_VERSION = 1


class VocabularyError(ValueError):
    """The vocabulary cannot serve the configuration; the message says what is missing."""


_UNUSED_PIECE = re.compile(r"<unused(\d+)>")


def unused_piece(k: int) -> str:
    """Gemma's name for its k-th reserved piece."""
    return f"<unused{k}>"


class Vocabulary:
    """A sentencepiece model plus sentinel ids and denoiser mode-token ids."""

    def __init__(self, model_proto: bytes, *, model_file: str, num_sentinels: int,
                 mode_tokens: Sequence[str] = DEFAULT_MODE_TOKENS):
        if isinstance(num_sentinels, bool) or not isinstance(num_sentinels, int) \
                or num_sentinels < 0:
            raise VocabularyError(f"num_sentinels={num_sentinels!r} must be an integer >= 0")
        mode_tokens = tuple(mode_tokens)
        if any(not isinstance(t, str) or not t for t in mode_tokens) \
                or len(set(mode_tokens)) != len(mode_tokens):
            raise VocabularyError(f"mode_tokens={mode_tokens!r} must be distinct non-empty strings")
        self.model_file = model_file
        self._model_proto = model_proto
        self._sp = _load_processor(model_proto, model_file)
        self.pad_id, self.eos_id, self.bos_id, self.unk_id = self._special_ids()
        self.sp_size = self._sp.get_piece_size()
        self.mode_tokens = mode_tokens

        unused = self._unused_ids()
        if unused:
            self.extra_ids = 0
            self._mode_ids = self._gemma_mode_ids(mode_tokens, unused, num_sentinels)
            self.sentinel_ids = np.asarray(unused[:num_sentinels], np.int32)
        else:
            self.extra_ids = num_sentinels
            self._mode_ids = {t: self._single_piece(t) for t in mode_tokens}
            top = self.sp_size + num_sentinels - 1
            self.sentinel_ids = np.arange(top, top - num_sentinels, -1, dtype=np.int32)
        self.size = self.sp_size + self.extra_ids
        self._check_distinct()

    @classmethod
    def from_file(cls, model_file: str, *, num_sentinels: int,
                  mode_tokens: Sequence[str] = DEFAULT_MODE_TOKENS) -> "Vocabulary":
        """Load a sentencepiece .model file (see the module doc for where sentinels come from)."""
        try:
            with open(model_file, "rb") as f:
                proto = f.read()
        except OSError as e:
            raise VocabularyError(f"cannot read sentencepiece model {model_file}: {e}") from e
        return cls(proto, model_file=model_file, num_sentinels=num_sentinels,
                   mode_tokens=mode_tokens)

    @property
    def num_sentinels(self) -> int:
        return len(self.sentinel_ids)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` (int32), no BOS/EOS added."""
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` over a batch of texts (one call into sentencepiece)."""
        return [np.asarray(ids, np.int32) for ids in self._sp.encode(list(texts))]

    def decode(self, ids) -> str:
        """Text of `ids`; appended sentinels read `<extra_id_k>`, pad/eos/bos read as nothing."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        bad = [i for i in ids if not 0 <= i < self.size]
        if bad:
            raise VocabularyError(f"cannot decode id {bad[0]}: ids must be in [0, {self.size})")
        parts, run = [], []
        for i in ids:
            if i < self.sp_size:
                run.append(i)
                continue
            parts.append(self._sp.decode(run))
            run = []
            parts.append(f"<extra_id_{self.size - 1 - i}>")
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def mode_id(self, token: str) -> int:
        """Id of a mode token such as "[R]"."""
        try:
            return self._mode_ids[token]
        except KeyError:
            raise VocabularyError(f"mode token {token!r} is not in this vocabulary's mode tokens "
                                  f"{self.mode_tokens}") from None

    def require_sentinels(self, needed: int, what: str) -> None:
        """Raise unless at least `needed` sentinels exist; `what` names who needs them."""
        if needed > self.num_sentinels:
            source = ("the Gemma model's <unusedN> pieces" if self.extra_ids == 0 and
                      self.num_sentinels else "num_sentinels")
            raise VocabularyError(
                f"{what} needs {needed} sentinels but the vocabulary has {self.num_sentinels} "
                f"(from {source}, model {self.model_file}); raise num_sentinels or shorten the "
                "inputs")

    def seqio_vocabulary(self):
        """The same ids as a `seqio.SentencePieceVocabulary` (imports seqio, hence TensorFlow).

        Its encoding of text and of the sentinels equals this one's; in a Gemma model, a mode token
        that took a reserved `<unusedN>` piece is not what seqio makes of the string: use
        `mode_id` there.
        """
        import seqio  # lazily: TensorFlow stays out of the grain training path
        return seqio.SentencePieceVocabulary(self.model_file, extra_ids=self.extra_ids,
                                             reverse_extra_ids=True)

    def __getstate__(self):
        # The sentencepiece processor is rebuilt from the proto bytes in each worker process.
        return dict(model_proto=self._model_proto, model_file=self.model_file,
                    num_sentinels=self.num_sentinels, mode_tokens=self.mode_tokens)

    def __setstate__(self, state):
        self.__init__(state.pop("model_proto"), **state)

    def __repr__(self):
        return (f"Vocabulary({self.model_file!r}, size={self.size}, extra_ids={self.extra_ids}, "
                f"num_sentinels={self.num_sentinels}, mode_tokens={self.mode_tokens})")

    # -- construction helpers ---------------------------------------------------------------

    def _special_ids(self) -> tuple[int, int, int, int]:
        sp = self._sp
        ids = dict(pad=sp.pad_id(), eos=sp.eos_id(), bos=sp.bos_id(), unk=sp.unk_id())
        missing = [name for name, i in ids.items() if i < 0]
        if missing:
            raise VocabularyError(f"sentencepiece model {self.model_file} defines no "
                                  f"{'/'.join(missing)} id; t5g2 needs pad, eos, bos and unk "
                                  "(bos starts every decoder segment)")
        return ids["pad"], ids["eos"], ids["bos"], ids["unk"]

    def _unused_ids(self) -> list[int]:
        """Ids of the `<unusedN>` pieces in increasing N (empty if not a Gemma model)."""
        pieces = self._sp.id_to_piece(list(range(self._sp.get_piece_size())))
        numbered = sorted((int(m.group(1)), i) for i, piece in enumerate(pieces)
                          if (m := _UNUSED_PIECE.fullmatch(piece)))
        return [i for _, i in numbered]

    def _single_piece(self, token: str) -> int:
        ids = self._sp.encode(token)
        if len(ids) != 1 or ids[0] == self.unk_id:
            raise VocabularyError(
                f"mode token {token!r} is not a single piece of {self.model_file} (encodes to "
                f"{ids}); train the model with train_sentencepiece(..., mode_tokens=...) or use "
                "a model with reserved <unusedN> pieces")
        return ids[0]

    def _gemma_mode_ids(self, mode_tokens, unused: list[int], num_sentinels: int) -> dict:
        """Single-piece mode strings keep their id; the others take <unusedN> from the top."""
        sentinels = set(unused[:num_sentinels])
        single = {}
        for token in mode_tokens:
            ids = self._sp.encode(token)
            if len(ids) == 1 and ids[0] != self.unk_id and ids[0] not in sentinels:
                single[token] = ids[0]
        reserved = [t for t in mode_tokens if t not in single]
        if num_sentinels + len(reserved) > len(unused):
            raise VocabularyError(
                f"{self.model_file} has {len(unused)} <unusedN> pieces but {num_sentinels} "
                f"sentinels + {len(reserved)} mode tokens need {num_sentinels + len(reserved)}; "
                "lower num_sentinels")
        top_down = {t: unused[len(unused) - 1 - k] for k, t in enumerate(reserved)}
        return {t: single.get(t, top_down.get(t)) for t in mode_tokens}

    def _check_distinct(self) -> None:
        special = {self.pad_id, self.eos_id, self.bos_id, self.unk_id}
        modes = set(self._mode_ids.values())
        sentinels = set(self.sentinel_ids.tolist())
        if (len(special) != 4 or len(modes) != len(self.mode_tokens)
                or len(sentinels) != self.num_sentinels
                or special & modes or special & sentinels or modes & sentinels):
            raise VocabularyError(
                f"{self.model_file}: pad/eos/bos/unk {sorted(special)}, mode ids "
                f"{self._mode_ids} and sentinel ids must all be distinct")


def _load_processor(model_proto: bytes, model_file: str) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_proto)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with a terse message
        raise VocabularyError(f"{model_file} is not a sentencepiece model: {e}") from e
    return sp


def _training_lines(texts: Iterable[str]) -> list[str]:
    """Non-empty lines of `texts`, in order, up to MAX_TRAINING_CHARS characters."""
    lines, total = [], 0
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                lines.append(line)
                total += len(line)
                if total >= MAX_TRAINING_CHARS:
                    return lines
    return lines


def train_sentencepiece(texts: Iterable[str], model_prefix: str, *, vocab_size: int,
                        mode_tokens: Sequence[str] = DEFAULT_MODE_TOKENS,
                        user_defined_symbols: Sequence[str] = ()) -> str:
    """Train a BPE sentencepiece model on `texts`; returns the `<model_prefix>.model` path.

    Deterministic: the same texts and options give the same bytes (one thread, no sampling).
    Ids follow Gemma: pad 0, eos 1, bos 2, unk 3, then the mode tokens and `user_defined_symbols`
    as single pieces, then 256 byte pieces (byte fallback: any text encodes, nothing maps to unk).
    """
    symbols = list(dict.fromkeys([*mode_tokens, *user_defined_symbols]))
    smallest = 4 + len(symbols) + _BYTE_PIECES + 1
    if vocab_size < smallest:
        raise VocabularyError(f"vocab_size={vocab_size} is too small: 4 special ids, "
                              f"{len(symbols)} user symbols and {_BYTE_PIECES} byte pieces need "
                              f"at least {smallest}")
    lines = _training_lines(texts)
    if not lines:
        raise VocabularyError("train_sentencepiece got no text to train on")
    model = io.BytesIO()
    spm.set_random_generator_seed(_TRAINING_SEED)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
            **_SPECIAL_PIECES, user_defined_symbols=symbols, byte_fallback=True,
            add_dummy_prefix=False, remove_extra_whitespaces=False,
            normalization_rule_name="identity", split_digits=True,
            allow_whitespace_only_pieces=True, num_threads=1, input_sentence_size=0,
            shuffle_input_sentence=False, max_sentence_length=1 << 16, minloglevel=2)
    except RuntimeError as e:
        raise VocabularyError(f"sentencepiece training for {model_prefix}.model "
                              f"(vocab_size={vocab_size}, {len(lines)} lines) failed: {e}") from e
    path = model_prefix + ".model"
    write_atomically(path, model.getvalue())
    return path


def default_vocabulary(*, vocab_size: int, num_sentinels: int,
                       mode_tokens: Sequence[str] = DEFAULT_MODE_TOKENS,
                       cache_dir: str | None = None) -> Vocabulary:
    """A vocabulary trained on the embedded corpus, once; cached under the cache dir.

    The cache key covers vocab_size, the mode tokens, the corpus bytes, the training options and
    the sentencepiece version, so a change of any of them trains a new model.
    """
    corpus = embedded_corpus_path(cache_dir)
    with open(corpus, "rb") as f:
        corpus_bytes = f.read()
    key = json.dumps(dict(vocab_size=vocab_size, mode_tokens=list(mode_tokens),
                          corpus=hashlib.sha256(corpus_bytes).hexdigest(),
                          trainer=_TRAINER_VERSION, sentencepiece=spm.__version__))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    prefix = os.path.join(cache_root(cache_dir), "vocab", f"stdlib-bpe{vocab_size}-{digest}")
    if not os.path.exists(prefix + ".model"):
        train_sentencepiece(corpus_bytes.decode("utf-8").split("\n"), prefix,
                            vocab_size=vocab_size, mode_tokens=mode_tokens)
    return Vocabulary.from_file(prefix + ".model", num_sentinels=num_sentinels,
                                mode_tokens=mode_tokens)
