"""Document sources: text, JSONL, Parquet and ArrayRecord files, or the embedded corpus.

`open_documents(kind, paths, field=..., on_bad=...)` returns `Documents`, a random-access sequence
of strings whose length is known when it opens; it keeps only an index (byte offsets or row
numbers), so the object is small and picklable for grain worker processes; documents are read
again on access (files are reopened lazily in each process).

Opening a text or JSONL file scans it once, validating every document, and caches the result
(`index.py`: under `index_dir`, keyed by the file's size, modification time and a hash of its
ends; rebuilt when stale or corrupt; a large corpus is scanned by parallel processes, and hosts
sharing `index_dir` split the scan): a restart, or another host, reads the small index instead
of the corpus. Parquet and ArrayRecord files
are opened from their own metadata (row and record counts, schema) without reading a record; their
records are checked when read (see below).

What one document is, per kind:
* "text": a maximal run of non-blank lines (documents are separated by one or more blank lines),
  its exact text without the final line break. A file with no blank line is one document.
* "jsonl": the string `field` of the JSON object on one line. Blank lines are not records.
* "parquet": the string (or UTF-8 binary) column `field` of one row. Access reads a whole row group
  (the last 4 are cached per file and process), so globally shuffled access to files with many
  large row groups is slow: write small row groups, or convert to ArrayRecord.
* "arrayrecord": one record, UTF-8 text.
* "embedded": a "text" source over the embedded stdlib corpus (`embedded_corpus_path`); no paths.

Bad input never disappears silently. With `on_bad="error"` (the default) the first problem raises
SourceError naming the file, the line/row/record and the problem. With `on_bad="skip"` the document
(or the whole file, for file-level problems) is left out and counted in `Documents.skipped` by
reason, reported by `Documents.report()` and logged as a warning. Reasons (counting documents,
except the `*_file` ones, which count files): empty_file, unreadable_file, non_utf8, not_json,
not_object, missing_field (a JSONL line without the key, or every row of a Parquet file without
the column), not_string, empty (a document that is only whitespace). A cached index keeps its
file's counts and first messages, so a warm start reports exactly what a cold one does.
Parquet and ArrayRecord: file-level problems (unreadable, empty, missing column, column type) are
found at open from the metadata; a record that is null, not UTF-8 or only whitespace is found when
it is read: with "error" it raises SourceError naming the file, row/record and problem (in the
training job, at that step); with "skip" it reads as the empty document "" (so the sequence keeps
its length; the pipeline then sees only its EOS), counted in `Documents.read_problems()` of the
reading process and logged as a warning (the first few per file).
Very long documents are fine: the pipeline splits them.

Paths may be globs; each pattern expands in sorted order, and a pattern matching nothing is an
error naming it. A path may be an object-store URI (gs://bucket/corpus/*.jsonl, s3://...): it is
read through `etils.epath` (`t5g2/fs.py`); ArrayRecord files must be local.
"""

from __future__ import annotations

import collections
import glob
import json
import logging
import os
import re
import threading
from typing import Callable, Sequence

import numpy as np

from t5g2 import fs
from t5g2.data.corpus import cache_root, embedded_corpus_path
from t5g2.data.index import FileIndex, file_indexes

__all__ = ["SourceError", "Documents", "open_documents", "embedded_corpus_path", "expand_paths",
           "KINDS"]

KINDS = ("text", "jsonl", "parquet", "arrayrecord", "embedded")
_FIELD_KINDS = ("jsonl", "parquet")
_ON_BAD = ("error", "skip")
_SHOWN_PROBLEMS = 5

# A block: a non-blank line, then any further lines up to the next blank line. Anchored at line
# starts with possessive whitespace runs, so a long whitespace-only line costs linear time.
_TEXT_BLOCK = re.compile(rb"(?m)^[^\S\n]*+\S[^\n]*(?:\n[^\S\n]*+\S[^\n]*)*")

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """A source cannot be read as asked; the message names the file, the place and the problem."""


def expand_paths(paths: str | Sequence[str]) -> list[str]:
    """Files named by `paths` (plain paths or globs), each pattern in sorted order, no repeats."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: dict[str, None] = {}
    for pattern in map(str, paths):
        expanded = pattern if fs.is_remote(pattern) else os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = fs.glob_files(expanded)
            if not matches:
                raise SourceError(f"no file matches the pattern {pattern!r}")
        elif fs.is_dir(expanded):
            raise SourceError(f"{pattern} is a directory; name its files, e.g. "
                              f"{fs.join(pattern, '*.txt')!r}")
        elif not fs.is_file(expanded):
            raise SourceError(f"no such file: {pattern}")
        else:
            matches = [expanded]
        files.update(dict.fromkeys(matches))
    if not files:
        raise SourceError("no paths given")
    return list(files)


class _Problems:
    """Applies the on_bad policy: raise on the first problem, or count and remember a few.
    "record" (used while indexing a file) counts like "skip"; the policy is applied later, to the
    recorded problems, so one cached index serves both policies."""

    def __init__(self, on_bad: str):
        self.on_bad = on_bad
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: list[str] = []

    def __call__(self, reason: str, path: str, where: str, detail: str, count: int = 1) -> None:
        message = f"{path}: {where}: {detail}" if where else f"{path}: {detail}"
        if self.on_bad == "error":
            _raise_problem(message)
        self.counts[reason] += count
        if len(self.examples) < _SHOWN_PROBLEMS:
            self.examples.append(message)

    def add(self, counts: dict[str, int], examples: Sequence[str]) -> None:
        """Problems recorded elsewhere (a file's index), under this policy."""
        if counts and self.on_bad == "error":
            _raise_problem(examples[0])
        self.counts.update(counts)
        self.examples.extend(examples[:_SHOWN_PROBLEMS - len(self.examples)])

    def __len__(self) -> int:
        return sum(self.counts.values())


def _raise_problem(message: str):
    raise SourceError(f"{message} (on_bad='skip' skips and counts such input)")


def _utf8(data: bytes, problems: _Problems, path: str, where: str,
          unit: str = "offset") -> str | None:
    """`data` decoded as UTF-8, or None after reporting the first bad byte and where it is."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        place = e.start if unit == "offset" else e.start + 1
        problems("non_utf8", path, where,
                 f"not valid UTF-8 (byte 0x{data[e.start]:02x} at {unit} {place})")
        return None


def _decoded(data: bytes, problems: _Problems, path: str, where: str) -> str | None:
    """`data` as UTF-8 text that is not only whitespace, or None after reporting the problem."""
    text = _utf8(data, problems, path, where)
    if text is None:
        return None
    if not text.strip():
        problems("empty", path, where, "empty document (only whitespace)")
        return None
    return text


class _ByteRangeFile:
    """Documents stored as byte ranges of one file (local: pread, thread- and fork-safe)."""

    def __init__(self, path: str, starts: np.ndarray, ends: np.ndarray):
        self.path, self.starts, self.ends = path, starts, ends
        self._reader = fs.RangeReader(path)

    def __len__(self) -> int:
        return len(self.starts)

    def raw(self, i: int) -> bytes:
        start, end = int(self.starts[i]), int(self.ends[i])
        return self._reader.read(start, end - start)

    def read(self, i: int) -> str:
        return self.raw(i).decode("utf-8")


class _JsonlFile(_ByteRangeFile):
    def __init__(self, path: str, starts: np.ndarray, ends: np.ndarray, field: str):
        super().__init__(path, starts, ends)
        self.field = field

    def read(self, i: int) -> str:
        return json.loads(self.raw(i))[self.field]


def _scan_text(data, path: str, problems: _Problems, field: str | None):
    starts, ends = [], []
    for match in _TEXT_BLOCK.finditer(data):
        start, end = match.span()
        block = data[start:end]
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = start + e.start
            line = data[:bad].count(b"\n") + 1  # only computed for a bad block
            problems("non_utf8", path, f"line {line}",
                     f"not valid UTF-8 (byte 0x{block[e.start]:02x} at file offset {bad})")
            continue
        if not text.strip():  # e.g. only non-breaking spaces
            line = data[:start].count(b"\n") + 1
            problems("empty", path, f"line {line}", "empty document (only whitespace)")
            continue
        starts.append(start)
        ends.append(end)
    return starts, ends


def _scan_jsonl(data, path: str, problems: _Problems, field: str):
    starts, ends, offset, line_number = [], [], 0, 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        end = len(data) if end < 0 else end
        start, offset, line_number = offset, end + 1, line_number + 1
        line = data[start:end]
        if not line.strip():
            continue
        where = f"line {line_number}"
        if _jsonl_text(line, field, problems, path, where) is not None:
            starts.append(start)
            ends.append(end)
    return starts, ends


def _jsonl_text(line: bytes, field: str, problems: _Problems, path: str, where: str):
    text = _utf8(line, problems, path, where, unit="column")
    if text is None:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        problems("not_json", path, where, f"not JSON ({e.msg} at column {e.colno})")
        return None
    if not isinstance(record, dict):
        problems("not_object", path, where,
                 f"expected a JSON object with field {field!r}, got {type(record).__name__}")
        return None
    if field not in record:
        keys = ", ".join(map(repr, sorted(record)[:10])) or "none"
        problems("missing_field", path, where, f"no field {field!r} (keys: {keys})")
        return None
    value = record[field]
    if not isinstance(value, str):
        problems("not_string", path, where,
                 f"field {field!r} is {type(value).__name__} {_short(value)}, not a string")
        return None
    if not value.strip():
        problems("empty", path, where, f"field {field!r} is empty (only whitespace)")
        return None
    return value


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


_SCANNED = {"text": (_scan_text, _ByteRangeFile), "jsonl": (_scan_jsonl, _JsonlFile)}


def scan_file(kind: str, field: str | None, path: str, identity: dict) -> FileIndex:
    """Read and validate every document of one text or JSONL file: its index and its problems
    (all counted, the first few kept). Runs in `index.file_indexes`' worker processes."""
    problems = _Problems("record")
    starts: list[int] = []
    ends: list[int] = []
    if identity["size"] == 0:
        problems("empty_file", path, "", "empty file")
    else:
        with fs.open_whole(path) as data:
            starts, ends = _SCANNED[kind][0](data, path, problems, field)
        if not starts and not problems:
            problems("empty_file", path, "", "no documents (only whitespace)")
    return FileIndex(kind, field, identity, np.asarray(starts, np.int64),
                     np.asarray(ends, np.int64), dict(problems.counts), problems.examples)


class _RowFile:
    """Rows of one Parquet column or ArrayRecord file, opened from the file's metadata; a record
    is checked when read (see the module doc: "error" raises, "skip" reads it as "")."""

    def __init__(self, path: str, count: int, on_bad: str):
        self.path, self.count, self.on_bad = path, count, on_bad
        self._reader = None
        self._lock = threading.Lock()
        self._problems = _Problems(on_bad)

    def __len__(self) -> int:
        return self.count

    def _checked(self, value, where: str) -> str:
        if value is None:
            self._problems("not_string", self.path, where, f"column {self.field!r} is null")
            text = None
        elif isinstance(value, str):
            text = value
            if not text.strip():
                self._problems("empty", self.path, where, "empty document (only whitespace)")
                text = None
        else:
            text = _decoded(value, self._problems, self.path, where)
        if text is None:  # only with on_bad="skip": "error" has raised
            seen = len(self._problems)
            if seen <= _SHOWN_PROBLEMS:  # examples[-1] is this problem's message
                log.warning("%s: read as an empty document (on_bad='skip')%s",
                            self._problems.examples[-1],
                            "; further ones in this file are counted in "
                            "Documents.read_problems(), not logged"
                            if seen == _SHOWN_PROBLEMS else "")
            return ""
        return text

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_reader=None, _lock=None, _problems=_Problems(self.on_bad))
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class _ParquetFile(_RowFile):
    _CACHED_ROW_GROUPS = 4

    def __init__(self, path: str, count: int, on_bad: str, field: str,
                 group_starts: np.ndarray):
        super().__init__(path, count, on_bad)
        self.field, self.group_starts = field, group_starts
        self._groups: collections.OrderedDict[int, list] = collections.OrderedDict()

    def read(self, i: int) -> str:
        group = int(np.searchsorted(self.group_starts, i, side="right")) - 1
        with self._lock:
            if group not in self._groups:
                if self._reader is None:
                    self._reader = _parquet_reader(self.path)
                column = self._reader.read_row_group(group, columns=[self.field]).column(0)
                self._groups[group] = column.to_pylist()
                if len(self._groups) > self._CACHED_ROW_GROUPS:
                    self._groups.popitem(last=False)
            value = self._groups[group][i - int(self.group_starts[group])]
        return self._checked(value, f"row {i}")

    def __getstate__(self):
        return dict(super().__getstate__(), _groups=collections.OrderedDict())


def _parquet_reader(path: str):
    import pyarrow.parquet as pq
    return pq.ParquetFile(fs.epath_of(path).open("rb") if fs.is_remote(path) else path)


def _open_parquet(path: str, problems: _Problems, field: str, on_bad: str):
    """From the footer only: row counts per row group, the column's presence and type."""
    import pyarrow as pa
    if fs.size(path) == 0:
        problems("empty_file", path, "", "empty file")
        return None
    try:
        reader = _parquet_reader(path)
    except (pa.ArrowException, OSError) as e:
        problems("unreadable_file", path, "", f"not a Parquet file ({e})")
        return None
    schema, rows = reader.schema_arrow, reader.metadata.num_rows
    if rows == 0:
        problems("empty_file", path, "", "no rows")
        return None
    if field not in schema.names:
        problems("missing_field", path, "", f"no column {field!r} (columns: "
                 f"{', '.join(map(repr, schema.names))})", count=rows)
        return None
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        problems("not_string", path, "", f"column {field!r} has type {kind}, not string",
                 count=rows)
        return None
    sizes = [reader.metadata.row_group(g).num_rows for g in range(reader.num_row_groups)]
    group_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return _ParquetFile(path, rows, on_bad, field, group_starts)


class _ArrayRecordFile(_RowFile):
    field = None

    def _source(self):
        if self._reader is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource
            with self._lock:
                if self._reader is None:
                    self._reader = ArrayRecordDataSource([self.path])
        return self._reader

    def read(self, i: int) -> str:
        return self._checked(self._source()[i], f"record {i}")


def _open_arrayrecord(path: str, problems: _Problems, field: str | None, on_bad: str):
    """From the file's footer only: its record count."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    if fs.is_remote(path):
        raise SourceError(f"{path}: ArrayRecord files are read locally only; copy them, or "
                          "mount the bucket (e.g. gcsfuse) and name the mounted path")
    if os.path.getsize(path) == 0:
        problems("empty_file", path, "", "empty file")
        return None
    try:
        rows = len(ArrayRecordDataSource([path]))
    except (RuntimeError, ValueError, OSError) as e:
        problems("unreadable_file", path, "", f"not an ArrayRecord file ({e})")
        return None
    if rows == 0:
        problems("empty_file", path, "", "no records")
        return None
    return _ArrayRecordFile(path, rows, on_bad)


_FROM_METADATA: dict[str, Callable] = {"parquet": _open_parquet,
                                       "arrayrecord": _open_arrayrecord}


class Documents(Sequence[str]):
    """Documents of one or more files: random access, len() known up front, picklable."""

    def __init__(self, kind: str, files: list, skipped: dict[str, int],
                 skipped_examples: Sequence[str] = ()):
        self.kind = kind
        self.files = tuple(files)
        self.skipped = dict(sorted(skipped.items()))
        self.skipped_examples = tuple(skipped_examples)
        self._ends = np.cumsum([len(f) for f in self.files], dtype=np.int64)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(f.path for f in self.files)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {index} out of range for {n} documents")
        f = int(np.searchsorted(self._ends, i, side="right"))
        return self.files[f].read(i - (int(self._ends[f - 1]) if f else 0))

    def read_problems(self) -> dict[str, int]:
        """Parquet/ArrayRecord records this process has read as "" (on_bad="skip"), by reason."""
        counts: collections.Counter[str] = collections.Counter()
        for f in self.files:
            if isinstance(f, _RowFile):
                counts.update(f._problems.counts)
        return dict(sorted(counts.items()))

    def report(self) -> str:
        """One line: how many documents from how many files, and what was skipped and why."""
        n, files = len(self), len(self.files)
        line = (f"{n} document{'s' * (n != 1)} from {files} {self.kind} "
                f"file{'s' * (files != 1)}")
        if not self.skipped:
            return line + "; nothing skipped"
        reasons = ", ".join(f"{reason}={count}" for reason, count in self.skipped.items())
        return (f"{line}; skipped {reasons} (first: {'; '.join(self.skipped_examples)})")

    def __repr__(self) -> str:
        return f"Documents({self.report()})"


def default_index_dir(cache_dir: str | None = None) -> str:
    """Where document indexes are cached unless `index_dir` says: `<t5g2 cache>/index`."""
    return os.path.join(cache_root(cache_dir), "index")


def open_documents(kind: str, paths: str | Sequence[str] = (), *, field: str | None = None,
                   on_bad: str = "error", cache_dir: str | None = None,
                   index_dir: str | None = None, index_workers: int | None = None) -> Documents:
    """Open documents of `kind` (see the module doc) from paths, URIs or globs.

    field: the JSON key (jsonl) or column (parquet) holding the text; not used by other kinds.
    on_bad: "error" raises SourceError at the first bad document or file; "skip" counts it in
    `Documents.skipped` (and logs a warning). cache_dir: where the embedded corpus is cached.
    index_dir: where text/JSONL indexes are cached (a local dir or a bucket URI; share one
    between hosts to scan the corpus once; default `<cache_dir or t5g2's cache>/index`).
    index_workers: processes scanning uncached files (None: one per core when they hold
    `index.PARALLEL_FROM_BYTES` or more, else this process; 0: this process).
    """
    if kind not in KINDS:
        raise SourceError(f"kind={kind!r} is not a document source; valid: {', '.join(KINDS)}")
    if on_bad not in _ON_BAD:
        raise SourceError(f"on_bad={on_bad!r}; valid: {', '.join(_ON_BAD)}")
    if kind in _FIELD_KINDS and not (isinstance(field, str) and field):
        raise SourceError(f"kind={kind!r} needs field=<the "
                          f"{'JSON key' if kind == 'jsonl' else 'column'} holding the text>")
    if kind not in _FIELD_KINDS and field is not None:
        raise SourceError(f"field={field!r} applies to jsonl and parquet, not kind={kind!r}")
    if index_workers is not None and (isinstance(index_workers, bool)
                                      or not isinstance(index_workers, int) or index_workers < 0):
        raise SourceError(f"index_workers={index_workers!r} must be None (one per core) or an "
                          "integer >= 0")
    if kind == "embedded":
        if paths:
            raise SourceError(f"kind='embedded' takes no paths (got {paths!r}); "
                              "cache_dir or $T5G2_CACHE choose where it is cached")
        kind, files = "text", [embedded_corpus_path(cache_dir)]
    else:
        files = expand_paths(paths)

    problems = _Problems(on_bad)
    opened = []
    try:
        if kind in _FROM_METADATA:
            for path in files:
                file_documents = _FROM_METADATA[kind](path, problems, field, on_bad)
                if file_documents is not None:
                    opened.append(file_documents)
        else:
            indexes = file_indexes(files, kind, field, scan_file,
                                   index_dir=index_dir or default_index_dir(cache_dir),
                                   workers=index_workers)
            try:
                for path, index in zip(files, indexes):
                    problems.add(index.problem_counts, index.problem_examples)
                    if len(index):
                        opened.append(_SCANNED[kind][1](path, index.starts, index.ends,
                                                        *([field] if kind == "jsonl" else [])))
            finally:
                indexes.close()  # stops the scans still pending after an error
    except OSError as e:
        path = getattr(e, "filename", None) or "a source file"
        raise SourceError(f"{path}: cannot read: {e}") from e
    documents = Documents(kind, opened, dict(problems.counts), problems.examples)
    if not len(documents):
        raise SourceError(f"no documents in {', '.join(files)}: {documents.report()}")
    if documents.skipped:
        log.warning("%s", documents.report())
    return documents
