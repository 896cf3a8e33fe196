"""Every process of a multi-host run must see one workdir: checked before anything starts.

Each process writes its checkpoint shards into the workdir and process 0 commits them, so a
workdir that is not shared (a relative path on each host's own disk) breaks the first checkpoint
save, possibly thousands of steps in, and leaves the processes waiting on each other. At start,
process 0 writes a marker whose name carries a token it draws and sends to all (a marker left by
an earlier run can never pass for this one), every process looks for it until the timeout, and
all processes learn who saw it: if one did not, every process stops at once with the same
`ConfigError`, naming the hosts that do not see the marker and the path.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time

import jax
import numpy as np

from t5g2 import fs
from t5g2.configlib import ConfigError

log = logging.getLogger(__name__)

_HOST_BYTES = 64  # a host name travels as this many bytes in the all-gather


def check_shared_workdir(workdir: str, timeout_s: float, poll_s: float = 0.1) -> None:
    """Returns when every process sees the marker process 0 wrote into `workdir` within
    `timeout_s`; otherwise raises ConfigError on every process. One process: nothing to check.
    Every process must call it (two collectives)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    if not timeout_s > 0:
        raise ConfigError(f"shared_workdir_timeout_s={timeout_s!r}: must be > 0 (seconds the "
                          "other processes wait for process 0's marker in the workdir)")
    token = np.asarray(multihost_utils.broadcast_one_to_all(
        np.frombuffer(secrets.token_bytes(8), np.uint32))).view(np.uint64)[0]
    marker = fs.join(workdir, f".t5g2-shared-workdir-{int(token):016x}")
    problem = ""
    if jax.process_index() == 0:
        try:
            fs.makedirs(workdir)
            fs.write_text(marker, socket.gethostname())
        except OSError as e:
            problem = f"; process 0 could not write it: {e}"
    deadline = time.monotonic() + timeout_s
    seen = _visible(marker)
    while not seen and not problem and time.monotonic() < deadline:
        time.sleep(poll_s)
        seen = _visible(marker)

    gathered = multihost_utils.process_allgather(
        np.concatenate([[np.uint8(seen)], _host_bytes(socket.gethostname())]))
    if jax.process_index() == 0 and not problem:
        try:
            fs.remove(marker)
        except OSError as e:  # harmless: a marker is a few bytes under a name never reused
            log.warning("could not remove %s: %s", marker, e)
    blind = [(i, bytes(row[1:]).rstrip(b"\0").decode(errors="replace"))
             for i, row in enumerate(gathered) if not row[0]]
    if blind:
        hosts = ", ".join(f"process {i} on host {host}" for i, host in blind)
        raise ConfigError(
            f"workdir {workdir} is not shared by all processes: {hosts} cannot see {marker}, "
            f"which process 0 wrote{problem} (waited {timeout_s:g} s, shared_workdir_timeout_s)."
            " Every process writes its checkpoint shards there: give every host the same "
            "workdir, a file system mounted at the same path on every host or an object-store"
            " URL such as gs://bucket/run")
    log.info("workdir %s is shared by all %d processes", workdir, jax.process_count())


def _visible(path: str) -> bool:
    try:
        return fs.exists(path)
    except OSError:  # e.g. a stale NFS handle: not visible yet
        return False


def _host_bytes(host: str) -> np.ndarray:
    raw = host.encode()[:_HOST_BYTES]
    return np.frombuffer(raw.ljust(_HOST_BYTES, b"\0"), np.uint8)
