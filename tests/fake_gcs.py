"""A local Google Cloud Storage server for tests: the JSON API's object calls over HTTP on
127.0.0.1, objects kept in memory, every request recorded.

`FakeGcs.env()` points a process's three GCS clients at it, so their own code runs unchanged:
tensorstore's gcs driver (orbax's arrays: TENSORSTORE_GCS_HTTP_URL and a fixed test token),
google-cloud-storage (orbax reads the bucket's settings: STORAGE_EMULATOR_HOST, which also makes
it anonymous) and gcsfs (etils.epath's gs:// backend, `t5g2.fs`: STORAGE_EMULATOR_HOST,
anonymous). No credentials are given, and the metadata-server lookups come here too.

Served as Cloud Storage answers them: bucket get; object get (metadata, or media with byte
ranges and the x-goog-generation header), list (prefix, delimiter, pages, start/end offsets),
insert (media, multipart and resumable uploads), delete, rewriteTo / copyTo / moveTo; each with
the generation preconditions (ifGenerationMatch=0 to create, ...), on which tensorstore's writes
rely. Anything else is answered 501 and recorded, so a test sees a call this fake does not know.
The bucket has a flat namespace (not hierarchical). gcsfs's lookup of a bucket's kind goes over
the gRPC storage-control API, which is not served: the process uses gcsfs's JSON-API filesystem,
the one gcsfs uses for a standard bucket.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import itertools
import json
import os
import sys
import threading
import time
import uuid
from typing import NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit


class Request(NamedTuple):
    method: str
    path: str
    user_agent: str
    status: int


class _Object(NamedTuple):
    data: bytes
    generation: int
    content_type: str
    updated: float


class _Answer(Exception):
    """An answer other than 200 with a JSON body."""

    def __init__(self, status: int, message: str = "", headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        self.body = json.dumps({"error": {"code": status, "message": message}}).encode() \
            if message else b""


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class FakeGcs:
    """`with FakeGcs(bucket_names=("bucket",)) as gcs:` a server at `gcs.url`;
    `gcs.objects(bucket)` is what the bucket holds, `gcs.requests` what the server was asked."""

    def __init__(self, bucket_names: tuple[str, ...] = ("bucket",)):
        self._buckets: dict[str, dict[str, _Object]] = {name: {} for name in bucket_names}
        self._uploads: dict[str, dict] = {}
        self._generations = itertools.count(int(time.time() * 1e6))
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.gcs = self
        self._httpd.handle_error = self._handle_error
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-gcs",
                                        daemon=True)

    # -- for the test ------------------------------------------------------------------------------
    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """{name: bytes} of the bucket's objects under `prefix`."""
        with self._lock:
            return {name: obj.data for name, obj in self._buckets[bucket].items()
                    if name.startswith(prefix)}

    def put(self, bucket: str, name: str, data: bytes) -> None:
        """Stores an object as an upload would."""
        with self._lock:
            self._buckets[bucket][name] = _Object(data, next(self._generations),
                                                  "application/octet-stream", time.time())

    def copy_out(self, bucket: str, prefix: str, directory: str) -> None:
        """Writes the objects under `prefix` ("a/b/") as files under `directory`, for readers of
        local files."""
        for name, data in self.objects(bucket, prefix).items():
            path = os.path.join(directory, name[len(prefix):])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)

    def env(self, base: dict[str, str], credentials_dir: str) -> dict[str, str]:
        """`base` with the variables that send a process's GCS clients here and nowhere else,
        without credentials; `credentials_dir`: an empty directory standing for the user's
        gcloud configuration."""
        host = self.url.removeprefix("http://")
        env = {k: v for k, v in base.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
        return dict(
            env,
            STORAGE_EMULATOR_HOST=self.url,            # google-cloud-storage, gcsfs
            TENSORSTORE_GCS_HTTP_URL=self.url,         # tensorstore's gcs driver
            GOOGLE_AUTH_TOKEN_FOR_TESTING="fake-gcs",  # tensorstore: no credential lookup
            GCE_METADATA_HOST=host, GCE_METADATA_IP=host,  # google-auth's metadata server
            GCE_METADATA_ROOT=host,                    # tensorstore's metadata server
            NO_GCE_CHECK="true",
            CLOUDSDK_CONFIG=credentials_dir,
            GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",  # no gRPC storage-control lookups
            NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
        )

    def __enter__(self) -> "FakeGcs":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def _handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up
            http.server.HTTPServer.handle_error(self._httpd, request, client_address)

    # -- the API -----------------------------------------------------------------------------------
    def handle(self, method: str, raw_path: str, query: dict[str, str], headers, body: bytes,
               base: str) -> tuple[int, dict[str, str], bytes]:
        parts = [unquote(p) for p in raw_path.strip("/").split("/")]
        with self._lock:
            if parts[:3] == ["storage", "v1", "b"] and len(parts) >= 4:
                bucket, rest = self._bucket(parts[3]), parts[4:]
                if not rest and method == "GET":
                    return self._json(dict(kind="storage#bucket", id=parts[3], name=parts[3],
                                           metageneration="1", storageClass="STANDARD",
                                           location="US", locationType="multi-region"))
                if rest == ["o"] and method == "GET":
                    return self._json(self._list(bucket, query, base, parts[3]))
                if len(rest) == 2 and rest[0] == "o":
                    if method == "GET":
                        return self._get(bucket, parts[3], rest[1], query, headers, base)
                    if method == "DELETE":
                        return self._delete(bucket, rest[1], query)
                if len(rest) == 6 and rest[0] == "o" and method == "POST" and \
                        rest[2] in ("rewriteTo", "copyTo") and rest[3] == "b" and rest[5]:
                    return self._copy(bucket, rest[1], parts[3], rest[4], rest[5], query, base,
                                      rewrite=rest[2] == "rewriteTo")
                if len(rest) == 5 and rest[0] == "o" and rest[2:4] == ["moveTo", "o"] and \
                        method == "POST":
                    result = self._copy(bucket, rest[1], parts[3], parts[3], rest[4], query,
                                        base, rewrite=False)
                    del bucket[rest[1]]
                    return result
            if parts[:4] == ["download", "storage", "v1", "b"] and len(parts) == 7 and \
                    parts[5] == "o" and method == "GET":
                return self._get(self._bucket(parts[4]), parts[4], parts[6],
                                 dict(query, alt="media"), headers, base)
            if parts[:4] == ["upload", "storage", "v1", "b"] and parts[5:] == ["o"] and \
                    method in ("POST", "PUT"):
                return self._upload(self._bucket(parts[4]), parts[4], query, headers, body,
                                    base)
        if parts == [""] or parts[0] == "computeMetadata":  # no Compute Engine metadata here
            raise _Answer(404, "not a Compute Engine VM")
        raise _Answer(501, f"the fake GCS does not serve {method} {raw_path}")

    def _bucket(self, name: str) -> dict[str, _Object]:
        if name not in self._buckets:
            raise _Answer(404, f"no bucket {name}")
        return self._buckets[name]

    @staticmethod
    def _json(value) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Type": "application/json"}, json.dumps(value).encode()

    @staticmethod
    def _resource(bucket: str, name: str, obj: _Object, base: str) -> dict:
        md5 = base64.b64encode(hashlib.md5(obj.data).digest()).decode()
        quoted = quote(name, safe="")
        return dict(
            kind="storage#object", id=f"{bucket}/{name}/{obj.generation}", name=name,
            bucket=bucket, generation=str(obj.generation), metageneration="1",
            contentType=obj.content_type, size=str(len(obj.data)), md5Hash=md5,
            etag=md5, storageClass="STANDARD", timeCreated=_rfc3339(obj.updated),
            updated=_rfc3339(obj.updated),
            selfLink=f"{base}/storage/v1/b/{bucket}/o/{quoted}",
            mediaLink=f"{base}/download/storage/v1/b/{bucket}/o/{quoted}"
                      f"?generation={obj.generation}&alt=media")

    @staticmethod
    def _check(obj: _Object | None, query: dict[str, str], *, reading: bool = False) -> None:
        """The generation preconditions: 412 when one fails (304 for a read whose
        ifGenerationNotMatch holds, as Cloud Storage answers)."""
        generation = obj.generation if obj else 0
        if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != generation:
            raise _Answer(412, "ifGenerationMatch failed")
        if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == generation:
            raise _Answer(304 if reading else 412, "" if reading else "ifGenerationNotMatch")
        if "ifMetagenerationMatch" in query and obj and query["ifMetagenerationMatch"] != "1":
            raise _Answer(412, "ifMetagenerationMatch failed")

    def _get(self, bucket, bucket_name, name, query, headers, base):
        obj = bucket.get(name)
        if obj is None:
            raise _Answer(404, f"no object {name}")
        self._check(obj, query, reading=True)
        if query.get("alt") != "media":
            return self._json(self._resource(bucket_name, name, obj, base))
        out = {"Content-Type": obj.content_type, "x-goog-generation": str(obj.generation),
               "x-goog-metageneration": "1", "x-goog-stored-content-length": str(len(obj.data)),
               "x-goog-hash": "md5=" + self._resource(bucket_name, name, obj, base)["md5Hash"]}
        wanted = headers.get("Range")
        if not wanted:
            return 200, out, obj.data
        size = len(obj.data)
        first, last = wanted.removeprefix("bytes=").split("-")
        start, end = ((size - int(last), size - 1) if first == "" else
                      (int(first), min(int(last), size - 1) if last else size - 1))
        if start >= size or start < 0:
            raise _Answer(416, "range not satisfiable", {"Content-Range": f"bytes */{size}"})
        out["Content-Range"] = f"bytes {start}-{end}/{size}"
        return 206, out, obj.data[start:end + 1]

    def _delete(self, bucket, name, query):
        obj = bucket.get(name)
        if obj is None:
            raise _Answer(404, f"no object {name}")
        self._check(obj, query)
        del bucket[name]
        return 204, {}, b""

    def _list(self, bucket, query, base, bucket_name) -> dict:
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        start, end = query.get("startOffset", ""), query.get("endOffset")
        entries: set[tuple[str, bool]] = set()  # (object name or prefix, is a prefix)
        for name in bucket:
            if not name.startswith(prefix) or name < start or (end and name >= end):
                continue
            cut = name.find(delimiter, len(prefix)) if delimiter else -1
            if cut >= 0:
                entries.add((name[:cut + len(delimiter)], True))
            if cut < 0 or (query.get("includeTrailingDelimiter") == "true" and
                           cut + len(delimiter) == len(name)):
                entries.add((name, False))
        ordered = sorted(e for e in entries if e[0] > query.get("pageToken", ""))
        page = ordered[:int(query.get("maxResults", 1000))]
        result = dict(kind="storage#objects",
                      items=[self._resource(bucket_name, key, bucket[key], base)
                             for key, is_prefix in page if not is_prefix],
                      prefixes=sorted({key for key, is_prefix in page if is_prefix}))
        if len(page) < len(ordered):
            result["nextPageToken"] = page[-1][0]
        return result

    def _store(self, bucket, bucket_name, name, data, content_type, query, base):
        if not name:
            raise _Answer(400, "an object needs a name")
        self._check(bucket.get(name), query)
        bucket[name] = _Object(data, next(self._generations), content_type, time.time())
        return self._json(self._resource(bucket_name, name, bucket[name], base))

    def _copy(self, bucket, name, bucket_name, target_bucket, target, query, base, rewrite):
        obj = bucket.get(name)
        if obj is None:
            raise _Answer(404, f"no object {name}")
        status, headers, body = self._store(self._bucket(target_bucket), target_bucket, target,
                                            obj.data, obj.content_type, query, base)
        if not rewrite:
            return status, headers, body
        size = str(len(obj.data))
        return self._json(dict(kind="storage#rewriteResponse", done=True, objectSize=size,
                               totalBytesRewritten=size, resource=json.loads(body)))

    def _upload(self, bucket, bucket_name, query, headers, body, base):
        kind = query.get("uploadType")
        content_type = headers.get("Content-Type") or "application/octet-stream"
        if kind == "media":
            return self._store(bucket, bucket_name, query.get("name", ""), body, content_type,
                               query, base)
        if kind == "multipart":
            meta, data = _multipart(content_type, body)
            return self._store(bucket, bucket_name, meta.get("name") or query.get("name", ""),
                               data, meta.get("contentType", "application/octet-stream"),
                               query, base)
        if kind == "resumable" and "upload_id" not in query:
            meta = json.loads(body) if body else {}
            upload_id = uuid.uuid4().hex
            self._uploads[upload_id] = dict(
                name=meta.get("name") or query.get("name", ""), data=bytearray(), query=query,
                content_type=headers.get("X-Upload-Content-Type") or meta.get("contentType")
                or "application/octet-stream")
            return 200, {"Location": f"{base}/upload/storage/v1/b/{bucket_name}/o?"
                                     f"uploadType=resumable&upload_id={upload_id}"}, b""
        if kind == "resumable":
            upload = self._uploads.get(query["upload_id"])
            if upload is None:
                raise _Answer(404, "no such upload")
            total = None
            content_range = headers.get("Content-Range", "")
            if content_range:
                span, _, total_text = content_range.removeprefix("bytes ").partition("/")
                total = None if total_text == "*" else int(total_text)
                if span != "*":
                    offset = int(span.split("-")[0])
                    del upload["data"][offset:]
                    upload["data"] += body
            else:
                upload["data"] += body
                total = len(upload["data"])
            if total is None or len(upload["data"]) < total:
                received = len(upload["data"])
                return 308, {"Range": f"bytes=0-{received - 1}"} if received else {}, b""
            del self._uploads[query["upload_id"]]
            return self._store(bucket, bucket_name, upload["name"], bytes(upload["data"]),
                               upload["content_type"], upload["query"], base)
        raise _Answer(501, f"the fake GCS does not serve uploadType={kind}")


def _multipart(content_type: str, body: bytes) -> tuple[dict, bytes]:
    """(metadata, data) of a multipart/related upload: a JSON part, then the object's bytes."""
    boundary = content_type.split("boundary=", 1)[1].strip('"').encode()
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, content = chunk.partition(b"\r\n\r\n")
        parts.append(content.removesuffix(b"\r\n"))
    return json.loads(parts[0]), parts[1]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _serve(self):
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        body = self._body()
        gcs: FakeGcs = self.server.gcs
        try:
            status, headers, payload = gcs.handle(self.command, url.path, query, self.headers,
                                                  body, f"http://{self.headers['Host']}")
        except _Answer as answer:
            status, headers, payload = answer.status, answer.headers, answer.body
            if payload:
                headers = dict(headers, **{"Content-Type": "application/json"})
        with gcs._lock:
            gcs._requests.append(Request(self.command, self.path,
                                         self.headers.get("User-Agent", ""), status))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if status not in (204, 304):
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass
