"""The UL2 training input pipeline on grain: documents -> tokens -> denoised chunks -> packed
batches in the encoder-decoder contract (see `packing.py`).

Stages, per data shard (by default one per JAX process; see "Shards" below):
1. documents (a random-access `Sequence[str]`) -> `MapDataset.source` -> `.shuffle(seed)` ->
   `.repeat()` (each epoch reshuffled) -> `[process_index::process_count]`: shards take
   alternate documents of one global order, so their shares are disjoint and together are exactly
   what a single shard would read -> tokenize, EOS appended as the document separator
   (`document_tokens`);
2. `.to_iter_dataset()`, then, with `num_workers > 0`, `.mp_prefetch(...)`: worker processes read
   and tokenize (the costly, stateless part). Grain hands worker w the documents w, w+N, ... and
   interleaves them round-robin, so the token stream is the same for any worker count;
3. `DenoisedChunks` (in the consuming process): example k draws its denoiser and its noise from
   `np.random.default_rng([seed, process_index, k])`, takes exactly `raw_length(denoiser)` tokens
   from the concatenated token stream (documents longer than a chunk continue into the next
   chunk, short ones share a chunk; nothing is dropped) and denoises them;
4. `FirstFitPackIterDataset` to (encoder_length, decoder_length), or one padded example per row
   with `pack=False` -> `.batch(global batch / shards)` -> `to_batch_contract`.

Because only stateless work runs in the workers, batches are identical for any `num_workers`
(tests/test_pipeline.py checks 0 against 2). A saved state, however, records the reader's
position in a form that depends on the worker count (grain keeps one position per worker), so
it restores only into a pipeline with the same `num_workers`; `Ul2Source.set_state` checks that.

Every state is small and JSON-able: `DenoisedChunks` stores the reader's state at the first
document it still buffers plus an offset into it, never the buffered tokens.

Shards: stages 1-4 run once per data shard v of S, with `process_index=v, process_count=S`, and
shard v makes rows [v B/S, (v+1) B/S) of every global batch of B rows. S is `shards`, or by
default the JAX process count at the run's first start; the run's saved states record it, so a
resumed run keeps it whatever the process count is then. JAX process q of P feeds rows
[q B/P, (q+1) B/P): it runs the shards overlapping those rows and takes its rows from them
(`shard_rows`). With P = S that is one shard per process, exactly as without shards; with fewer
processes each runs several shards; with more, processes share a shard (each runs it whole and
keeps its rows: the tokenizing work per process is then that of B/S rows, not B/P). The global
batches are therefore the same for any process count, and a position saved by S' processes
continues exactly on any other count (`Ul2Source.restore_position`).

Where the time goes (16384/16384, measured on a 2-core CPU): tokenizing is ~75% of the work,
denoising, packing and batching little, hence tokenizing in workers and denoising in the
consumer. Sentencepiece releases the GIL, so `read_threads` already tokenize in parallel inside
one process; worker processes pay a per-document transfer and help only with spare cores.
Packing density: `raw_length` sizes every span example to fill the encoder and every
T5Gemma 2 S example to fill the decoder, so at equal lengths first-fit almost never puts two
examples in one row (t5gemma2 mixture: 1.00 examples per row, 64% of encoder and 88% of decoder
positions real).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from t5g2.configlib import ConfigError, build, to_dict
from t5g2.data.denoisers import (Mixture, denoise, mixture_from_config, raw_length,
                                 sample_denoiser, spans_needed)
from t5g2.data.packing import pad_example, to_batch_contract
from t5g2.data.sources import Documents, open_documents
from t5g2.data.vocab import DEFAULT_MODE_TOKENS, Vocabulary, default_vocabulary

log = logging.getLogger(__name__)

STATE_FORMAT = 2  # 1: one pipeline per process, read as shard process_index of process_count


class PipelineConfigError(ConfigError):
    """The pipeline configuration cannot work; the message names the field and the value."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything that decides the batches (and, for num_workers/buffers, only the speed).

    Documents: `source_kind` ("embedded", "text", "jsonl", "parquet", "arrayrecord"),
    `source_paths` (paths or globs), `source_field` (JSON key / Parquet column), `on_bad`
    ("error" or "skip": see `sources.open_documents`).
    Vocabulary: `vocab_model_file` (a sentencepiece .model; None trains `default_vocabulary` of
    `vocab_size` on the embedded corpus), `num_sentinels` (None: exactly what the mixture needs
    at these lengths), `mode_tokens` (None: the mixture's own mode tokens).
    Denoising: `mixture` (a preset name or a list of denoiser dicts, see
    `denoisers.mixture_from_config`), `encoder_length`, `decoder_length`.
    Batching: `batch_size` (global, split evenly over JAX processes), `pack` (False: one example
    per row, padded), `packing_bins` (examples are packed into this many rows at a time; None:
    the local batch size).
    Order: `shards` (the data shards that make the global batch, see the module docstring;
    None: the JAX process count at the run's first start, then what its checkpoints recorded).
    Speed only: `num_workers` (tokenizing processes; 0 = in the calling process),
    `worker_buffer_size`, `read_threads`, `read_buffer_size`; `index_dir` (where text/JSONL
    document indexes are cached: a dir or bucket URI all hosts share; None: under `cache_dir`)
    and `index_workers` (processes scanning uncached files; None: one per core for large
    corpora, see `index.PARALLEL_FROM_BYTES`).
    """

    source_kind: str = "embedded"
    source_paths: tuple[str, ...] = ()
    source_field: str | None = None
    on_bad: str = "error"
    vocab_model_file: str | None = None
    vocab_size: int = 4096
    num_sentinels: int | None = None
    mode_tokens: tuple[str, ...] | None = None
    mixture: Any = "t5gemma2"
    encoder_length: int = 512
    decoder_length: int = 512
    batch_size: int = 8
    seed: int = 0
    pack: bool = True
    packing_bins: int | None = None
    shards: int | None = None
    num_workers: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 2
    read_buffer_size: int = 32
    cache_dir: str | None = None
    index_dir: str | None = None
    index_workers: int | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "PipelineConfig":
        """From a dict or ml_collections ConfigDict (the run config's `data.ul2` completed by
        the lengths, batch and seed); an unknown key is a ConfigError naming it."""
        values = to_dict(values)
        for key in ("source_paths", "mode_tokens"):
            if isinstance(values.get(key), (list, tuple)):
                values[key] = tuple(values[key])
        return build(cls, values, "data.ul2")

    def validate(self, process_count: int = 1) -> None:
        """Raise PipelineConfigError naming the first bad field."""
        def positive(name, minimum=1):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise PipelineConfigError(f"{name}={value!r} must be an integer >= {minimum}")

        for name in ("encoder_length", "decoder_length", "batch_size", "vocab_size",
                     "worker_buffer_size", "read_buffer_size"):
            positive(name)
        for name in ("num_workers", "read_threads", "seed"):
            positive(name, minimum=0)
        if self.packing_bins is not None:
            positive("packing_bins")
        if self.index_workers is not None:
            positive("index_workers", minimum=0)
        if self.shards is not None:
            positive("shards")
            if self.batch_size % self.shards:
                raise PipelineConfigError(f"batch_size={self.batch_size} (global) is not "
                                          f"divisible by shards={self.shards}")
        if self.num_sentinels is not None:
            positive("num_sentinels", minimum=0)
        if isinstance(process_count, bool) or not isinstance(process_count, int) \
                or process_count < 1:
            raise PipelineConfigError(f"process_count={process_count!r} must be an integer >= 1")
        if self.batch_size % process_count:
            raise PipelineConfigError(
                f"batch_size={self.batch_size} (global) is not divisible by the "
                f"{process_count} JAX processes; use a multiple of {process_count}")
        if not isinstance(self.source_paths, tuple):
            raise PipelineConfigError(f"source_paths={self.source_paths!r} must be a tuple of "
                                      "paths or globs")
        if not isinstance(self.pack, bool):
            raise PipelineConfigError(f"pack={self.pack!r} must be True or False")

    def local_batch_size(self, process_count: int) -> int:
        return self.batch_size // process_count

    def describe(self) -> dict[str, Any]:
        """The fields as JSON values (for states and logs)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


# ----------------------------------------------------------------------------- token stream

@dataclasses.dataclass(frozen=True)
class _Tokenize:
    """Document text -> int32 token ids with EOS appended (picklable for worker processes)."""
    vocab: Vocabulary

    def __call__(self, text: str) -> np.ndarray:
        return np.append(self.vocab.encode(text), np.int32(self.vocab.eos_id)).astype(np.int32)


def document_tokens(documents: Sequence[str], vocab: Vocabulary, *, seed: int,
                    process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """This process's endless stream of tokenized documents (each ends with EOS), in order.

    The global order shuffles the documents anew each epoch; process p reads positions
    p, p + process_count, ... of it.
    """
    if not len(documents):
        raise PipelineConfigError("no documents to read")
    if not 0 <= process_index < process_count:
        raise PipelineConfigError(f"process_index={process_index} is not in "
                                  f"[0, process_count={process_count})")
    ds = grain.MapDataset.source(documents).shuffle(seed=seed).repeat()
    return ds[process_index::process_count].map(_Tokenize(vocab))


# ---------------------------------------------------------------------- denoised chunks stage

@dataclasses.dataclass(frozen=True)
class _DenoiseSpec:
    """What `DenoisedChunks` needs, resolved once: per denoiser its raw length and mode id."""
    mixture: Mixture
    raw_lengths: tuple[int, ...]
    mode_ids: tuple[int | None, ...]
    sentinel_ids: np.ndarray
    eos_id: int
    seed: int
    process_index: int
    encoder_length: int
    decoder_length: int


class DenoisedChunks(grain.IterDataset):
    """Cuts a stream of token arrays into one raw chunk per example and denoises each chunk.

    Example k uses `np.random.default_rng([seed, process_index, k])`: first to pick its denoiser
    from the mixture, then for the noise. Checkpointable with a small JSON state.
    """

    def __init__(self, parent: grain.IterDataset, spec: _DenoiseSpec):
        super().__init__(parent)
        self._spec = spec

    def __iter__(self) -> "_DenoisedChunksIterator":
        return _DenoisedChunksIterator(self._parent.__iter__(), self._spec)

    def __str__(self) -> str:
        return f"DenoisedChunks(denoisers={[d.name for d in self._spec.mixture.denoisers]})"


class _DenoisedChunksIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, spec: _DenoiseSpec):
        super().__init__(parent)
        self._spec = spec
        self._example = 0          # index k of the next example
        self._documents = 0        # documents fully consumed
        self._tokens = 0           # tokens consumed (EOS separators included)
        self._buffer: collections.deque[tuple[Any, np.ndarray]] = collections.deque()
        self._offset = 0           # tokens of the first buffered document already consumed
        self._available = 0        # buffered tokens not yet consumed

    def _take(self, n: int) -> np.ndarray:
        """The next n tokens of the stream, reading documents as needed."""
        while self._available < n:
            state = self._parent.get_state()
            tokens = next(self._parent)
            self._buffer.append((state, tokens))
            self._available += len(tokens)
        chunk = np.empty(n, np.int32)
        filled = 0
        while filled < n:
            tokens = self._buffer[0][1]
            m = min(n - filled, len(tokens) - self._offset)
            chunk[filled:filled + m] = tokens[self._offset:self._offset + m]
            filled += m
            self._offset += m
            if self._offset == len(tokens):
                self._buffer.popleft()
                self._offset = 0
                self._documents += 1
        self._available -= n
        self._tokens += n
        return chunk

    def __next__(self) -> dict[str, np.ndarray]:
        spec = self._spec
        rng = np.random.default_rng([spec.seed, spec.process_index, self._example])
        i = sample_denoiser(spec.mixture, rng)
        denoiser = spec.mixture.denoisers[i]
        chunk = self._take(spec.raw_lengths[i])
        example = denoise(chunk, denoiser, rng, sentinel_ids=spec.sentinel_ids,
                          eos_id=spec.eos_id, mode_id=spec.mode_ids[i])
        for side, limit in (("inputs", spec.encoder_length), ("targets", spec.decoder_length)):
            if len(example[side]) > limit:
                raise AssertionError(
                    f"denoiser {denoiser.name} made {side} of {len(example[side])} tokens from "
                    f"{len(chunk)} raw tokens, over the {side} length {limit}: raw_length and "
                    f"denoise disagree (example {self._example})")
        self._example += 1
        return {"inputs": example["inputs"], "targets": example["targets"]}

    def get_state(self) -> dict[str, Any]:
        parent = self._buffer[0][0] if self._buffer else self._parent.get_state()
        return {"parent": parent, "offset": self._offset, "example": self._example,
                "documents": self._documents, "tokens": self._tokens}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._buffer.clear()
        self._offset = int(state["offset"])
        self._available = -self._offset  # the first document read is consumed up to offset
        self._example = int(state["example"])
        self._documents = int(state["documents"])
        self._tokens = int(state["tokens"])

    def __str__(self) -> str:
        return "DenoisedChunksIterator"


# ---------------------------------------------------------------------------- the dataset

def raw_lengths(mixture: Mixture, encoder_length: int, decoder_length: int) -> tuple[int, ...]:
    """Raw tokens one example of each denoiser takes; PipelineConfigError if one cannot fit."""
    lengths = []
    for d in mixture.denoisers:
        try:
            lengths.append(raw_length(d, encoder_length, decoder_length))
        except ValueError as e:
            raise PipelineConfigError(f"encoder_length={encoder_length}, decoder_length="
                                      f"{decoder_length}: {e}") from e
    return tuple(lengths)


def sentinels_needed(mixture: Mixture, encoder_length: int, decoder_length: int) -> int:
    """The most sentinels one example of any denoiser of the mixture can need."""
    raw_lengths(mixture, encoder_length, decoder_length)  # a clear error first
    return max(spans_needed(d, encoder_length, decoder_length) for d in mixture.denoisers)


def _denoise_spec(cfg: PipelineConfig, vocab: Vocabulary, mixture: Mixture,
                  process_index: int) -> _DenoiseSpec:
    lengths = raw_lengths(mixture, cfg.encoder_length, cfg.decoder_length)
    needed = sentinels_needed(mixture, cfg.encoder_length, cfg.decoder_length)
    vocab.require_sentinels(needed, f"mixture {[d.name for d in mixture.denoisers]} at "
                                    f"encoder_length={cfg.encoder_length}, decoder_length="
                                    f"{cfg.decoder_length}")
    mode_ids = tuple(None if d.mode_token is None else vocab.mode_id(d.mode_token)
                     for d in mixture.denoisers)
    return _DenoiseSpec(mixture=mixture, raw_lengths=lengths, mode_ids=mode_ids,
                        sentinel_ids=np.asarray(vocab.sentinel_ids, np.int32),
                        eos_id=vocab.eos_id, seed=cfg.seed, process_index=process_index,
                        encoder_length=cfg.encoder_length, decoder_length=cfg.decoder_length)


def _allow_grain_workers() -> None:
    """Grain's worker processes read absl flags; outside an absl app they were never parsed."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # every flag keeps its default


def read_in_workers(ds: grain.MapDataset, cfg: Any) -> grain.IterDataset:
    """`ds` read with `cfg.read_threads` threads and `cfg.read_buffer_size` elements ahead, its
    map work done in `cfg.num_workers` worker processes (0: in this one) with
    `cfg.worker_buffer_size` elements each: the stateless, costly part of a pipeline."""
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=cfg.read_buffer_size))
    if cfg.num_workers:
        _allow_grain_workers()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size))
    return ds


def make_dataset(cfg: PipelineConfig, documents: Sequence[str], vocab: Vocabulary,
                 mixture: Mixture, *, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
    """Data shard `process_index` of `process_count`: its rows of every global batch (the batch
    contract, [batch_size / process_count, length]). Without `shards` a shard is a process."""
    rows = make_rows(cfg, documents, vocab, mixture, process_index=process_index,
                     process_count=process_count)
    return rows.batch(cfg.local_batch_size(process_count), drop_remainder=True).map(
        functools.partial(to_batch_contract, start_id=vocab.bos_id))


def make_rows(cfg: PipelineConfig, documents: Sequence[str], vocab: Vocabulary,
              mixture: Mixture, *, process_index: int = 0,
              process_count: int = 1) -> grain.IterDataset:
    """Stages 1-4 of data shard `process_index` up to the rows: packed (or padded) examples in
    grain's packed layout (see `packing.py`), one row at a time, before batching."""
    cfg.validate(process_count)
    spec = _denoise_spec(cfg, vocab, mixture, process_index)
    ds = read_in_workers(document_tokens(documents, vocab, seed=cfg.seed,
                                         process_index=process_index,
                                         process_count=process_count), cfg)
    ds = DenoisedChunks(ds, spec)
    local_batch = cfg.local_batch_size(process_count)
    lengths = {"inputs": cfg.encoder_length, "targets": cfg.decoder_length}
    if cfg.pack:
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct=lengths, num_packing_bins=cfg.packing_bins or local_batch,
            seed=cfg.seed, shuffle_bins=True)
    else:
        ds = ds.map(functools.partial(pad_example, encoder_length=cfg.encoder_length,
                                      decoder_length=cfg.decoder_length))
    return ds


# ------------------------------------------------------------------------------- the source

def open_vocabulary(cfg: PipelineConfig, mixture: Mixture) -> Vocabulary:
    """The configured vocabulary, with enough sentinels and the mixture's mode tokens."""
    num_sentinels = cfg.num_sentinels
    if num_sentinels is None:
        num_sentinels = sentinels_needed(mixture, cfg.encoder_length, cfg.decoder_length)
    mode_tokens = cfg.mode_tokens
    if mode_tokens is None:
        mode_tokens = tuple(dict.fromkeys(d.mode_token for d in mixture.denoisers
                                          if d.mode_token is not None)) or DEFAULT_MODE_TOKENS
    if cfg.vocab_model_file:
        return Vocabulary.from_file(cfg.vocab_model_file, num_sentinels=num_sentinels,
                                    mode_tokens=mode_tokens)
    return default_vocabulary(vocab_size=cfg.vocab_size, num_sentinels=num_sentinels,
                              mode_tokens=mode_tokens, cache_dir=cfg.cache_dir)


def open_configured_documents(cfg: PipelineConfig) -> Documents:
    return open_documents(cfg.source_kind, cfg.source_paths, field=cfg.source_field,
                          on_bad=cfg.on_bad, cache_dir=cfg.cache_dir, index_dir=cfg.index_dir,
                          index_workers=cfg.index_workers)


def shard_rows(batch_size: int, shards: int, process_index: int, process_count: int
               ) -> list[tuple[int, slice]]:
    """[(shard, rows of that shard's batch)] that make process `process_index`'s rows, in order.

    Shard v makes the global rows [v B/shards, (v+1) B/shards), process q of P feeds
    [q B/P, (q+1) B/P) (B = batch_size, divisible by both)."""
    per_shard, per_process = batch_size // shards, batch_size // process_count
    first, end = process_index * per_process, (process_index + 1) * per_process
    return [(v, slice(max(first, v * per_shard) - v * per_shard,
                      min(end, (v + 1) * per_shard) - v * per_shard))
            for v in range(first // per_shard, (end - 1) // per_shard + 1)]


class Ul2Source:
    """What the training loop consumes: an iterator of host-local batches with a JSON state.

    Anything not given is built from `cfg`. `process_index`/`process_count` default to JAX's.
    The data shards are `cfg.shards` (None: `process_count`) until a restored state brings the
    shard count it was saved with.
    """

    def __init__(self, cfg: PipelineConfig, *, documents: Sequence[str] | None = None,
                 vocab: Vocabulary | None = None, mixture: Mixture | None = None,
                 process_index: int | None = None, process_count: int | None = None):
        if process_index is None or process_count is None:
            import jax  # only to ask which process this is
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        cfg.validate(process_count)
        self.cfg = cfg
        self.mixture = mixture if mixture is not None else mixture_from_config(cfg.mixture)
        self.documents = documents if documents is not None else open_configured_documents(cfg)
        self.vocab = vocab if vocab is not None else open_vocabulary(cfg, self.mixture)
        self.process_index, self.process_count = process_index, process_count
        self._iterators: dict[int, grain.DatasetIterator] = {}
        self._open(cfg.shards or process_count)

    def _open(self, shards: int) -> None:
        """Starts this process's part of `shards` data shards from their beginning."""
        self.close()
        self.shards = shards
        self._rows = shard_rows(self.cfg.batch_size, shards, self.process_index,
                                self.process_count)
        self._iterators = {v: iter(self._shard_dataset(v, shards)) for v, _ in self._rows}

    def _shard_dataset(self, shard: int, shards: int) -> grain.IterDataset:
        """Data shard `shard` of `shards` (a subclass mixes other rows in, see image_text.py)."""
        return make_dataset(self.cfg, self.documents, self.vocab, self.mixture,
                            process_index=shard, process_count=shards)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [(next(self._iterators[v]), rows) for v, rows in self._rows]
        if len(parts) == 1:
            batch, rows = parts[0]
            return {k: v[rows] for k, v in batch.items()}
        return {k: np.concatenate([batch[k][rows] for batch, rows in parts])
                for k in parts[0][0]}

    def _identity(self) -> dict[str, Any]:
        """What a state is only valid for: the config and the data it reads."""
        return dict(config=self.cfg.describe(), documents=len(self.documents),
                    vocab_size=self.vocab.size, mixture=repr(self.mixture))

    def get_state(self) -> dict[str, Any]:
        """A JSON-able dict: restoring it continues with exactly the next batch. It holds the
        position of each shard this process runs and the run's shard count."""
        return dict(format=STATE_FORMAT, **self._identity(), shards=self.shards,
                    positions={str(v): self._iterators[v].get_state() for v, _ in self._rows})

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from `state` (this process's saved state, or any holding its shards)."""
        self.restore_position([state])

    def restore_position(self, states: Sequence[Mapping[str, Any]]) -> None:
        """Continues the global position that `states` record, on this process count.

        states: what the processes of the saving run recorded, however many there were (or any
        of them holding the shards this process needs). The shard count is the saved one, so the
        next global batch is exactly the one the saving run would have made next. ValueError
        names what does not fit: another pipeline, a `shards` setting, a missing shard.
        """
        states = [_current_format(s) for s in states]
        for state in states:
            self._check_same_pipeline(state)
        counts = sorted({int(s["shards"]) for s in states})
        if len(counts) != 1:
            raise ValueError(f"the saved states disagree on the number of data shards: {counts}")
        shards = counts[0]
        if self.cfg.shards is not None and self.cfg.shards != shards:
            raise ValueError(f"shards={self.cfg.shards}, but this run's data order was saved "
                             f"with {shards} shards; set shards={shards} (or leave it unset) to "
                             "continue it")
        positions: dict[int, Any] = {}
        for state in states:
            for v, position in state["positions"].items():
                if positions.setdefault(int(v), position) != position:
                    raise ValueError(f"the saved states hold different positions of data shard "
                                     f"{v} (processes that share a shard run it in lockstep)")
        needed = [v for v, _ in shard_rows(self.cfg.batch_size, shards, self.process_index,
                                           self.process_count)]
        missing = [v for v in needed if v not in positions]
        if missing:
            raise ValueError(f"process {self.process_index} of {self.process_count} needs data "
                             f"shard(s) {missing} of {shards}; the saved states hold "
                             f"{sorted(positions)}")
        if shards != self.shards:
            self._open(shards)
            if self.process_count > shards:
                log.warning("%d processes feed the %d data shards this run's order was saved "
                            "with: each process runs a whole shard and keeps its rows, so it "
                            "makes %.3gx the rows it trains on (--config.data.ul2.shards sets "
                            "the shard count of a new run)", self.process_count, shards,
                            len(self._rows) * self.process_count / shards)
        for v, iterator in self._iterators.items():
            iterator.set_state(positions[v])

    def _check_same_pipeline(self, state: Mapping[str, Any]) -> None:
        mine = self._identity()
        config = mine.pop("config")
        changed = [f"{k}={state['config'].get(k)!r} (now {v!r})" for k, v in config.items()
                   if k not in _SPEED_ONLY | {"shards"} and state["config"].get(k) != v]
        changed += [f"{k}={state.get(k)!r} (now {v!r})" for k, v in mine.items()
                    if state.get(k) != v]
        changed += [f"{k}={state[k]!r} (now not set)" for k in sorted(  # e.g. image_text
            set(state) - set(mine) - {"format", "config", "shards", "positions"})]
        if state["config"].get("num_workers") != config["num_workers"]:
            changed.append(f"num_workers={state['config'].get('num_workers')!r} (now "
                           f"{config['num_workers']!r}; grain's saved reader position is per "
                           "worker)")
        if changed:
            raise ValueError("this pipeline state was saved by a different pipeline: "
                             + "; ".join(changed))

    def consumed(self) -> dict[str, int]:
        """Documents and tokens this process's shards consumed so far (as of the last
        restorable position)."""
        counts = [_find_counts(it.get_state()) for it in self._iterators.values()]
        return {k: sum(c[k] for c in counts) for k in counts[0]}

    def close(self) -> None:
        """Stops grain's worker processes, if any."""
        for iterator in self._iterators.values():
            iterator.close()


def _current_format(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """`state` in STATE_FORMAT; a format-1 state is one process's pipeline, which is shard
    `process_index` of `process_count`."""
    if state.get("format") == 1:
        old = state
        state = {k: v for k, v in old.items()
                 if k not in ("process_index", "process_count", "iterator")}
        state.update(format=STATE_FORMAT, shards=old["process_count"],
                     positions={str(old["process_index"]): old["iterator"]})
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"pipeline state format {state.get('format')!r}; this version reads "
                         f"{STATE_FORMAT}")
    return state


# Fields that change only the speed; num_workers is checked separately (state layout).
_SPEED_ONLY = frozenset({"num_workers", "worker_buffer_size", "read_threads",
                         "read_buffer_size", "cache_dir", "index_dir", "index_workers"})


def _find_counts(state: Any) -> dict[str, int]:
    """The DenoisedChunks counters inside a nested grain state."""
    while isinstance(state, dict):
        if "documents" in state and "tokens" in state and "example" in state:
            return dict(examples=state["example"], documents=state["documents"],
                        tokens=state["tokens"])
        state = state.get("parent")
    raise ValueError("no DenoisedChunks state found")
