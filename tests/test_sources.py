"""Document sources and the embedded corpus: what a document is, globbing, bad input, pickling."""

import json
import logging
import os
import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python import array_record_module

from t5g2.data import corpus
from t5g2.data.sources import Documents, SourceError, expand_paths, open_documents


@pytest.fixture(autouse=True)
def private_index_cache(tmp_path, monkeypatch):
    """Document indexes go to the test's own cache, not the user's."""
    monkeypatch.setenv("T5G2_CACHE", str(tmp_path / "t5g2-cache"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("t5g2-cache"))


@pytest.fixture(scope="module")
def corpus_path(cache_dir):
    return corpus.embedded_corpus_path(cache_dir)


def write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def write_jsonl(path, records):
    return write(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def write_arrayrecord(path, records: list[bytes]):
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()
    return str(path)


# -- the embedded corpus ------------------------------------------------------------------


def test_embedded_corpus_is_english_prose_of_useful_size(corpus_path):
    text = open(corpus_path, encoding="utf-8").read()
    documents = text.rstrip("\n").split("\n\n")
    words = text.split()
    assert 500_000 < len(text.encode()) < 5_000_000
    assert len(documents) > 200 and all(d.strip() for d in documents)
    assert sum(w == "the" for w in words) > 0.03 * len(words)  # English: "the" is ~5% of words
    lines = text.split("\n")
    assert not any(line.startswith((">>>", " ", "\t")) for line in lines)
    prose = [line for line in lines if line]
    assert all(line[0].isupper() and line[-1] in ".!?:" for line in prose)


def test_embedded_corpus_is_deterministic_and_cached(cache_dir, corpus_path):
    # A fresh interpreter has a different hash seed (python -I ignores PYTHONHASHSEED): the text
    # must not depend on it.
    again = subprocess.run([sys.executable, "-I", corpus.__file__], capture_output=True,
                           check=True).stdout
    assert again == open(corpus_path, "rb").read()
    mtime = os.stat(corpus_path).st_mtime_ns
    assert corpus.embedded_corpus_path(cache_dir) == corpus_path
    assert os.stat(corpus_path).st_mtime_ns == mtime  # not regenerated
    assert os.listdir(os.path.dirname(corpus_path)) == [os.path.basename(corpus_path)]  # no tmp
    assert f"py{sys.version_info.major}.{sys.version_info.minor}" in corpus_path


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("T5G2_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpus.cache_root(str(tmp_path / "arg")) == str(tmp_path / "arg")
    assert corpus.cache_root() == str(tmp_path / "a")
    monkeypatch.delenv("T5G2_CACHE")
    assert corpus.cache_root() == str(tmp_path / "xdg" / "t5g2")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert corpus.cache_root() == os.path.expanduser("~/.cache/t5g2")


def test_prose_filter_keeps_sentences_and_drops_code():
    doc = """Return the number of items in a container, counting every element once.

        >>> len([1, 2, 3])
        3

    Short line here.

        for item in items: total = total + compute(item) if item else None.

    * A list item that is a whole sentence also counts as English prose.
    """
    assert corpus.prose_paragraphs(doc) == [
        "Return the number of items in a container, counting every element once.",
        "A list item that is a whole sentence also counts as English prose."]


def test_embedded_kind_reads_one_document_per_module(cache_dir, corpus_path):
    docs = open_documents("embedded", cache_dir=cache_dir)
    blocks = open(corpus_path, encoding="utf-8").read().rstrip("\n").split("\n\n")
    assert len(docs) == len(blocks)
    assert docs[0] == blocks[0] and docs[-1] == blocks[-1] and docs.skipped == {}
    with pytest.raises(SourceError, match="kind='embedded' takes no paths"):
        open_documents("embedded", "corpus.txt")


# -- what one document is -----------------------------------------------------------------


def test_text_documents_are_blank_line_separated_blocks(tmp_path):
    path = write(tmp_path / "a.txt", b"\n\nFirst line.\nsecond line\n \t\n\n  indented block\n"
                                     b"ends here\n\nlast, no newline")
    docs = open_documents("text", path)
    assert list(docs) == ["First line.\nsecond line", "  indented block\nends here",
                          "last, no newline"]
    assert docs.report() == "3 documents from 1 text file; nothing skipped"


def test_long_whitespace_runs_scan_in_linear_time(tmp_path):
    spaces = b" \t" * 200_000  # a backtracking block pattern would take hours here
    path = write(tmp_path / "ws.txt", b"a\n" + spaces + b"\n" + spaces + b"b\n\nc" + spaces)
    docs = open_documents("text", path)
    assert list(docs) == ["a", (spaces + b"b").decode(), "c" + spaces.decode()]


def test_random_access_slices_and_bounds(tmp_path):
    paths = [write(tmp_path / f"{i}.txt", f"doc {i}a\n\ndoc {i}b\n".encode()) for i in range(3)]
    docs = open_documents("text", paths)
    expected = [f"doc {i}{s}" for i in range(3) for s in "ab"]
    order = np.random.default_rng(0).permutation(len(expected))
    assert [docs[int(i)] for i in order] == [expected[i] for i in order]
    assert docs[-1] == expected[-1] and docs[1:5:2] == expected[1:5:2]
    with pytest.raises(IndexError, match="document 6 out of range for 6"):
        docs[6]


def test_documents_pickle_without_open_files(tmp_path):
    text = write(tmp_path / "a.txt", b"one\n\ntwo\n")
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": "three"}, {"text": "four"}])
    for docs in (open_documents("text", text), open_documents("jsonl", jsonl, field="text")):
        first = docs[0]  # opens the file in this process
        assert docs.files[0]._reader._fd is not None
        copy = pickle.loads(pickle.dumps(docs))
        assert copy.files[0]._reader._fd is None  # reopened lazily where it is used
        assert copy[0] == first and list(copy) == list(docs)


def test_long_document_reads_back_exactly(tmp_path):
    words = np.random.default_rng(1).choice(["alpha", "beta", "gamma", "δέλτα"], 300_000)
    text = " ".join(words)  # ~2 MB, one line: longer than any window
    docs = open_documents("text", write(tmp_path / "long.txt", text.encode()))
    assert len(docs) == 1 and docs[0] == text


def test_jsonl_parquet_arrayrecord_read_their_documents(tmp_path):
    texts = ["zero", "one ünïcode", "two\nlines", "three"]
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts)])
    assert list(open_documents("jsonl", jsonl, field="text")) == texts
    table = pa.table({"text": texts * 10, "n": list(range(40))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=3)  # 14 row groups
    docs = open_documents("parquet", str(tmp_path / "a.parquet"), field="text")
    order = np.random.default_rng(2).permutation(40)
    assert [docs[int(i)] for i in order] == [(texts * 10)[i] for i in order]
    binary = pa.table({"body": pa.array([t.encode() for t in texts], pa.binary())})
    pq.write_table(binary, tmp_path / "b.parquet")
    assert list(open_documents("parquet", str(tmp_path / "b.parquet"), field="body")) == texts
    records = write_arrayrecord(tmp_path / "a.arrayrecord", [t.encode() for t in texts])
    assert list(open_documents("arrayrecord", records)) == texts


# -- paths and globs ----------------------------------------------------------------------


def test_globs_expand_sorted_without_repeats(tmp_path):
    for name in ("b.txt", "a.txt", "c.md", "sub/d.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    base = str(tmp_path)
    assert expand_paths(f"{base}/*.txt") == [f"{base}/a.txt", f"{base}/b.txt"]
    assert expand_paths([f"{base}/c.md", f"{base}/*.txt", f"{base}/a.txt"]) == [
        f"{base}/c.md", f"{base}/a.txt", f"{base}/b.txt"]
    assert expand_paths(f"{base}/**/*.txt") == [f"{base}/a.txt", f"{base}/b.txt",
                                                f"{base}/sub/d.txt"]
    assert list(open_documents("text", f"{base}/*.txt")) == ["a.txt", "b.txt"]


@pytest.mark.parametrize("paths, message", [
    ("{base}/*.zip", "no file matches the pattern '{base}/*.zip'"),
    ("{base}/missing.txt", "no such file: {base}/missing.txt"),
    ("{base}", "{base} is a directory; name its files"),
    ([], "no paths given"),
])
def test_bad_paths_are_named(tmp_path, paths, message):
    base = str(tmp_path)
    paths = paths.format(base=base) if isinstance(paths, str) else paths
    with pytest.raises(SourceError, match=message.format(base=base).replace("*", r"\*")):
        open_documents("text", paths)


@pytest.mark.parametrize("kind, field, message", [
    ("csv", None, "kind='csv' is not a document source; valid: text, jsonl, parquet"),
    ("jsonl", None, "kind='jsonl' needs field=<the JSON key holding the text>"),
    ("parquet", "", "kind='parquet' needs field=<the column holding the text>"),
    ("text", "text", "field='text' applies to jsonl and parquet, not kind='text'"),
])
def test_bad_arguments_are_named(tmp_path, kind, field, message):
    path = write(tmp_path / "a.txt", b"x\n")
    with pytest.raises(SourceError, match=message):
        open_documents(kind, path, field=field)
    with pytest.raises(SourceError, match="on_bad='ignore'; valid: error, skip"):
        open_documents("text", path, on_bad="ignore")


# -- bad input: an error naming file, place and problem; or skipped and counted -----------


def bad_inputs(tmp_path):
    """(kind, paths, field, error message, skipped counts, documents kept) per bad input.
    Parquet and ArrayRecord open from metadata: their bad records are counted when read
    (`read:` counts, `Documents.read_problems()`) and read as ""."""
    d = tmp_path
    pq.write_table(pa.table({"body": ["x", "y"]}), d / "nocol.parquet")
    pq.write_table(pa.table({"text": [1, 2, 3]}), d / "int.parquet")
    pq.write_table(pa.table({"text": ["ok", None, " "]}), d / "nulls.parquet")
    pq.write_table(pa.table({"text": pa.array([b"ok", b"\xc3("], pa.binary())}),
                   d / "latin.parquet")
    return [
        ("text", [write(d / "empty.txt", b""), write(d / "ok.txt", b"ok\n")], None,
         f"{d}/empty.txt: empty file", {"empty_file": 1}, ["ok"]),
        ("text", [write(d / "blank.txt", b" \n\n\t\n"), f"{d}/ok.txt"], None,
         f"{d}/blank.txt: no documents", {"empty_file": 1}, ["ok"]),
        ("text", write(d / "bytes.txt", b"good one\n\nline two\nbad \xff byte\n\nfine\n"), None,
         fr"{d}/bytes.txt: line 4: not valid UTF-8 \(byte 0xff at file offset 23\)",
         {"non_utf8": 1}, ["good one", "fine"]),
        ("text", write(d / "nbsp.txt", "a\n\n\u00a0\u3000\n\nb".encode()), None,
         f"{d}/nbsp.txt: line 3: empty document", {"empty": 1}, ["a", "b"]),
        ("jsonl", write(d / "notjson.jsonl", b'{"text": "a"}\n{"text": \n'), "text",
         f"{d}/notjson.jsonl: line 2: not JSON", {"not_json": 1}, ["a"]),
        ("jsonl", write_jsonl(d / "nofield.jsonl", [{"text": "a"}, {"body": "b", "id": 1}]), "text",
         f"{d}/nofield.jsonl: line 2: no field 'text' \\(keys: 'body', 'id'\\)",
         {"missing_field": 1}, ["a"]),
        ("jsonl", write_jsonl(d / "types.jsonl", [{"text": 7}, {"text": None}, [1], {"text": "a"},
                                                  {"text": ""}]), "text",
         f"{d}/types.jsonl: line 1: field 'text' is int 7, not a string",
         {"not_string": 2, "not_object": 1, "empty": 1}, ["a"]),
        ("jsonl", write(d / "bytes.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n'), "text",
         fr"{d}/bytes.jsonl: line 2: not valid UTF-8 \(byte 0xff at column 11\)",
         {"non_utf8": 1}, ["a"]),
        ("jsonl", [write(d / "empty.jsonl", b""), write_jsonl(d / "ok.jsonl", [{"text": "a"}])],
         "text", f"{d}/empty.jsonl: empty file", {"empty_file": 1}, ["a"]),
        ("parquet", [f"{d}/nocol.parquet", f"{d}/nulls.parquet"], "text",
         f"{d}/nocol.parquet: no column 'text' \\(columns: 'body'\\)",
         {"missing_field": 2, "read:not_string": 1, "read:empty": 1}, ["ok", "", ""]),
        ("parquet", [f"{d}/int.parquet", f"{d}/latin.parquet"], "text",
         f"{d}/int.parquet: column 'text' has type int64, not string",
         {"not_string": 3, "read:non_utf8": 1}, ["ok", ""]),
        ("parquet", [write(d / "junk.parquet", b"PAR1 nonsense"), f"{d}/latin.parquet"], "text",
         f"{d}/junk.parquet: not a Parquet file", {"unreadable_file": 1, "read:non_utf8": 1},
         ["ok", ""]),
        ("arrayrecord", write_arrayrecord(d / "a.arrayrecord", [b"a", b"\xfe", b"", b"b"]), None,
         fr"{d}/a.arrayrecord: record 1: not valid UTF-8 \(byte 0xfe at offset 0\)",
         {"read:non_utf8": 1, "read:empty": 1}, ["a", "", "", "b"]),
        ("arrayrecord", [write(d / "junk.arrayrecord", b"j" * 70_000), f"{d}/a.arrayrecord"],
         None, f"{d}/junk.arrayrecord: not an ArrayRecord file",
         {"unreadable_file": 1, "read:non_utf8": 1, "read:empty": 1}, ["a", "", "", "b"]),
    ]


def test_bad_input_errors_name_file_place_and_problem(tmp_path):
    for kind, paths, field, message, skipped, _ in bad_inputs(tmp_path):
        with pytest.raises(SourceError, match=message) as info:
            docs = open_documents(kind, paths, field=field)
            assert all(k.startswith("read:") for k in skipped), message  # else open raised
            list(docs)  # Parquet/ArrayRecord records are checked when read
        assert "on_bad='skip'" in str(info.value)


def test_bad_input_skipped_is_counted_and_reported(tmp_path, caplog):
    for kind, paths, field, message, skipped, kept in bad_inputs(tmp_path):
        at_open = {k: v for k, v in skipped.items() if not k.startswith("read:")}
        at_read = {k[len("read:"):]: v for k, v in skipped.items() if k.startswith("read:")}
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="t5g2.data.sources"):
            docs = open_documents(kind, paths, field=field, on_bad="skip")
            assert pickle.loads(pickle.dumps(docs)).skipped == at_open
            assert (list(docs), docs.skipped) == (kept, at_open), message
        assert docs.read_problems() == at_read, message
        report = docs.report()
        assert all(f"{reason}={count}" in report for reason, count in at_open.items())
        read_warnings = [m for m in caplog.messages if "read as an empty document" in m]
        assert caplog.messages == [report] * bool(at_open) + read_warnings  # never silent
        assert len(read_warnings) == sum(at_read.values()), message


def test_nothing_left_after_skipping_is_an_error(tmp_path):
    path = write(tmp_path / "bad.txt", b"\xff\xfe\n")
    with pytest.raises(SourceError, match=f"no documents in {tmp_path}/bad.txt: .*non_utf8=1"):
        open_documents("text", path, on_bad="skip")


def test_documents_is_a_sequence(tmp_path):
    docs = open_documents("text", write(tmp_path / "a.txt", b"a\n\nb\n"))
    assert isinstance(docs, Documents) and "b" in docs and list(reversed(docs)) == ["b", "a"]
    assert docs.paths == (str(tmp_path / "a.txt"),)
