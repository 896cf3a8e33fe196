"""Signals a running job gets: SIGTERM (TPU maintenance, Slurm, Kubernetes eviction) becomes a
checkpoint at the next step boundary and an orderly exit; SIGUSR1 asks for a checkpoint and
training goes on (`kill -USR1 <pid>`: a save on demand, e.g. before trying something risky).

SIGTERM: with one process, a handler sets a flag the loop polls between steps. With several,
JAX's own coordination service (started by `jax.distributed.initialize`) receives the signal and
`reached_preemption_sync_point` makes every process stop at the same step, so the checkpoint
they write together is consistent.
SIGUSR1: with one process, honoured after the current step. With several, the processes agree
at the next step that is a multiple of `agree_every` (an all-gather of one flag), so a signal to
any one of them is enough.
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


class PreemptionWatch:
    """`should_stop(step)`: a termination request has arrived (and every process agrees to stop
    at this step); `save_requested(step)`: a checkpoint was asked for (SIGUSR1)."""

    def __init__(self, agree_every: int = 1):
        self.requested = False
        self._save = False
        self.agree_every = agree_every
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
            log.warning("received %s: saving a checkpoint after this step, then exiting",
                        signal.Signals(signum).name)
        self.requested = True

    def _on_sigusr1(self, signum, frame) -> None:
        del signum, frame
        log.info("received SIGUSR1: saving a checkpoint after this step")
        self._save = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(
                step)
        return self.requested

    def save_requested(self, step: int) -> bool:
        """Whether to save at `step` (clears the request). All processes call it every step."""
        if jax.process_count() > 1:
            if step % self.agree_every:
                return False
            from jax.experimental import multihost_utils

            wanted = bool(np.any(multihost_utils.process_allgather(np.asarray(self._save))))
        else:
            wanted = self._save
        self._save = False
        return wanted

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def __enter__(self) -> "PreemptionWatch":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
