"""A local fake of a gs:// bucket for tests: etils.epath's mock backend serves gs://<x> from
<root>/<x>, so code that reaches object stores through `t5g2.fs` (etils.epath) runs unchanged.
Usable in a test process (the `fake_gcs` fixtures) and in a subprocess the test starts."""

from __future__ import annotations

import contextlib
from typing import Iterator
from unittest import mock

OPERATIONS = ("open", "exists", "isdir", "makedirs", "mkdir", "remove", "rename", "replace",
              "stat", "listdir", "walk", "rmtree", "copy")


@contextlib.contextmanager
def fake_gcs(root: str) -> Iterator[list[tuple[str, str]]]:
    """Within it gs://<x> is the local <root>/<x>, and like an object store it refuses to open
    one for appending; yields the list of (operation, gs:// path) calls the fake served."""
    from etils.epath import gpath, testing

    calls: list[tuple[str, str]] = []

    def to_local(p):
        p = str(p)
        return root + "/" + p[len("gs://"):] if p.startswith("gs://") else p

    def to_remote(p):
        p = str(p)
        return "gs://" + p[len(root) + 1:] if p.startswith(root + "/") else p

    def served(name, back=False):
        def fn(original, path, *args, **kwargs):
            if str(path).startswith("gs://"):
                calls.append((name, str(path)))
                mode = args[0] if args else kwargs.get("mode", "r")
                if name == "open" and "a" in mode:  # as object stores: no appending
                    raise OSError(f"{path}: an object cannot be appended to")
            result = original(to_local(path), *[to_local(a) for a in args], **kwargs)
            return [to_remote(r) for r in result] if back else result
        return fn

    overrides = {op: served(op) for op in OPERATIONS}
    overrides["glob"] = served("glob", back=True)
    # With TensorFlow installed, epath sends gs:// to tf.io.gfile rather than its backend table;
    # the mock replaces the table, so route gs:// through it.
    with testing.mock_epath(**overrides), mock.patch.object(gpath, "_is_tf_installed",
                                                            lambda: False):
        yield calls
