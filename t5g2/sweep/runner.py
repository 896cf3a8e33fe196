"""Runs a sweep's members on this machine, one after another, each as its own
`python -m launch.train` process, so a member's crash or kill leaves the sweep's bookkeeping
standing.

Each member's workdir holds `sweep_status.json`: its status, the flags it ran with, its exit
code and wall time. `finished` is written only after the process exited 0 at the configured final
step, and a finished member is skipped on the next run; any other member is run again, and
`launch.train` resumes it from its own checkpoints. A workdir whose recorded flags differ from
the sweep's now is refused (its checkpoints belong to another config), never silently reused.

SIGTERM (or SIGINT) to the sweep is forwarded to the running member, which saves a checkpoint
and exits 143; the member is recorded as interrupted, the results written, and the sweep exits
128 + the signal. A member that fails is recorded as failed and the sweep goes on with the next;
it exits non-zero at the end if any member did not finish.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from t5g2.configlib import ConfigError
from t5g2.sweep.spec import REPO, Member, Sweep, config_path, flag_value, member_workdir

STATUS_FILE = "sweep_status.json"
LOG_FILE = "train.log"  # the member's stdout and stderr, appended across attempts
FINISHED, FAILED, INTERRUPTED, PENDING, RUNNING = (
    "finished", "failed", "interrupted", "pending", "running")
TRAIN_COMMAND = (sys.executable, "-m", "launch.train")


def read_status(workdir: str) -> dict[str, Any] | None:
    path = os.path.join(workdir, STATUS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_status(workdir: str, **status: Any) -> None:
    """Atomically (a kill mid-write leaves the previous status)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, STATUS_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(status, f, indent=1)
    os.replace(path + ".tmp", path)


def member_status(sweep: Sweep, sweep_workdir: str, member: Member) -> str:
    """finished, failed, interrupted (also a member whose sweep was killed while it ran: it
    resumes), or pending (never started)."""
    status = read_status(member_workdir(sweep_workdir, member))
    if status is None:
        return PENDING
    return INTERRUPTED if status["status"] == RUNNING else status["status"]


def check_unchanged(sweep: Sweep, sweep_workdir: str, members: Sequence[Member]) -> None:
    """ConfigError if a member's workdir ran with other flags than the sweep gives it now."""
    for member in members:
        workdir = member_workdir(sweep_workdir, member)
        status = read_status(workdir)
        if status is not None and status.get("flags") != sweep.flags(member):
            raise ConfigError(
                f"member {member.name}: {workdir} ran with flags {status.get('flags')}, the "
                f"sweep now gives {sweep.flags(member)}: its checkpoints belong to the old "
                "config; remove that directory (or use another --workdir) to run it anew")


def last_logged_step(workdir: str) -> int | None:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    steps = []
    with open(path) as f:
        for line in f:
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue
    return max(steps, default=None)


def select(sweep: Sweep, only: Sequence[str] | None) -> list[Member]:
    """The members named in `only` (all if None or empty), in the sweep's order."""
    if not only:
        return list(sweep.members)
    names = [sweep.member(name).name for name in only]  # ConfigError for an unknown name
    return [m for m in sweep.members if m.name in names]


def describe(sweep: Sweep, sweep_workdir: str, members: Sequence[Member]) -> str:
    """What --dry_run prints: each member's status, workdir and overrides."""
    lines = [f"sweep {sweep.name}: {len(members)} of {len(sweep.members)} members, base "
             f"{sweep.config}, baseline {sweep.baseline}",
             f"common: {' '.join(f'--config.{k}={flag_value(v)}' for k, v in sweep.common) or '-'}"]
    for member in members:
        overrides = ", ".join(f"{k}={v!r}" for k, v in member.overrides) or "(base config)"
        lines.append(f"  {member_status(sweep, sweep_workdir, member):<11} {member.name:<32} "
                     f"{overrides}   -> {member_workdir(sweep_workdir, member)}")
    return "\n".join(lines)


class LocalRunner:
    """Runs members one after another (see the module docstring); `steps` maps a member name
    to its configured final step; `collect` (sweep_workdir) is called after each member."""

    def __init__(self, sweep: Sweep, sweep_workdir: str, steps: dict[str, int], *,
                 collect: Callable[[], Any] | None = None,
                 train_command: Sequence[str] = TRAIN_COMMAND, echo: bool = True):
        self.sweep = sweep
        self.sweep_workdir = os.path.abspath(sweep_workdir)
        self.steps = steps
        self.collect = collect or (lambda: None)
        self.train_command = list(train_command)
        self.echo = echo
        self._process: subprocess.Popen | None = None
        self._signal: int | None = None

    def _on_signal(self, signum, frame) -> None:
        del frame
        self._signal = signum
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)  # the member checkpoints and exits 143

    def run(self, members: Sequence[Member]) -> int:
        """Exit status: 0 if every member finished, 128 + signal if the sweep was stopped, 1 if
        any member failed or was interrupted."""
        check_unchanged(self.sweep, self.sweep_workdir, members)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            ok = True
            for member in members:
                if self._signal is not None:
                    break
                if member_status(self.sweep, self.sweep_workdir, member) == FINISHED:
                    self._say(f"[sweep] {member.name}: finished earlier, skipped")
                    continue
                ok &= self._run_member(member) == FINISHED
                if member is not members[-1]:
                    self.collect()
            self.collect()  # at the end, also when every member was skipped or it was stopped
            if self._signal is not None:
                return 128 + self._signal
            return 0 if ok else 1
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _run_member(self, member: Member) -> str:
        workdir = member_workdir(self.sweep_workdir, member)
        flags = self.sweep.flags(member)
        before = read_status(workdir) or {}
        earlier_s = float(before.get("wall_time_s", 0.0))
        attempts = int(before.get("attempts", 0)) + 1
        argv = [*self.train_command, "--config", os.path.abspath(config_path(self.sweep)),
                "--workdir", workdir, *flags]
        record = dict(name=member.name, overrides=[[k, v] for k, v in member.overrides],
                      flags=flags, command=argv, attempts=attempts)
        write_status(workdir, status=RUNNING, wall_time_s=earlier_s, **record)
        self._say(f"[sweep] {member.name}: running (attempt {attempts}), log "
                  f"{os.path.join(workdir, LOG_FILE)}")
        start = time.monotonic()
        with open(os.path.join(workdir, LOG_FILE), "a") as log:
            self._process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True, bufsize=1)
            if self._signal is not None:  # a signal that came before the process existed
                self._process.send_signal(signal.SIGTERM)
            for line in self._process.stdout:
                log.write(line)
                if self.echo:
                    sys.stdout.write(f"  {member.name} | {line}")
            returncode = self._process.wait()
            self._process = None
        wall = earlier_s + time.monotonic() - start
        last = last_logged_step(workdir)
        final = self.steps[member.name]
        if returncode == 0 and last == final:
            status, why = FINISHED, "done"
        elif returncode == 143 or returncode < 0 or self._signal is not None:
            status, why = INTERRUPTED, f"exit status {returncode}, last logged step {last}"
        else:
            status = FAILED
            why = (f"exit status {returncode}" if returncode else
                   f"exit status 0 but last logged step {last}, not the final step {final}")
        write_status(workdir, status=status, returncode=returncode, last_step=last,
                     final_step=final, wall_time_s=round(wall, 3), reason=why, **record)
        self._say(f"[sweep] {member.name}: {status} ({why}) after {wall:.0f} s")
        return status

    def _say(self, text: str) -> None:
        print(text, flush=True)
