"""Image-text examples trained as prefix LM, mixed row by row into the UL2 text rows.

An example is one JSONL line or Parquet row with three fields (names configurable):
* `text`: the prompt, holding the marker `<start_of_image>` once per image, where the image goes;
* `images`: a list of images, each a path (a relative path is resolved against the data file's
  directory; absolute paths and bucket URIs are read as they are), or, in Parquet, the image's
  bytes; in either format an object `{"bytes": ..., "path": ...}` (Hugging Face datasets'
  Image feature: bytes when not null, else path; in JSONL the bytes are base64);
* `target`: the text the decoder learns to produce.
The encoder reads `text` with each marker replaced by the image's token block (see `images.py`:
"\\n\\n", begin-of-image, T placeholders, end-of-image, "\\n\\n"), then EOS (preceded by the id
of `mode_token`, when one is set); the decoder target is `target` then EOS, as the UL2
denoisers lay out their examples. An example fills one row alone (image rows are not packed),
padded to the encoder and decoder lengths; its images go to `encoder_images` [M, S, S, 3]
(M = `max_images`, trailing slots zero).

Bad input, per `on_bad`: "error" raises at the first problem (ImageError for an image,
SourceError for the rest), naming the file, the record and the problem; "skip" leaves the
example out and counts it by reason (`ImageTextSource.consumed()`; the first few are logged):
an image's `images.FILE_REASONS` (missing_image, unreadable_image, empty_image, corrupt_image,
image_too_large), bad_record (a field missing or of the wrong type, a marker in the target),
too_many_images (over `max_images`), too_long (over the encoder or decoder length). A text
whose markers do not match its images always raises (ImageError "image_count"), as the
reference processor does: that is a dataset bug, not a bad file.

Order and sharding: the records are shuffled by the seed and repeated, each epoch reshuffled;
data shard v of S reads records v, v+S, ... of that order (as `pipeline.document_tokens` does
with documents). Reading, image decoding, preprocessing and tokenizing run in grain worker
processes (`num_workers`); the skip accounting and the mixing run in the consuming process, so
the rows are the same for any worker count. Row k of shard v is an image-text row when
`np.random.default_rng([seed, v, k, 1]).random() < rate`, else the shard's next UL2 row
(packed as the UL2 pipeline packs); rows are then batched, UL2 rows with all-zero image slots.
The state is small JSON: the mixer's row count, the skip counts and each branch's grain state.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import functools
import json
import logging
import posixpath
import threading
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from t5g2 import fs
from t5g2.configlib import ConfigError, build, to_dict
from t5g2.data import images as image_io
from t5g2.data.packing import PACKED_KEYS, pad_example, to_batch_contract
from t5g2.data.pipeline import (PipelineConfig, Ul2Source, _find_counts, make_rows,
                                read_in_workers)
from t5g2.data.sources import Documents, SourceError, open_documents
from t5g2.data.vocab import Vocabulary

log = logging.getLogger(__name__)

KINDS = ("jsonl", "parquet")
_MIX_STREAM = 1  # the last entry of the mixer's rng key: apart from the denoisers' streams
_LOGGED_SKIPS = 5


@dataclasses.dataclass(frozen=True)
class ImageTextConfig:
    """The run config's `data.image_text` (see the module docstring).

    Off while `paths` is empty. `kind` ("jsonl" or "parquet") and `paths` (paths or globs);
    the fields `text_field`, `images_field`, `target_field`; `rate`: the fraction of rows that
    are image-text, in (0, 1]; `max_images`: image slots per row (M); `mode_token`: prepended
    to the encoder input when set (a mode token of the vocabulary, e.g. "[S]"); `on_bad`.
    Speed only: `num_workers` (image-decoding processes; 0: in the calling process),
    `worker_buffer_size`, `read_threads`, `read_buffer_size`.
    """

    kind: str = "jsonl"
    paths: tuple[str, ...] = ()
    text_field: str = "text"
    images_field: str = "images"
    target_field: str = "target"
    rate: float = 0.0
    max_images: int = 1
    mode_token: str | None = None
    on_bad: str = "error"
    num_workers: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 2
    read_buffer_size: int = 4

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ImageTextConfig":
        values = to_dict(values)
        if isinstance(values.get("paths"), (list, tuple)):
            values["paths"] = tuple(values["paths"])
        if isinstance(values.get("rate"), int) and not isinstance(values.get("rate"), bool):
            values["rate"] = float(values["rate"])
        return build(cls, values, "data.image_text")

    @property
    def enabled(self) -> bool:
        return bool(self.paths)

    def validate(self) -> None:
        """ConfigError naming the first bad field."""
        def integer(name, minimum):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"data.image_text.{name}={value!r} must be an integer >= "
                                  f"{minimum}")

        if not isinstance(self.paths, tuple) or not all(
                isinstance(p, str) and p for p in self.paths):
            raise ConfigError(f"data.image_text.paths={self.paths!r} must be a tuple of paths "
                              "or globs")
        if self.kind not in KINDS:
            raise ConfigError(f"data.image_text.kind={self.kind!r}; valid: {', '.join(KINDS)}")
        for name in ("text_field", "images_field", "target_field"):
            if not (isinstance(getattr(self, name), str) and getattr(self, name)):
                raise ConfigError(f"data.image_text.{name}={getattr(self, name)!r} must be a "
                                  "non-empty string")
        fields = (self.text_field, self.images_field, self.target_field)
        if len(set(fields)) != 3:
            raise ConfigError(f"data.image_text: text_field, images_field and target_field "
                              f"{fields} must be three different fields")
        rate = self.rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ConfigError(f"data.image_text.rate={rate!r} must be a fraction in [0, 1]")
        if self.enabled and rate == 0:
            raise ConfigError(f"data.image_text.paths={list(self.paths)} is set but "
                              "data.image_text.rate=0: set the fraction of rows that are "
                              "image-text, e.g. --config.data.image_text.rate=0.2")
        integer("max_images", 1)
        for name in ("worker_buffer_size", "read_buffer_size"):
            integer(name, 1)
        for name in ("num_workers", "read_threads"):
            integer(name, 0)
        if self.mode_token is not None and not (isinstance(self.mode_token, str)
                                                and self.mode_token):
            raise ConfigError(f"data.image_text.mode_token={self.mode_token!r} must be a "
                              "non-empty string or None")
        if self.on_bad not in ("error", "skip"):
            raise ConfigError(f"data.image_text.on_bad={self.on_bad!r}; valid: error, skip")

    def describe(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """What the model fixes about its image inputs: the square size S, T placeholders per
    image and the begin-of-image / placeholder / end-of-image ids."""

    image_size: int
    tokens_per_image: int
    boi_id: int
    image_id: int
    eoi_id: int

    @classmethod
    def from_model(cls, model_cfg) -> "ImageSpec":
        """From a ModelConfig; ConfigError when the model reads no images."""
        vision = getattr(model_cfg, "vision", None)
        if vision is None:
            raise ConfigError("data.image_text.paths is set but model.vision is None: a "
                              "text-only model reads no images; configure model.vision, or "
                              "clear data.image_text.paths")
        return cls(image_size=vision.image_size, tokens_per_image=vision.tokens_per_image,
                   boi_id=model_cfg.boi_token_id, image_id=model_cfg.image_token_id,
                   eoi_id=model_cfg.eoi_token_id)


# ------------------------------------------------------------------------------- records

class _Skip(Exception):
    """A bad example: counted under `reason` with on_bad="skip", else `error` is raised."""

    def __init__(self, reason: str, error: Exception):
        super().__init__(str(error))
        self.reason, self.error = reason, error


@dataclasses.dataclass(frozen=True)
class Record:
    """One example as read: its text, target, image items and where it is (for messages)."""
    text: Any
    target: Any
    images: Any
    where: str
    directory: str  # the data file's directory, for relative image paths


class ImageTextRecords(Sequence[Record]):
    """Random access to the examples of JSONL or Parquet files, on the document index of
    `sources.open_documents` (indexed on the text field); picklable for worker processes."""

    def __init__(self, cfg: ImageTextConfig, documents: Documents):
        self.cfg, self.documents = cfg, documents
        self._ends = np.cumsum([len(f) for f in documents.files], dtype=np.int64)
        self._parquet_columns = (cfg.text_field, cfg.images_field, cfg.target_field)
        self._groups: dict[int, collections.OrderedDict] = {}
        self._readers: dict[int, Any] = {}
        self._lock = threading.Lock()
        if documents.kind == "parquet":
            for f in documents.files:
                _check_parquet_columns(f.path, self._parquet_columns)

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> Record:
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        f = int(np.searchsorted(self._ends, i, side="right"))
        local = i - (int(self._ends[f - 1]) if f else 0)
        file = self.documents.files[f]
        directory = posixpath.dirname(str(file.path)) or "."
        if self.documents.kind == "jsonl":
            start = int(file.starts[local])
            where = f"{file.path}: record {local + 1} (byte {start})"
            value = json.loads(file.raw(local))  # the index checked it is a JSON object
        else:
            where = f"{file.path}: row {local}"
            value = self._parquet_row(f, file, local)
        cfg = self.cfg
        return Record(value.get(cfg.text_field), value.get(cfg.target_field, _MISSING),
                      value.get(cfg.images_field), where, directory)

    def _parquet_row(self, f: int, file, local: int) -> dict:
        """Row `local` of Parquet file f (its row group read whole, the last few cached)."""
        group = int(np.searchsorted(file.group_starts, local, side="right")) - 1
        with self._lock:
            cache = self._groups.setdefault(f, collections.OrderedDict())
            if group not in cache:
                if f not in self._readers:
                    from t5g2.data.sources import _parquet_reader
                    self._readers[f] = _parquet_reader(file.path)
                table = self._readers[f].read_row_group(group, columns=list(
                    self._parquet_columns))
                cache[group] = table.to_pylist()
                if len(cache) > 2:
                    cache.popitem(last=False)
            return cache[group][local - int(file.group_starts[group])]

    def __getstate__(self):
        return dict(self.__dict__, _groups={}, _readers={}, _lock=None)

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


_MISSING = object()


def _check_parquet_columns(path: str, columns: Sequence[str]) -> None:
    from t5g2.data.sources import _parquet_reader
    names = _parquet_reader(path).schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise SourceError(f"{path}: no column {missing[0]!r} (columns: "
                          f"{', '.join(map(repr, names))}); set data.image_text's text_field, "
                          "images_field and target_field to this file's columns")


def open_records(cfg: ImageTextConfig, *, cache_dir: str | None = None,
                 index_dir: str | None = None, index_workers: int | None = None
                 ) -> ImageTextRecords:
    """The configured files' examples (JSONL indexed and cached like the UL2 documents)."""
    cfg.validate()
    documents = open_documents(cfg.kind, cfg.paths, field=cfg.text_field, on_bad=cfg.on_bad,
                               cache_dir=cache_dir, index_dir=index_dir,
                               index_workers=index_workers)
    return ImageTextRecords(cfg, documents)


def image_bytes(item: Any, record: Record, k: int) -> tuple[bytes, str]:
    """The encoded bytes of image k of `record` (read from its path, or given inline) and where
    they come from, for messages."""
    where = f"{record.where}: image {k}"
    inline = isinstance(item, (bytes, bytearray))
    if isinstance(item, dict):
        data, path = item.get("bytes"), item.get("path")
        if data is None and path is None:
            raise SourceError(f"{where} is an object with neither 'bytes' nor 'path'")
        item, inline = (data, True) if data is not None else (path, False)
        if isinstance(item, str) and inline:  # JSONL: base64
            try:
                return base64.b64decode(item, validate=True), f"{where} (inline bytes)"
            except (binascii.Error, ValueError) as e:
                raise SourceError(f"{where}: 'bytes' is not base64 ({e})") from e
    if inline and isinstance(item, (bytes, bytearray)):
        return bytes(item), f"{where} (inline bytes)"
    if isinstance(item, str) and item:
        path = item if (fs.is_remote(item) or posixpath.isabs(item)) else fs.join(
            record.directory, item)
        try:
            return image_io.read_image_bytes(path), f"{where} ({path})"
        except image_io.ImageError as e:
            raise image_io.ImageError(f"{where}: {e}", e.reason, f"{where} ({path})",
                                      e.problem) from None
    raise SourceError(f"{where} is {type(item).__name__} {str(item)[:40]!r}, not a path, bytes "
                      "or an object with 'bytes' or 'path'")


# ------------------------------------------------------------------------------ examples

@dataclasses.dataclass(frozen=True)
class ExampleMaker:
    """A record -> one padded row in grain's packed layout plus its images float32
    [n, S, S, 3]; a bad record -> `{"skipped": reason, "message": ...}` under on_bad="skip".
    Runs in grain's worker processes (picklable)."""

    cfg: ImageTextConfig
    spec: ImageSpec
    vocab: Vocabulary
    encoder_length: int
    decoder_length: int

    def __call__(self, record: Record) -> dict[str, Any]:
        try:
            return self.row(record)
        except _Skip as skip:
            if self.cfg.on_bad == "error":
                raise skip.error from None
            return {"skipped": skip.reason, "message": str(skip.error)}

    def row(self, record: Record) -> dict[str, Any]:
        text, target, items = self._fields(record)
        m = self.cfg.max_images
        if len(items) > m:
            raise _Skip("too_many_images", SourceError(
                f"{record.where}: {len(items)} images, over data.image_text.max_images={m} "
                "(raise it, or on_bad='skip' skips and counts such examples)"))
        inputs = self.encoder_tokens(text, len(items), record.where)  # a mismatch raises
        targets = np.append(self.vocab.encode(target), self.vocab.eos_id).astype(np.int32)
        for side, tokens, limit, field in (("encoder", inputs, self.encoder_length,
                                            "train.encoder_length"),
                                           ("decoder", targets, self.decoder_length,
                                            "train.decoder_length")):
            if len(tokens) > limit:
                raise _Skip("too_long", SourceError(
                    f"{record.where}: {len(tokens)} {side} tokens (images included), over "
                    f"{field}={limit} (raise it, or on_bad='skip' skips and counts such "
                    "examples)"))
        pixels = np.zeros((len(items),) + (self.spec.image_size,) * 2 + (3,), np.float32)
        for k, item in enumerate(items):
            try:
                data, where = image_bytes(item, record, k)
                pixels[k] = image_io.preprocess(image_io.decode_image(data, where),
                                                self.spec.image_size)
            except image_io.ImageError as e:
                if e.reason not in image_io.FILE_REASONS:
                    raise
                raise _Skip(e.reason, e) from e
            except SourceError as e:
                raise _Skip("bad_record", e) from e
        row = pad_example({"inputs": inputs, "targets": targets},
                          encoder_length=self.encoder_length, decoder_length=self.decoder_length)
        row["images"] = pixels
        return row

    def encoder_tokens(self, text: str, num_images: int, where: str) -> np.ndarray:
        """[mode id] + the text's tokens with each image's block + EOS."""
        spec, vocab = self.spec, self.vocab
        tokens = image_io.encode_with_images(
            vocab.encode, text, num_images, tokens_per_image=spec.tokens_per_image,
            boi_id=spec.boi_id, image_id=spec.image_id, eoi_id=spec.eoi_id, where=where)
        head = [] if self.cfg.mode_token is None else [vocab.mode_id(self.cfg.mode_token)]
        return np.concatenate([np.asarray(head, np.int32), np.asarray(tokens, np.int32),
                               [vocab.eos_id]]).astype(np.int32)

    def _fields(self, record: Record) -> tuple[str, str, list]:
        cfg = self.cfg

        def bad(message):
            return _Skip("bad_record", SourceError(f"{record.where}: {message}"))

        if not isinstance(record.text, str):
            raise bad(f"field {cfg.text_field!r} is {type(record.text).__name__}, not a string")
        if record.target is _MISSING:
            raise bad(f"no field {cfg.target_field!r} (the target text)")
        if not isinstance(record.target, str):
            raise bad(f"field {cfg.target_field!r} is {type(record.target).__name__}, not a "
                      "string")
        if image_io.IMAGE_MARKER in record.target:
            raise bad(f"field {cfg.target_field!r} holds {image_io.IMAGE_MARKER!r}: images go "
                      f"in the encoder, marked in {cfg.text_field!r}")
        items = [] if record.images is None else record.images
        if not isinstance(items, list):
            raise bad(f"field {cfg.images_field!r} is {type(items).__name__}, not a list")
        return record.text, record.target, items


def image_text_rows(records: Sequence[Record], maker: ExampleMaker, *, seed: int,
                    process_index: int, process_count: int) -> grain.IterDataset:
    """Shard `process_index` of `process_count`: its examples as rows, made in workers, the
    skipped ones dropped and counted (`SkipBad`)."""
    if not len(records):
        raise SourceError("no image-text records to read")
    cfg = maker.cfg
    ds = grain.MapDataset.source(records).shuffle(seed=seed).repeat()
    ds = read_in_workers(ds[process_index::process_count].map(maker), cfg)
    return SkipBad(ds, limit=2 * -(-len(records) // process_count))


class SkipBad(grain.IterDataset):
    """Drops the examples `ExampleMaker` marked skipped, counting them by reason (in the state);
    `limit` skips in a row (two epochs of the shard: they hold a whole epoch) mean nothing is
    usable: an error."""

    def __init__(self, parent: grain.IterDataset, limit: int):
        super().__init__(parent)
        self._limit = limit

    def __iter__(self):
        return _SkipBadIterator(self._parent.__iter__(), self._limit)


class _SkipBadIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, limit: int):
        super().__init__(parent)
        self._limit = limit
        self._rows = 0
        self._skipped: collections.Counter[str] = collections.Counter()

    def __next__(self) -> dict[str, np.ndarray]:
        for _ in range(self._limit):
            element = next(self._parent)
            if "skipped" not in element:
                self._rows += 1
                return element
            self._skipped[element["skipped"]] += 1
            seen = sum(self._skipped.values())
            if seen <= _LOGGED_SKIPS:
                log.warning("skipped an image-text example (on_bad='skip'): %s%s",
                            element["message"], "; further ones are counted, not logged"
                            if seen == _LOGGED_SKIPS else "")
        raise SourceError(f"{self._limit} image-text examples in a row were bad and skipped "
                          f"({dict(self._skipped)}): nothing usable to read")

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "rows": self._rows,
                "skipped": dict(sorted(self._skipped.items()))}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._rows = int(state["rows"])
        self._skipped = collections.Counter({k: int(v) for k, v in state["skipped"].items()})


# --------------------------------------------------------------------------------- mixing

class MixRows(grain.IterDataset):
    """Row k of shard `shard` comes from `image_rows` when
    `default_rng([seed, shard, k, 1]).random() < rate`, else from `text_rows`."""

    def __init__(self, text_rows: grain.IterDataset, image_rows: grain.IterDataset, *,
                 rate: float, seed: int, shard: int):
        super().__init__([text_rows, image_rows])
        self._rate, self._seed, self._shard = rate, seed, shard

    def __iter__(self):
        return _MixRowsIterator([p.__iter__() for p in self._parents], self._rate, self._seed,
                                self._shard)


def image_row_chosen(rate: float, seed: int, shard: int, row: int) -> bool:
    """Whether row `row` of data shard `shard` is an image-text row."""
    return bool(np.random.default_rng([seed, shard, row, _MIX_STREAM]).random() < rate)


class _MixRowsIterator(grain.DatasetIterator):
    def __init__(self, parents, rate: float, seed: int, shard: int):
        super().__init__(parents)
        self._rate, self._seed, self._shard = rate, seed, shard
        self._row = 0

    def __next__(self) -> dict[str, np.ndarray]:
        chosen = image_row_chosen(self._rate, self._seed, self._shard, self._row)
        row = next(self._parents[1] if chosen else self._parents[0])
        self._row += 1
        return row

    def get_state(self) -> dict[str, Any]:
        return {"row": self._row, "text": self._parents[0].get_state(),
                "image_text": self._parents[1].get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parents[0].set_state(state["text"])
        self._parents[1].set_state(state["image_text"])
        self._row = int(state["row"])


@dataclasses.dataclass(frozen=True)
class _BatchRows:
    """Rows -> grain's packed layout [B, ...] plus images [B, M, S, S, 3] (zeros where a row
    has no image)."""
    max_images: int
    image_size: int

    def __call__(self, rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        batch = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in PACKED_KEYS}
        s = self.image_size
        images = np.zeros((len(rows), self.max_images, s, s, 3), np.float32)
        for b, row in enumerate(rows):
            if "images" in row:
                images[b, :len(row["images"])] = row["images"]
        batch["images"] = images
        return batch


def _to_contract(batch: Mapping[str, np.ndarray], *, start_id: int) -> dict[str, np.ndarray]:
    return dict(to_batch_contract(batch, start_id=start_id), encoder_images=batch["images"])


# ---------------------------------------------------------------------------------- source

class ImageTextSource(Ul2Source):
    """The UL2 source with image-text rows mixed in at `image_cfg.rate` (see the module doc):
    same sharding, JSON state, restore on another process count, and the batch contract plus
    `encoder_images` float32 [B, M, S, S, 3]."""

    def __init__(self, cfg: PipelineConfig, image_cfg: ImageTextConfig, spec: ImageSpec, *,
                 records: Sequence[Record] | None = None, **kwargs):
        image_cfg.validate()
        if not image_cfg.enabled and records is None:
            raise ConfigError("data.image_text.paths is empty: nothing to mix in")
        self.image_cfg, self.spec = image_cfg, spec
        self.records = records if records is not None else open_records(
            image_cfg, cache_dir=cfg.cache_dir, index_dir=cfg.index_dir,
            index_workers=cfg.index_workers)
        self._maker = None
        super().__init__(cfg, **kwargs)

    def _shard_dataset(self, shard: int, shards: int) -> grain.IterDataset:
        cfg = self.cfg
        if self._maker is None:
            if self.image_cfg.mode_token is not None \
                    and self.image_cfg.mode_token not in self.vocab.mode_tokens:
                raise ConfigError(f"data.image_text.mode_token={self.image_cfg.mode_token!r} "
                                  f"is not a mode token of the vocabulary "
                                  f"{list(self.vocab.mode_tokens)}")
            self._maker = ExampleMaker(self.image_cfg, self.spec, self.vocab,
                                       cfg.encoder_length, cfg.decoder_length)
        text = make_rows(cfg, self.documents, self.vocab, self.mixture, process_index=shard,
                         process_count=shards)
        images = image_text_rows(self.records, self._maker, seed=cfg.seed,
                                 process_index=shard, process_count=shards)
        mixed = MixRows(text, images, rate=self.image_cfg.rate, seed=cfg.seed, shard=shard)
        return mixed.batch(cfg.batch_size // shards, drop_remainder=True,
                           batch_fn=_BatchRows(self.image_cfg.max_images,
                                               self.spec.image_size)).map(
            functools.partial(_to_contract, start_id=self.vocab.bos_id))

    def _identity(self) -> dict[str, Any]:
        speed = {"num_workers", "worker_buffer_size", "read_threads", "read_buffer_size"}
        image_text = {k: v for k, v in self.image_cfg.describe().items() if k not in speed}
        return dict(super()._identity(), image_text=image_text, records=len(self.records),
                    image_spec=dataclasses.asdict(self.spec),
                    image_workers=self.image_cfg.num_workers)

    def consumed(self) -> dict[str, int]:
        """The UL2 counters (`Ul2Source.consumed`) plus, over this process's shards, the
        image-text rows made and the examples skipped by reason (`skipped_<reason>`)."""
        totals: collections.Counter[str] = collections.Counter()
        for iterator in self._iterators.values():
            mix = _mix_state(iterator.get_state())
            totals.update(_find_counts(mix["text"]))
            image = mix["image_text"]
            totals["image_text_rows"] += image["rows"]
            totals.update({f"skipped_{k}": v for k, v in image["skipped"].items()})
            totals["rows"] += mix["row"]
        return dict(totals)


def _mix_state(state: Any) -> Mapping[str, Any]:
    """The `MixRows` state inside a nested grain state."""
    while isinstance(state, dict):
        if {"row", "text", "image_text"} <= set(state):
            return state
        state = state.get("parent")
    raise ValueError("no image-text mixer state found")
