"""Preemption: SIGTERM (TPU maintenance, Slurm, Kubernetes eviction) becomes a checkpoint at the
next step boundary and an orderly exit.

With one process, a SIGTERM handler sets a flag the loop polls between steps. With several,
JAX's own coordination service (started by `jax.distributed.initialize`) receives the signal and
`reached_preemption_sync_point` makes every process stop at the same step, so the checkpoint
they write together is consistent.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

log = logging.getLogger(__name__)

# The exit status after a preemption save: 128 + SIGTERM, what a process killed by SIGTERM
# reports, so schedulers (Kubernetes Jobs, restart loops) treat the run as interrupted and start
# it again rather than as finished.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class PreemptionWatch:
    """`should_stop(step)`: whether a termination request has arrived (and, with several
    processes, every process agrees to stop at this step)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        del frame
        if not self.requested:
            log.warning("received %s: saving a checkpoint after this step, then exiting",
                        signal.Signals(signum).name)
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            self.requested = self.requested or multihost_utils.reached_preemption_sync_point(
                step)
        return self.requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def __enter__(self) -> "PreemptionWatch":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
