"""Document sources: text, JSONL, Parquet and ArrayRecord files, or the embedded corpus.

`open_documents(kind, paths, field=..., on_bad=...)` returns `Documents`, a random-access sequence
of strings whose length is known when it opens: opening reads every file once, validates every
document and keeps only an index (byte offsets or row numbers), so the object is small and
picklable for grain worker processes; documents are read again on access (files are reopened
lazily in each process).

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
the column), not_string, empty (a document that is only whitespace).
Very long documents are fine: the pipeline splits them.

Paths may be globs; each pattern expands in sorted order, and a pattern matching nothing is an
error naming it.
"""

from __future__ import annotations

import collections
import glob
import json
import logging
import mmap
import os
import re
import threading
from typing import Callable, Sequence

import numpy as np

from t5g2.data.corpus import embedded_corpus_path

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
_OPEN_LOCK = threading.Lock()  # files are opened lazily, once, by whichever reader thread is first


class SourceError(ValueError):
    """A source cannot be read as asked; the message names the file, the place and the problem."""


def expand_paths(paths: str | Sequence[str]) -> list[str]:
    """Files named by `paths` (plain paths or globs), each pattern in sorted order, no repeats."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: dict[str, None] = {}
    for pattern in map(str, paths):
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            if not matches:
                raise SourceError(f"no file matches the pattern {pattern!r}")
        elif os.path.isdir(expanded):
            raise SourceError(f"{pattern} is a directory; name its files, e.g. "
                              f"{os.path.join(pattern, '*.txt')!r}")
        elif not os.path.isfile(expanded):
            raise SourceError(f"no such file: {pattern}")
        else:
            matches = [expanded]
        files.update(dict.fromkeys(matches))
    if not files:
        raise SourceError("no paths given")
    return list(files)


class _Problems:
    """Applies the on_bad policy: raise on the first problem, or count and remember a few."""

    def __init__(self, on_bad: str):
        self.on_bad = on_bad
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: list[str] = []

    def __call__(self, reason: str, path: str, where: str, detail: str, count: int = 1) -> None:
        message = f"{path}: {where}: {detail}" if where else f"{path}: {detail}"
        if self.on_bad == "error":
            raise SourceError(f"{message} (on_bad='skip' skips and counts such input)")
        self.counts[reason] += count
        if len(self.examples) < _SHOWN_PROBLEMS:
            self.examples.append(message)


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
    """Documents stored as byte ranges of one file, read with pread (thread- and fork-safe)."""

    def __init__(self, path: str, starts: np.ndarray, ends: np.ndarray):
        self.path, self.starts, self.ends = path, starts, ends
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self.starts)

    def raw(self, i: int) -> bytes:
        if self._fd is None:
            with _OPEN_LOCK:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        start, end = int(self.starts[i]), int(self.ends[i])
        return os.pread(self._fd, end - start, start)

    def read(self, i: int) -> str:
        return self.raw(i).decode("utf-8")

    def __getstate__(self):
        return dict(path=self.path, starts=self.starts, ends=self.ends, _fd=None)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


class _JsonlFile(_ByteRangeFile):
    def __init__(self, path: str, starts: np.ndarray, ends: np.ndarray, field: str):
        super().__init__(path, starts, ends)
        self.field = field

    def read(self, i: int) -> str:
        return json.loads(self.raw(i))[self.field]

    def __getstate__(self):
        return dict(super().__getstate__(), field=self.field)


def _mapped(path: str, problems: _Problems):
    """The file's bytes (an mmap), or None when it is empty (reported as empty_file)."""
    if os.path.getsize(path) == 0:
        problems("empty_file", path, "", "empty file")
        return None
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _scan_text(path: str, problems: _Problems, field: str | None):
    data = _mapped(path, problems)
    if data is None:
        return None
    with data:
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
    return _ByteRangeFile(path, np.asarray(starts, np.int64), np.asarray(ends, np.int64))


def _scan_jsonl(path: str, problems: _Problems, field: str):
    data = _mapped(path, problems)
    if data is None:
        return None
    with data:
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
    return _JsonlFile(path, np.asarray(starts, np.int64), np.asarray(ends, np.int64), field)


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


class _RowFile:
    """Rows of one Parquet column or ArrayRecord file, by position among the kept rows."""

    def __init__(self, path: str, kept: np.ndarray | None, count: int):
        self.path, self.kept, self.count = path, kept, count  # kept=None: every row
        self._reader = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.count

    def row(self, i: int) -> int:
        return i if self.kept is None else int(self.kept[i])

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_reader=None, _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class _ParquetFile(_RowFile):
    _CACHED_ROW_GROUPS = 4

    def __init__(self, path: str, kept, count: int, field: str, group_starts: np.ndarray):
        super().__init__(path, kept, count)
        self.field, self.group_starts = field, group_starts
        self._groups: collections.OrderedDict[int, list] = collections.OrderedDict()

    def read(self, i: int) -> str:
        row = self.row(i)
        group = int(np.searchsorted(self.group_starts, row, side="right")) - 1
        with self._lock:
            if group not in self._groups:
                import pyarrow.parquet as pq
                if self._reader is None:
                    self._reader = pq.ParquetFile(self.path)
                column = self._reader.read_row_group(group, columns=[self.field]).column(0)
                self._groups[group] = column.to_pylist()
                if len(self._groups) > self._CACHED_ROW_GROUPS:
                    self._groups.popitem(last=False)
            value = self._groups[group][row - int(self.group_starts[group])]
        return value if isinstance(value, str) else value.decode("utf-8")

    def __getstate__(self):
        return dict(super().__getstate__(), _groups=collections.OrderedDict())


def _scan_parquet(path: str, problems: _Problems, field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq
    if os.path.getsize(path) == 0:
        problems("empty_file", path, "", "empty file")
        return None
    try:
        reader = pq.ParquetFile(path)
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
    kept, group_starts, first = [], [], 0
    for group in range(reader.num_row_groups):
        group_starts.append(first)
        column = reader.read_row_group(group, columns=[field]).column(0)
        for offset, value in enumerate(column.cast(pa.large_binary()).to_pylist()):
            where = f"row {first + offset}"
            if value is None:
                problems("not_string", path, where, f"column {field!r} is null")
            elif _decoded(value, problems, path, where) is not None:
                kept.append(first + offset)
        first += len(column)
    all_kept = len(kept) == rows
    return _ParquetFile(path, None if all_kept else np.asarray(kept, np.int64), len(kept),
                        field, np.asarray(group_starts, np.int64))


class _ArrayRecordFile(_RowFile):
    def _source(self):
        if self._reader is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource
            with self._lock:
                if self._reader is None:
                    self._reader = ArrayRecordDataSource([self.path])
        return self._reader

    def read(self, i: int) -> str:
        return self._source()[self.row(i)].decode("utf-8")


def _scan_arrayrecord(path: str, problems: _Problems, field: str | None):
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    if os.path.getsize(path) == 0:
        problems("empty_file", path, "", "empty file")
        return None
    try:
        source = ArrayRecordDataSource([path])
        rows = len(source)
    except (RuntimeError, ValueError, OSError) as e:
        problems("unreadable_file", path, "", f"not an ArrayRecord file ({e})")
        return None
    if rows == 0:
        problems("empty_file", path, "", "no records")
        return None
    kept, chunk = [], 1024
    for first in range(0, rows, chunk):
        records = source.__getitems__(list(range(first, min(first + chunk, rows))))
        for offset, record in enumerate(records):
            if _decoded(record, problems, path, f"record {first + offset}") is not None:
                kept.append(first + offset)
    return _ArrayRecordFile(path, None if len(kept) == rows else np.asarray(kept, np.int64),
                            len(kept))


_SCANNERS: dict[str, Callable] = {"text": _scan_text, "jsonl": _scan_jsonl,
                                  "parquet": _scan_parquet, "arrayrecord": _scan_arrayrecord}


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


def open_documents(kind: str, paths: str | Sequence[str] = (), *, field: str | None = None,
                   on_bad: str = "error", cache_dir: str | None = None) -> Documents:
    """Open documents of `kind` (see the module doc) from local paths or globs.

    field: the JSON key (jsonl) or column (parquet) holding the text; not used by other kinds.
    on_bad: "error" raises SourceError at the first bad document or file; "skip" counts it in
    `Documents.skipped` (and logs a warning). cache_dir: where the embedded corpus is cached.
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
    if kind == "embedded":
        if paths:
            raise SourceError(f"kind='embedded' takes no paths (got {paths!r}); "
                              "cache_dir or $T5G2_CACHE choose where it is cached")
        kind, files = "text", [embedded_corpus_path(cache_dir)]
    else:
        files = expand_paths(paths)

    problems = _Problems(on_bad)
    scan = _SCANNERS[kind]
    opened = []
    for path in files:
        reported = sum(problems.counts.values())
        try:
            file_documents = scan(path, problems, field)
        except OSError as e:
            raise SourceError(f"{path}: cannot read: {e}") from e
        if file_documents is not None and len(file_documents):
            opened.append(file_documents)
        elif file_documents is not None and sum(problems.counts.values()) == reported:
            problems("empty_file", path, "", "no documents (only whitespace)")
    documents = Documents(kind, opened, dict(problems.counts), problems.examples)
    if not len(documents):
        raise SourceError(f"no documents in {', '.join(files)}: {documents.report()}")
    if documents.skipped:
        log.warning("%s", documents.report())
    return documents
