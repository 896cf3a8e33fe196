"""Per-file document indexes (where each document of a text or JSONL file starts and ends, and
what was wrong with the rest), cached so a corpus is read once, not at every start on every host.

A cached index is one file per data file, named after the data file's path, kind and field, under
`index_dir` (local, or a bucket URI all hosts share). It records the data file's identity (size,
modification time, a hash of its first and last 64 KiB) and a SHA-256 of its own payload: an index
whose data file changed is stale, one that does not parse or whose hash disagrees is corrupt;
either is logged and rebuilt, never used. Writes are atomic (a temporary file, then a rename), so
hosts building the same index at once each write a whole, equal file and the last rename wins.
Hosts sharing `index_dir` split a cold scan: a builder claims each file it scans
(`<index>.building`, refreshed while it works), and the others wait for that file's index
instead of scanning it too, unless the claim is abandoned.

Uncached files of a large corpus are scanned in parallel, one spawned worker process per core
(scanning holds the GIL: JSON parsing, UTF-8 checks, so threads do not help); each worker writes
its own files' cache entries. A spawned worker starts a fresh interpreter that imports the
program's main module again, so below `PARALLEL_FROM_BYTES` of files to scan the calling process
scans them itself.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import socket
import threading
import time
from typing import Callable, Iterator, Sequence

import numpy as np

from t5g2 import fs

__all__ = ["FileIndex", "cache_file", "load", "save", "file_indexes", "FORMAT"]

FORMAT = 1
_MAGIC = b"t5g2 document index\n"
_DTYPE = np.dtype("<i8")
PARALLEL_FROM_BYTES = 2 << 30  # workers=None scans less than this in the calling process
CLAIM_FRESH_S = 120.0  # a claim not refreshed for this long is abandoned
_CLAIM_REFRESH_S = 20.0
_POLL_S = 2.0  # how often a builder waiting for another's index looks for it

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FileIndex:
    """One data file's documents (byte ranges [starts[i], ends[i])) and its problems: per reason
    a count, and the first few messages naming the place (see `sources._Problems`)."""
    kind: str
    field: str | None
    identity: dict
    starts: np.ndarray
    ends: np.ndarray
    problem_counts: dict[str, int]
    problem_examples: list[str]

    @property
    def path(self) -> str:
        return self.identity["path"]

    def __len__(self) -> int:
        return len(self.starts)


def cache_file(index_dir: str, kind: str, field: str | None, path: str) -> str:
    """Where the index of `path` (read as `kind`/`field`) is cached under `index_dir`."""
    key = json.dumps([FORMAT, kind, field, fs.absolute(path)]).encode()
    name = os.path.basename(str(path).rstrip("/"))[:80]
    return fs.join(index_dir, f"{name}.{hashlib.sha256(key).hexdigest()[:24]}.index")


def encode(index: FileIndex) -> bytes:
    payload = (np.ascontiguousarray(index.starts, _DTYPE).tobytes()
               + np.ascontiguousarray(index.ends, _DTYPE).tobytes())
    header = dict(format=FORMAT, kind=index.kind, field=index.field, identity=index.identity,
                  documents=len(index), problem_counts=index.problem_counts,
                  problem_examples=index.problem_examples,
                  payload_sha256=hashlib.sha256(payload).hexdigest())
    return _MAGIC + json.dumps(header).encode() + b"\n" + payload


class CorruptIndex(ValueError):
    pass


def decode(data: bytes) -> FileIndex:
    """The index in `data`; CorruptIndex when it is not a whole, intact index of this format."""
    if not data.startswith(_MAGIC):
        raise CorruptIndex("not an index file (bad magic)")
    end = data.find(b"\n", len(_MAGIC))
    try:
        header = json.loads(data[len(_MAGIC):end])
        n = int(header["documents"])
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptIndex(f"unreadable header ({e})") from e
    if header.get("format") != FORMAT:
        raise CorruptIndex(f"format {header.get('format')!r}, this version reads {FORMAT}")
    payload = data[end + 1:]
    if len(payload) != 2 * n * _DTYPE.itemsize:
        raise CorruptIndex(f"payload of {len(payload)} bytes for {n} documents (truncated?)")
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise CorruptIndex("payload hash mismatch")
    offsets = np.frombuffer(payload, _DTYPE).astype(np.int64)
    return FileIndex(header["kind"], header["field"], header["identity"], offsets[:n],
                     offsets[n:], dict(header["problem_counts"]),
                     list(header["problem_examples"]))


def load(cache: str, kind: str, field: str | None, identity: dict,
         quiet: bool = False) -> FileIndex | None:
    """The cached index if it is intact and describes this data file as it is now; None (after a
    warning naming the reason, unless `quiet`) when it is corrupt or stale, None silently when
    there is none."""
    warn = (lambda *args: None) if quiet else log.warning
    try:
        data = fs.read_bytes(cache)
    except FileNotFoundError:
        return None
    except Exception as e:  # an object store's own error types (e.g. tf.io.gfile's)
        if "NotFound" in type(e).__name__:
            return None
        warn("cannot read the cached index %s (%s); rebuilding it", cache, e)
        return None
    try:
        index = decode(data)
    except CorruptIndex as e:
        warn("cached index %s of %s is corrupt (%s); rebuilding it", cache, identity["path"],
             e)
        return None
    if (index.kind, index.field, index.identity) != (kind, field, identity):
        changed = {k: (index.identity.get(k), v) for k, v in identity.items()
                   if index.identity.get(k) != v}
        warn("cached index %s is stale: %s changed since it was built (%s); rebuilding it",
             cache, identity["path"],
             ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
             or f"kind/field {index.kind}/{index.field} -> {kind}/{field}")
        return None
    return index


def save(cache: str, index: FileIndex) -> None:
    """Write atomically; a cache that cannot be written is a warning, not a failed start."""
    try:
        fs.write_atomically(cache, encode(index))
    except OSError as e:
        log.warning("cannot write the index cache %s (%s); %s will be scanned again next time",
                    cache, e, index.path)


class _Claim:
    """While a builder scans a file, `<cache>.building` says so, rewritten every
    _CLAIM_REFRESH_S; other builders wait for the index rather than scan the same file. A claim
    not refreshed for CLAIM_FRESH_S is abandoned (its builder died) and ignored. Best effort:
    two builders claiming at the same instant both scan, and both write the same index."""

    def __init__(self, cache: str):
        self.path = cache + ".building"
        self._stop = threading.Event()
        self._thread = None

    def age(self) -> float | None:
        """Seconds since the claim was last refreshed; None when there is none."""
        try:
            return time.time() - fs.mtime(self.path)
        except Exception:  # missing (or unreadable): no claim to honour
            return None

    def is_fresh(self) -> bool:
        age = self.age()
        return age is not None and age < CLAIM_FRESH_S

    def _write(self) -> bool:
        try:
            fs.write_atomically(self.path, json.dumps(dict(
                host=socket.gethostname(), pid=os.getpid(), time=time.time())).encode())
            return True
        except OSError:  # an index_dir we cannot write: save() warns about it
            return False

    def __enter__(self):
        if self._write():
            self._thread = threading.Thread(target=self._refresh, daemon=True)
            self._thread.start()
        return self

    def _refresh(self):
        while not self._stop.wait(_CLAIM_REFRESH_S):
            self._write()

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            try:
                fs.remove(self.path)
            except Exception:
                pass


def _build(scan: Callable, kind: str, field: str | None, path: str, identity: dict,
           cache: str | None, defer: bool = True) -> FileIndex | None:
    """Scan and cache one file; None (nothing done) when another builder holds a fresh claim on
    it and `defer`."""
    if cache is None:
        return scan(kind, field, path, identity)
    claim = _Claim(cache)
    if defer and claim.is_fresh():
        return None
    with claim:
        index = scan(kind, field, path, identity)
        save(cache, index)
    return index


def _from_other_builder(scan: Callable, kind: str, field: str | None, path: str,
                        identity: dict, cache: str) -> FileIndex:
    """The index another builder is writing, once it is there; built here if that builder's
    claim is abandoned or gone without an index."""
    log.info("document index: %s is being indexed by another process (%s); waiting for it",
             path, cache + ".building")
    while True:
        time.sleep(_POLL_S)
        index = load(cache, kind, field, identity, quiet=True)
        if index is not None:
            return index
        if not _Claim(cache).is_fresh():
            return _build(scan, kind, field, path, identity, cache, defer=False)


def file_indexes(paths: Sequence[str], kind: str, field: str | None, scan: Callable, *,
                 index_dir: str | None, workers: int | None = None) -> Iterator[FileIndex]:
    """The index of each path, in order: from the cache where it is valid, else built by
    `scan(kind, field, path, identity)` (a module-level function: it runs in worker processes)
    and cached. `index_dir=None` caches nothing. `workers`: processes for the files to scan
    (None: one per core, at most one per file, when they hold PARALLEL_FROM_BYTES or more;
    0 or 1: in this process). Stops early (pending
    scans cancelled) when the caller stops iterating."""
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(min(16, len(paths))) as pool:  # I/O-bound stats
        identities = list(pool.map(fs.identity, paths))
        caches = [None if index_dir is None else cache_file(index_dir, kind, field, p)
                  for p in paths]
        cached = list(pool.map(
            lambda i: None if caches[i] is None else load(caches[i], kind, field, identities[i]),
            range(len(paths))))
    todo = [i for i, index in enumerate(cached) if index is None]
    if workers is None:  # starting a process costs more than scanning a small corpus
        big = sum(identities[i]["size"] for i in todo) >= PARALLEL_FROM_BYTES
        workers = (os.cpu_count() or 1) if big else 0
    workers = min(workers, len(todo))
    log.info("document index: %d of %d files cached under %s; scanning %d with %s",
             len(paths) - len(todo), len(paths), index_dir, len(todo),
             f"{workers} processes" if workers > 1 else "this process")
    def ready(i, index):
        if index is None:  # another builder holds the claim
            index = _from_other_builder(scan, kind, field, paths[i], identities[i], caches[i])
        return index

    if workers <= 1:
        built: dict[int, FileIndex | None] = {}
        for i, index in enumerate(cached):
            if index is None:
                if i not in built:
                    built[i] = _build(scan, kind, field, paths[i], identities[i], caches[i])
                if built[i] is None:  # claimed by another builder: scan the rest meanwhile
                    for j in todo:
                        if j > i and j not in built:
                            built[j] = _build(scan, kind, field, paths[j], identities[j],
                                              caches[j])
                index = ready(i, built.pop(i))
            yield index
        return
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {i: pool.submit(_build, scan, kind, field, paths[i], identities[i], caches[i])
                   for i in todo}
        for i, index in enumerate(cached):
            yield index if index is not None else ready(i, futures[i].result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        log.info("document index: %d files ready in %.1f s", len(paths),
                 time.perf_counter() - started)
