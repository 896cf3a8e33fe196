"""Signals a running job gets: SIGTERM (TPU maintenance, Slurm, Kubernetes eviction) becomes a
checkpoint at the next step boundary and an orderly exit; SIGUSR1 asks for a checkpoint and
training goes on (`kill -USR1 <pid>`: a save on demand, e.g. before trying something risky).

The loop keeps at most one step queued on the device beyond the one it waits for, so "the next
step boundary" is the end of the step running when the signal arrives or of the one after it,
whatever `train.log_every` is.
SIGTERM: with one process, a handler sets a flag the loop polls between steps. With several,
JAX's own coordination service (started by `jax.distributed.initialize`) receives the signal and
`reached_preemption_sync_point` makes every process stop at the same step (the highest step any
process has reached, plus one), so the checkpoint they write together is consistent.
SIGUSR1: the process's flag travels in the next batch it feeds (`request_column`: the
CHECKPOINT_REQUEST column), and the step returns its maximum over all rows: every process reads
it from the same step's metrics and saves at the same step, a few steps after the signal, with
no collective of its own. A signal to any one process is enough.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np

log = logging.getLogger(__name__)

# The exit status after a preemption save: 128 + SIGTERM, what a process killed by SIGTERM
# reports, so schedulers (Kubernetes Jobs, restart loops) treat the run as interrupted and start
# it again rather than as finished.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
# A [batch, 1] int column the loop adds to each batch: every process fills its own rows with its
# checkpoint request; the train step returns the maximum as the replicated metric
# `checkpoint_requested`, so all processes learn of any one's request at the same step.
CHECKPOINT_REQUEST = "checkpoint_request"


class PreemptionWatch:
    """`should_stop(step)`: a termination request has arrived (and every process agrees to stop
    at this step); `request_column(rows)`: this process's checkpoint request (SIGUSR1), for the
    step to share with every process."""

    def __init__(self):
        self.requested = False
        self._save = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            # Several processes: JAX's preemption notifier owns SIGTERM.
            mine = {signal.SIGUSR1: self._on_sigusr1}
            if jax.process_count() == 1:
                mine[signal.SIGTERM] = self._on_sigterm
            self._previous = {s: signal.signal(s, handler) for s, handler in mine.items()}

    def _on_sigterm(self, signum, frame) -> None:
        del frame
        if not self.requested:
            log.warning("received %s: saving a checkpoint at the next step boundary, then "
                        "exiting", signal.Signals(signum).name)
        self.requested = True

    def _on_sigusr1(self, signum, frame) -> None:
        del signum, frame
        log.info("received SIGUSR1: saving a checkpoint in the next steps")
        self._save = True

    def should_stop(self, step: int) -> bool:
        """All processes call it at every step."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(
                step)
        return self.requested

    def request_column(self, rows: int) -> dict[str, np.ndarray]:
        """{CHECKPOINT_REQUEST: [rows, 1]}, 1 when a checkpoint was asked for since the last call
        (which clears the request), to add to this process's rows of the next batch."""
        column = np.full((rows, 1), int(self._save), np.int32)
        self._save = False
        return {CHECKPOINT_REQUEST: column}

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def __enter__(self) -> "PreemptionWatch":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
