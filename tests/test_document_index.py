"""The cached document index: a warm open reads no document, reports the same problems, notices a
changed data file and a corrupt index, survives concurrent builders, and works on gs:// paths
(a local fake of the object store)."""

import json
import logging
import os
import pathlib
import threading
import time
from unittest import mock

import pytest

from t5g2 import fs
from t5g2.data import index as index_lib
from t5g2.data import sources
from t5g2.data.sources import SourceError, open_documents
from tests import fake_store

REAL_SCAN = sources.scan_file  # the fixture below wraps it to count scans


def write_jsonl(path, texts, bad_line=None):
    lines = [json.dumps({"text": t}) for t in texts]
    if bad_line is not None:
        lines.insert(bad_line, '{"text": ')
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def count_scans(monkeypatch):
    """Wraps the scanner: the list of paths it has scanned (in this process)."""
    scanned = []
    real = sources.scan_file

    def counting(kind, field, path, identity):
        scanned.append(path)
        return real(kind, field, path, identity)

    monkeypatch.setattr(sources, "scan_file", counting)
    return scanned


def cache_files(index_dir):
    return sorted(os.listdir(index_dir)) if os.path.isdir(index_dir) else []


def test_warm_open_reads_the_cache_not_the_documents(tmp_path, count_scans, caplog):
    texts = [f"document {i}" for i in range(50)]
    path = write_jsonl(tmp_path / "a.jsonl", texts, bad_line=7)
    index_dir = str(tmp_path / "index")
    with caplog.at_level(logging.WARNING):
        cold = open_documents("jsonl", path, field="text", on_bad="skip", index_dir=index_dir)
    assert count_scans == [path] and list(cold) == texts
    assert len(cache_files(index_dir)) == 1
    cold_warnings = list(caplog.messages)

    def never(*args):
        raise AssertionError("scanned although the index is cached")

    caplog.clear()
    with mock.patch.object(sources, "scan_file", never), caplog.at_level(logging.WARNING):
        warm = open_documents("jsonl", path, field="text", on_bad="skip", index_dir=index_dir)
        # the problems a cold scan found are kept: same counts, same messages, same error
        assert (warm.skipped, warm.skipped_examples) == ({"not_json": 1},
                                                         cold.skipped_examples)
        assert caplog.messages == cold_warnings
        with pytest.raises(SourceError, match=f"{path}: line 8: not JSON"):
            open_documents("jsonl", path, field="text", index_dir=index_dir)
    assert list(warm) == texts and warm.report() == cold.report()


def test_changed_data_file_is_rescanned(tmp_path, count_scans, caplog):
    path = tmp_path / "a.jsonl"
    index_dir = str(tmp_path / "index")
    write_jsonl(path, ["one", "two"])
    open_documents("jsonl", str(path), field="text", index_dir=index_dir)

    write_jsonl(path, ["one", "two", "three"])  # size changes
    with caplog.at_level(logging.WARNING):
        assert list(open_documents("jsonl", str(path), field="text",
                                   index_dir=index_dir)) == ["one", "two", "three"]
    assert "is stale" in caplog.text and "size" in caplog.text

    stat = os.stat(path)  # mtime only (touched, same bytes): rebuilt, same documents
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert list(open_documents("jsonl", str(path), field="text",
                               index_dir=index_dir)) == ["one", "two", "three"]

    # same size, same mtime, other bytes: the head/tail fingerprint notices it
    stat = os.stat(path)
    write_jsonl(path, ["uno", "dos", "three"])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    assert list(open_documents("jsonl", str(path), field="text",
                               index_dir=index_dir)) == ["uno", "dos", "three"]
    assert len(count_scans) == 4
    assert len(cache_files(index_dir)) == 1  # rewritten in place, no leftovers

    open_documents("jsonl", str(path), field="text", index_dir=index_dir)
    assert len(count_scans) == 4  # and now cached again


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "garbage", "other_format"])
def test_corrupt_index_is_rebuilt_not_used(tmp_path, count_scans, caplog, damage):
    texts = [f"text {i}" for i in range(20)]
    path = write_jsonl(tmp_path / "a.jsonl", texts)
    index_dir = str(tmp_path / "index")
    open_documents("jsonl", path, field="text", index_dir=index_dir)
    cache = os.path.join(index_dir, cache_files(index_dir)[0])
    good = open(cache, "rb").read()
    data = {"truncate": good[:-9],
            "flip_payload": good[:-5] + bytes([good[-5] ^ 1]) + good[-4:],
            "garbage": b"\x00" * 100,
            "other_format": good.replace(b'"format": 1', b'"format": 9')}[damage]
    open(cache, "wb").write(data)
    with caplog.at_level(logging.WARNING):
        docs = open_documents("jsonl", path, field="text", index_dir=index_dir)
    assert list(docs) == texts and len(count_scans) == 2
    assert "is corrupt" in caplog.text and cache in caplog.text
    assert open(cache, "rb").read() == good  # rebuilt in place


def build_in_threads(n, target):
    results = [None] * n
    errors = []

    def run(k):
        try:
            results[k] = target(k)
        except BaseException as e:  # reported by the test, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,), name=f"builder-{k}") for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_racing_builders_write_one_intact_index(tmp_path, monkeypatch):
    """Two builders that both claim a file at the same instant scan it both (both scans finish
    before either writes); both open the documents, and the cache holds one whole, valid index
    and no temporary or claim files."""
    texts = [f"doc {i} " * 20 for i in range(200)]
    path = write_jsonl(tmp_path / "a.jsonl", texts)
    index_dir = str(tmp_path / "index")
    both_scanned = threading.Barrier(2, timeout=30)
    real = sources.scan_file

    def scan_then_wait(*args):
        result = real(*args)
        both_scanned.wait()
        return result

    monkeypatch.setattr(sources, "scan_file", scan_then_wait)
    monkeypatch.setattr(index_lib._Claim, "is_fresh", lambda self: False)  # claims crossed
    results = build_in_threads(2, lambda k: list(open_documents(
        "jsonl", path, field="text", index_dir=index_dir, index_workers=0)))
    assert results == [texts, texts]
    names = cache_files(index_dir)
    assert len(names) == 1 and names[0].endswith(".index")
    assert index_lib.decode(open(os.path.join(index_dir, names[0]), "rb").read()).path == path


def test_a_claimed_file_is_waited_for_not_scanned_twice(tmp_path, monkeypatch, count_scans):
    """Builder B finds A's claim on a file and waits for A's index instead of scanning it."""
    texts = [f"doc {i}" for i in range(30)]
    path = write_jsonl(tmp_path / "a.jsonl", texts)
    index_dir = str(tmp_path / "index")
    monkeypatch.setattr(index_lib, "_POLL_S", 0.02)
    a_scanning, b_waiting = threading.Event(), threading.Event()
    scan = sources.scan_file  # counting

    def scan_slowly_in_a(*args):
        if threading.current_thread().name == "builder-0":
            a_scanning.set()
            assert b_waiting.wait(30)  # A holds its claim until B is waiting for the index
        return scan(*args)

    monkeypatch.setattr(sources, "scan_file", scan_slowly_in_a)

    real_wait = index_lib._from_other_builder

    def waiting(*args):
        b_waiting.set()
        return real_wait(*args)

    monkeypatch.setattr(index_lib, "_from_other_builder", waiting)

    def builder(k):
        if k == 1:
            assert a_scanning.wait(30)  # B starts once A holds the claim
        return list(open_documents("jsonl", path, field="text", index_dir=index_dir,
                                   index_workers=0))

    assert build_in_threads(2, builder) == [texts, texts]
    assert count_scans == [path]  # scanned once, by A
    assert cache_files(index_dir) == [os.path.basename(index_lib.cache_file(
        index_dir, "jsonl", "text", path))]  # claim removed


def test_hosts_split_a_cold_scan(tmp_path, monkeypatch, count_scans):
    """A file another host has claimed is left to it: this builder scans the other files
    meanwhile, then takes the claimed file's index when that host has written it."""
    paths = [write_jsonl(tmp_path / f"{i}.jsonl", [f"file {i} doc {k}" for k in range(5)])
             for i in range(3)]
    index_dir = str(tmp_path / "index")
    monkeypatch.setattr(index_lib, "_POLL_S", 0.02)
    other_host = index_lib._Claim(index_lib.cache_file(index_dir, "jsonl", "text", paths[1]))
    other_host.__enter__()  # holds file 1

    def finish_other_host():  # once this builder has scanned files 0 and 2
        deadline = time.time() + 30
        while len(count_scans) < 2 and time.time() < deadline:
            time.sleep(0.01)
        index_lib.save(other_host.path[:-len(".building")],
                       REAL_SCAN("jsonl", "text", paths[1], fs.identity(paths[1])))
        other_host.__exit__(None, None, None)

    helper = threading.Thread(target=finish_other_host)
    helper.start()
    docs = open_documents("jsonl", paths, field="text", index_dir=index_dir, index_workers=0)
    helper.join(30)
    assert list(docs) == [f"file {i} doc {k}" for i in range(3) for k in range(5)]
    assert count_scans == [paths[0], paths[2]]  # file 1 came from the other host


def test_an_abandoned_claim_is_ignored(tmp_path, count_scans):
    path = write_jsonl(tmp_path / "a.jsonl", ["one", "two"])
    index_dir = str(tmp_path / "index")
    claim = index_lib.cache_file(index_dir, "jsonl", "text", path) + ".building"
    os.makedirs(index_dir)
    open(claim, "w").write("{}")
    old = os.stat(claim).st_mtime - index_lib.CLAIM_FRESH_S - 1  # its builder died
    os.utime(claim, (old, old))
    assert list(open_documents("jsonl", path, field="text", index_dir=index_dir)) == [
        "one", "two"]
    assert count_scans == [path] and not os.path.exists(claim)


def test_worker_processes_build_the_same_indexes(tmp_path, caplog):
    texts = [f"doc {i} " * 20 for i in range(200)]
    paths = [write_jsonl(tmp_path / f"{i}.jsonl", texts[i::2]) for i in range(2)]
    index_dir = str(tmp_path / "index")
    with caplog.at_level(logging.INFO, logger="t5g2.data.index"):
        docs = open_documents("jsonl", paths, field="text", index_dir=index_dir,
                              index_workers=2)
    assert "scanning 2 with 2 processes" in caplog.text
    assert list(docs) == texts[0::2] + texts[1::2]
    names = cache_files(index_dir)
    assert len(names) == 2 and all(n.endswith(".index") for n in names)
    assert sorted(index_lib.decode(open(os.path.join(index_dir, name), "rb").read()).path
                  for name in names) == paths


# -- object-store paths, through a local fake of gs:// ---------------------------------------

@pytest.fixture
def fake_gcs(tmp_path):
    """gs://<x> is served from <tmp_path>/gcs/<x> through etils.epath's mock backend
    (tests/fake_store.py); returns the root and the list of (operation, gs:// path) calls served."""
    root = str(tmp_path / "gcs")
    with fake_store.fake_gcs(root) as calls:
        yield root, calls


def test_gs_corpus_is_read_and_indexed_through_epath(fake_gcs, count_scans):
    root, calls = fake_gcs
    os.makedirs(f"{root}/bucket/corpus")
    texts = {name: [f"{name} {i}" for i in range(5)] for name in ("b", "a")}
    for name, docs in texts.items():
        write_jsonl(pathlib.Path(f"{root}/bucket/corpus/{name}.jsonl"), docs)
    pattern, index_dir = "gs://bucket/corpus/*.jsonl", "gs://bucket/index"
    docs = open_documents("jsonl", pattern, field="text", index_dir=index_dir)
    assert docs.paths == ("gs://bucket/corpus/a.jsonl", "gs://bucket/corpus/b.jsonl")
    assert list(docs) == texts["a"] + texts["b"] and len(count_scans) == 2
    assert ("glob", pattern) in calls and ("open", "gs://bucket/corpus/b.jsonl") in calls
    assert len(os.listdir(f"{root}/bucket/index")) == 2  # written to the "bucket"
    assert any(op == "replace" and path.startswith(index_dir) for op, path in calls)

    again = open_documents("jsonl", pattern, field="text", index_dir=index_dir)
    assert list(again) == list(docs) and len(count_scans) == 2  # cached in the bucket
    with pytest.raises(SourceError, match="no file matches the pattern 'gs://bucket/x/"):
        open_documents("jsonl", "gs://bucket/x/*.jsonl", field="text", index_dir=index_dir)
    with pytest.raises(SourceError, match="no such file: gs://bucket/corpus/c.jsonl"):
        open_documents("jsonl", "gs://bucket/corpus/c.jsonl", field="text")


def test_parquet_and_arrayrecord_open_without_reading_a_record(tmp_path, count_scans):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python import array_record_module

    texts = [f"row {i}" for i in range(30)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet", row_group_size=7)
    writer = array_record_module.ArrayRecordWriter(str(tmp_path / "a.ar"), "group_size:1")
    for t in texts:
        writer.write(t.encode())
    writer.close()
    with mock.patch("pyarrow.parquet.ParquetFile.read_row_group",
                    side_effect=AssertionError("read a row group at open")):
        docs = open_documents("parquet", str(tmp_path / "a.parquet"), field="text")
    assert len(docs) == 30 and docs[29] == "row 29" and docs[7] == "row 7"
    from array_record.python import array_record_data_source as ards
    with mock.patch.object(ards.ArrayRecordDataSource, "__getitem__",
                           side_effect=AssertionError("read a record at open")), \
            mock.patch.object(ards.ArrayRecordDataSource, "__getitems__",
                              side_effect=AssertionError("read records at open")):
        records = open_documents("arrayrecord", str(tmp_path / "a.ar"))
    assert len(records) == 30 and list(records) == texts
    assert count_scans == []  # no index built for either
