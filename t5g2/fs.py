"""Files by local path or object-store URI (gs://, s3://, ...), through `etils.epath`, the
filesystem layer grain and orbax use: data files (glob expansion, a file's identity, whole-file
and byte-range reads, atomic writes) and a run's workdir (directories, renames, appended files).

Local paths keep the plain local calls (os, open, mmap, pread, os.replace); a URI with a scheme
goes through `epath.Path`, so tests can swap the backend for a local fake
(`etils.epath.testing.mock_epath`, see tests/fake_store.py). An object store cannot append to an
object: `open_appending` rewrites it whole at each flush.

gs:// goes through gcsfs (etils' fsspec backend) in every library of the process that uses
etils.epath (this module, orbax, grain), not through tf.io.gfile, which etils would pick because
TensorFlow is installed (seqio needs it): one GCS client, declared in requirements.txt, which can
be pointed at a local GCS server in tests (tf.io.gfile's GCS endpoint cannot). Importing this
module sets EPATH_USE_TF=false unless the environment sets it.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import threading
import uuid

# the local atomic write lives in corpus.py, which runs as a standard-library-only script
from t5g2.data.corpus import write_atomically as _write_local_atomically

__all__ = ["is_remote", "epath_of", "absolute", "join", "glob_files", "exists", "is_file",
           "is_dir", "listdir", "makedirs", "rmtree", "rename", "replace", "identity", "mtime",
           "size", "remove", "read_bytes", "read_text", "write_text", "open_whole", "RangeReader",
           "write_atomically", "open_appending", "WholeObjectAppender"]

log = logging.getLogger(__name__)

os.environ.setdefault("EPATH_USE_TF", "false")  # gs:// through gcsfs (see above)

_FINGERPRINT_BYTES = 1 << 16  # head and tail hashed into a file's identity


def is_remote(path: str) -> bool:
    """True for a URI with a scheme (gs://bucket/x); False for a local path."""
    return "://" in str(path) and not str(path).startswith("file://")


def epath_of(path: str):
    from etils import epath
    return epath.Path(path)


def absolute(path: str) -> str:
    """A local path made absolute; a URI as it is (os.path.abspath would make gs://b/x the local
    path ./gs:/b/x)."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def join(directory: str, name: str) -> str:
    return str(epath_of(directory) / name) if is_remote(directory) else os.path.join(directory,
                                                                                      name)


def exists(path: str) -> bool:
    return epath_of(path).exists() if is_remote(path) else os.path.exists(path)


def is_file(path: str) -> bool:
    if not is_remote(path):
        return os.path.isfile(path)
    p = epath_of(path)
    return p.exists() and not p.is_dir()


def is_dir(path: str) -> bool:
    return epath_of(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(directory: str) -> list[str]:
    """The names in `directory`, in no particular order. On an object store a directory exists
    only through the objects under it, so one `makedirs` made and nothing filled lists empty."""
    if is_remote(directory):
        try:
            return [p.name for p in epath_of(directory).iterdir()]
        except FileNotFoundError:
            return []
    return os.listdir(directory)


def makedirs(directory: str) -> None:
    """Creates `directory` and its parents where missing (on an object store, which has no
    directories of their own, usually nothing)."""
    if is_remote(directory):
        epath_of(directory).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(directory, exist_ok=True)


def rmtree(path: str) -> None:
    """Removes a directory tree; a missing or partly removed one is no error (logged)."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        epath_of(path).rmtree(missing_ok=True)
    except OSError as e:
        log.warning("could not remove all of %s: %s", path, e)


def rename(source: str, target: str) -> None:
    """Renames a file or directory. On an object store a directory is renamed object by object
    (a copy and a delete each): not atomic, and as slow as copying it."""
    if is_remote(source):
        epath_of(source).rename(target)
    else:
        os.rename(source, target)


def replace(source: str, target: str) -> None:
    """Renames the file `source` to `target`, replacing `target` if it exists."""
    if is_remote(source):
        epath_of(source).replace(target)
    else:
        os.replace(source, target)


def glob_files(pattern: str) -> list[str]:
    """Files (not directories) matching `pattern`, sorted; `**` matches any depth."""
    if not is_remote(pattern):
        return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    scheme, rest = pattern.split("://", 1)
    parts = rest.split("/")
    first_magic = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = epath_of(f"{scheme}://{'/'.join(parts[:first_magic])}")
    matches = base.glob("/".join(parts[first_magic:]))
    return sorted(str(m) for m in matches if not m.is_dir())


def identity(path: str) -> dict:
    """What a cached index of `path` is valid for: its size, modification time and a hash of its
    first and last 64 KiB (so a rewrite within the clock's resolution is still noticed)."""
    if is_remote(path):
        stat = epath_of(path).stat()
        size, mtime = int(stat.length), int(stat.mtime)
    else:
        stat = os.stat(path)
        size, mtime = stat.st_size, stat.st_mtime_ns
    digest = hashlib.sha256()
    with RangeReader(path) as reader:
        digest.update(reader.read(0, min(size, _FINGERPRINT_BYTES)))
        if size > _FINGERPRINT_BYTES:
            tail = max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES)
            digest.update(reader.read(tail, size - tail))
    return dict(path=absolute(path), size=size, mtime=mtime,
                fingerprint=digest.hexdigest()[:32])


def mtime(path: str) -> float:
    """Modification time, seconds since the epoch (the store's clock for a remote file)."""
    return float(epath_of(path).stat().mtime) if is_remote(path) else os.stat(path).st_mtime


def remove(path: str) -> None:
    if is_remote(path):
        epath_of(path).unlink()
    else:
        os.unlink(path)


def size(path: str) -> int:
    return int(epath_of(path).stat().length) if is_remote(path) else os.path.getsize(path)


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        return epath_of(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    if is_remote(path):
        return epath_of(path).read_text(encoding="utf-8")
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Writes `text` as UTF-8 to `path` in place (an object store replaces the object whole)."""
    if is_remote(path):
        epath_of(path).write_text(text, encoding="utf-8")
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


class open_whole:
    """`with open_whole(path) as data:` the file's bytes: an mmap for a local file (nothing read
    up front), the whole object for a remote one."""

    def __init__(self, path: str):
        self.path = path
        self._map = None

    def __enter__(self):
        if is_remote(self.path):
            return read_bytes(self.path)
        import mmap
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def __exit__(self, *exc):
        if self._map is not None:
            self._map.close()


class RangeReader:
    """Byte ranges of one file: pread on a local file (thread- and fork-safe), seek + read under a
    lock on a remote one. Opens lazily; `close()` or a `with` block releases the file."""

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None
        self._file = None
        self._lock = threading.Lock()

    def read(self, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        if is_remote(self.path):
            with self._lock:
                if self._file is None:
                    self._file = epath_of(self.path).open("rb")
                self._file.seek(start)
                return self._file.read(length)
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self._fd, length, start)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        return dict(path=self.path)

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def write_atomically(path: str, data: bytes) -> None:
    """Readers see the old file or the whole new one, never a part: a uniquely named temporary
    file in the same directory, then a rename (an object store writes an object whole)."""
    if not is_remote(path):
        _write_local_atomically(path, data)
        return
    target = epath_of(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.write_bytes(data)
        tmp.replace(target)
    finally:
        if tmp.exists():
            tmp.unlink()


def open_appending(path: str, *, truncate: bool = False):
    """A binary file whose writes append and whose `flush()` makes them durable: the local file
    opened for appending (emptied first with `truncate`), or on an object store, which cannot
    append, a `WholeObjectAppender` starting from the object's bytes."""
    if not is_remote(path):
        return open(path, "wb" if truncate else "ab")
    return WholeObjectAppender(path, b"" if truncate or not exists(path) else read_bytes(path))


class WholeObjectAppender:
    """Appends to an object of an object store: the object's bytes stay in memory and each
    `flush()` uploads them whole (as TensorFlow's GCS files do at each flush), so what was
    flushed survives a kill. A flush costs an upload of the whole object so far."""

    def __init__(self, path: str, initial: bytes = b""):
        self.path = path
        self._data = bytearray(initial)
        self._unflushed = False
        self.closed = False

    def write(self, data: bytes) -> int:
        if self.closed:
            raise ValueError(f"{self.path} is closed")
        self._data += data
        self._unflushed = True
        return len(data)

    def flush(self) -> None:
        if self._unflushed:
            epath_of(self.path).write_bytes(bytes(self._data))
            self._unflushed = False

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
