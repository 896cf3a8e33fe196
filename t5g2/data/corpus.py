"""The embedded default corpus: English prose from the Python standard library's docstrings.

Every Python install ships it, so tests, the CPU smoke run and `default_vocabulary` need no
download. It is generated at first use and cached on disk (`cache_root()`), written atomically
(temporary file, then rename), so concurrent processes may race safely: each writes the same bytes.

What is in it (~1 MB, ~157K words, ~320 documents on CPython 3.11; the stdlib holds little more
prose than that): the modules of `STDLIB_MODULES` (an explicit allow-list; packages add their
public submodules, never tests, `__main__` or platform-specific ones), visited in sorted order, then
the Language Reference topics that `help()` shows (`pydoc_data.topics`). For each module we take
the docstrings of the module, of the classes and functions defined there and of their methods and
properties, in sorted name order, and keep only paragraphs that read as prose (no doctest or shell
prompt, mostly letters, at least 8 words, start like a sentence and end with punctuation; a list
item counts once its marker is removed). A paragraph seen before is not repeated. Lines are
reflowed, so each paragraph is one line.

Format: one document per module (or topic), documents separated by one blank line, one paragraph
per line -- exactly what `sources.open_documents("text", ...)` reads as one document per block.

Determinism: the traversal is sorted and never depends on hash order; generation runs in a fresh
isolated interpreter (`python -I`), so neither the caller's imports nor its environment change the
text, and importing the allow-listed modules has no side effect on the caller. The text depends on
the Python version and platform, which are part of the cache file name.

This module imports only the standard library: it runs as a script inside that interpreter.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
import sysconfig
import tempfile
import warnings

# Bump when the selection or format changes: it is part of the cache file name.
GENERATOR_VERSION = 1

# Top-level standard-library modules whose import has no side effect; packages among them
# contribute their public submodules too. Left out on purpose: antigravity, this, idlelib,
# turtle(demo), tkinter, test, readline/rlcompleter (touch the terminal), site, ensurepip,
# platform-only modules (msvcrt, winreg, ...) and the PEP 594 modules deprecated in 3.11 and
# removed in 3.13 (aifc, cgi, telnetlib, ...), which keeps the corpus stable across versions.
STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "atexit", "base64", "bdb", "binascii",
    "bisect", "builtins", "bz2", "cProfile", "calendar", "cmath", "cmd", "code", "codecs",
    "codeop", "collections", "colorsys", "compileall", "concurrent", "configparser",
    "contextlib", "contextvars", "copy", "copyreg", "csv", "ctypes", "dataclasses", "datetime",
    "dbm", "decimal", "difflib", "dis", "doctest", "email", "enum", "errno", "faulthandler",
    "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "gc", "getopt",
    "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "http",
    "imaplib", "importlib", "inspect", "io", "ipaddress", "itertools", "json", "keyword",
    "linecache", "locale", "logging", "lzma", "mailbox", "marshal", "math", "mimetypes", "mmap",
    "modulefinder", "multiprocessing", "netrc", "numbers", "opcode", "operator", "optparse", "os",
    "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib",
    "pprint", "profile", "pstats", "py_compile", "pyclbr", "pydoc", "queue", "quopri", "random",
    "re", "reprlib", "runpy", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "signal", "smtplib", "socket", "socketserver", "sqlite3", "statistics", "string",
    "stringprep", "struct", "subprocess", "symtable", "sys", "sysconfig", "tabnanny", "tarfile",
    "tempfile", "textwrap", "threading", "time", "timeit", "token", "tokenize", "tomllib",
    "trace", "traceback", "tracemalloc", "types", "typing", "unicodedata", "unittest", "urllib",
    "uuid", "venv", "warnings", "wave", "weakref", "webbrowser", "wsgiref", "xml", "xmlrpc",
    "zipapp", "zipfile", "zipimport", "zlib", "zoneinfo",
)

# Submodule name parts never imported: tests, entry points, other platforms' back ends.
_SKIPPED_PARTS = frozenset({"test", "tests", "idle_test", "__main__", "macholib"})
_SKIPPED_SUFFIXES = ("_win32", "windows_events", "windows_utils", "wintypes")

_MIN_WORDS = 8
_MIN_LETTER_FRACTION = 0.85


def cache_root(cache_dir: str | None = None) -> str:
    """The t5g2 cache dir: the argument, else $T5G2_CACHE, $XDG_CACHE_HOME/t5g2, ~/.cache/t5g2."""
    if cache_dir:
        return os.path.abspath(os.path.expanduser(cache_dir))
    if os.environ.get("T5G2_CACHE"):
        return os.path.abspath(os.path.expanduser(os.environ["T5G2_CACHE"]))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(xdg), "t5g2")


def write_atomically(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # a shared cache: readable by all, like any other written file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def corpus_file_name() -> str:
    """The cache file name: generator version, Python version and platform decide the text."""
    v = sys.version_info
    return f"stdlib-prose-v{GENERATOR_VERSION}-py{v.major}.{v.minor}.{v.micro}-{sys.platform}.txt"


def embedded_corpus_path(cache_dir: str | None = None) -> str:
    """Path of the embedded corpus, generating it on first use (a few seconds, once)."""
    path = os.path.join(cache_root(cache_dir), "corpus", corpus_file_name())
    if not os.path.exists(path):
        write_atomically(path, _generate_in_fresh_interpreter())
    return path


def _generate_in_fresh_interpreter() -> bytes:
    # -I: no environment variables, no user site, script directory not on sys.path.
    proc = subprocess.run([sys.executable, "-I", os.path.abspath(__file__)],
                          capture_output=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"generating the embedded corpus failed ({sys.executable} -I "
                           f"{__file__}):\n{proc.stderr.decode('utf-8', 'replace')[-4000:]}")
    return proc.stdout


def generate_corpus_text() -> str:
    """The corpus text, from the modules importable in this interpreter (see the module doc)."""
    sources = [list(_docstrings(module)) for module in _stdlib_modules()]
    sources += [[topic] for topic in _reference_topics()]
    seen: set[str] = set()
    documents = []
    for docs in sources:
        paragraphs = []
        for doc in docs:
            for paragraph in prose_paragraphs(doc):
                if paragraph not in seen:
                    seen.add(paragraph)
                    paragraphs.append(paragraph)
        if paragraphs:
            documents.append("\n".join(paragraphs))
    return "\n\n".join(documents) + "\n"


def prose_paragraphs(doc: str) -> list[str]:
    """The paragraphs of a docstring that read as English prose, each reflowed to one line.

    A paragraph is a blank-line-separated block; a list item ("* ", "- ") counts as prose once
    its marker is removed. Kept: at least 8 words, mostly letters, starts with a capital letter,
    ends with sentence punctuation, no doctest/shell prompt or comment.
    """
    kept = []
    for block in re.split(r"\n[ \t]*\n", inspect.cleandoc(doc)):
        lines = [line.strip() for line in block.split("\n") if line.strip()]
        if not lines or any(line.startswith((">>>", "...", "$", "%", "#")) for line in lines):
            continue
        text = " ".join(lines)
        if text.startswith(("* ", "- ")):
            text = text[2:].lstrip()
        letters = sum(c.isalpha() or c == " " for c in text)
        if (len(text.split()) >= _MIN_WORDS and letters >= _MIN_LETTER_FRACTION * len(text)
                and text[:1].isupper() and text[-1] in ".!?:"):
            kept.append(text)
    return kept


def _stdlib_modules():
    """The allow-listed modules and their public submodules, sorted, imported quietly."""
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    names = set()
    for name in STDLIB_MODULES:
        module = _quiet_import(name)
        if module is None:
            continue
        names.add(name)
        if hasattr(module, "__path__"):
            for info in pkgutil.walk_packages(module.__path__, name + ".", onerror=lambda _: None):
                parts = info.name.split(".")
                if (any(p.startswith("_") or p in _SKIPPED_PARTS for p in parts)
                        or info.name.endswith(_SKIPPED_SUFFIXES)):
                    continue
                names.add(info.name)
    for name in sorted(names):
        module = _quiet_import(name)
        file = getattr(module, "__file__", None)
        if module is not None and (file is None or os.path.realpath(file).startswith(stdlib)):
            yield module


def _quiet_import(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:  # not built on this platform (e.g. no _sqlite3): not in the corpus
            return None


def _docstrings(module):
    """Docstrings of the module, the classes and functions it defines and their methods, sorted."""
    yield _own_doc(module)
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # imported from elsewhere: counted under its own module
        if inspect.isclass(obj):
            yield _own_doc(obj)
            for _, member in sorted(vars(obj).items()):
                member = getattr(member, "__func__", member)  # classmethod, staticmethod
                if inspect.isroutine(member) or isinstance(member, property):
                    yield _own_doc(member)
        elif callable(obj):
            yield _own_doc(obj)


def _reference_topics():
    """The Language Reference sections `help()` shows (pydoc_data.topics), in sorted order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split pydoc_data out
        return []
    return [topics[name] for name in sorted(topics)]


def _own_doc(obj) -> str:
    doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else ""


if __name__ == "__main__":
    warnings.simplefilter("ignore")  # deprecated aliases (typing.io, ...) warn on access
    sys.stdout.buffer.write(generate_corpus_text().encode("utf-8"))
