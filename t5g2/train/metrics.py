"""Training metrics, reported by JAX process 0 only: TensorBoard scalars, metrics.jsonl, and a
progress bar (terminal) or one log line per report (files, pipes).

TensorBoard event files are written without TensorFlow. tensorboard's `EventFileWriter` opens its
file through `tensorboard.compat.tf`, and that imports TensorFlow whenever it is installed, so this
module writes the same records itself: `RecordWriter` (TFRecord framing, masked CRC32C) over a
plain file, holding `event_pb2.Event` protos with `simple_value` scalar summaries.

The workdir may be an object-store URL (gs://): files go through `t5g2.fs`, and since an object
store cannot append, each report rewrites metrics.jsonl and the event file whole.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import tqdm
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from t5g2 import fs

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
JSONL_NAME = "metrics.jsonl"

EVENT_FILE_PREFIX = "events.out.tfevents."


def new_event_file_name(tb_dir: str) -> str:
    """A name that sorts after every event file already in `tb_dir`: TensorBoard reads a
    directory's event files in name order, so a resumed run's file must sort last. The stamp is
    a fixed-width nanosecond time, raised past the newest existing stamp if the clock disagrees
    (fixed width: "10" sorts before "9" in a variable-width counter)."""
    stamps = [int(m.group(1)) for name in fs.listdir(tb_dir)
              if (m := re.match(re.escape(EVENT_FILE_PREFIX) + r"(\d{19})\.", name))]
    stamp = max([time.time_ns()] + [s + 1 for s in stamps])
    return f"{EVENT_FILE_PREFIX}{stamp:019d}.{socket.gethostname()}.{os.getpid()}"


def _finite(fmt: Callable[[float], str]) -> Callable[[float], str]:
    return lambda v: fmt(v) if math.isfinite(v) else str(v)


def _si(v: float) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{prefix}"
    return f"{v:.3g}"


# key -> (label, formatter) for the keys the training step and loop report; the order here is the
# order in a log line, with unknown keys after the first group (losses, optimizer) and before the
# throughput group.
_HEAD = {
    "loss": ("loss", _finite(lambda v: f"{v:.4g}")),
    "z_loss": ("z_loss", _finite(lambda v: f"{v:.3g}")),
    "learning_rate": ("lr", _finite(lambda v: f"{v:.1e}")),
    "lr": ("lr", _finite(lambda v: f"{v:.1e}")),
    "grad_norm": ("grad_norm", _finite(lambda v: f"{v:.3g}")),
}
_TAIL = {
    "target_tokens": ("target_tokens", _finite(lambda v: f"{v:,.0f}")),
    "step_time_s": ("step_time", _finite(lambda v: f"{v:.3g}s")),
    "tokens_per_s": ("tokens/s", _finite(lambda v: f"{v:,.0f}")),
    "model_flops_per_s": ("FLOP/s", _finite(_si)),
    "mfu": ("mfu", _finite(lambda v: f"{v:.1%}")),
    "mfu_padded": ("mfu_padded", _finite(lambda v: f"{v:.1%}")),
}
_GENERIC = _finite(lambda v: f"{v:.4g}")
_POSTFIX_KEYS = ("loss", "tokens_per_s", "mfu")  # what the progress bar shows


def _label_and_value(key: str, value: float) -> tuple[str, str]:
    label, fmt = _HEAD.get(key) or _TAIL.get(key) or (key, _GENERIC)
    return label, fmt(value)


def format_metrics(step: int, metrics: Mapping[str, float]) -> str:
    """One compact line:
    `step 120 | loss 2.314 | lr 1.2e-04 | ... | tokens/s 12,345 | mfu 41.2%`."""
    keys = ([k for k in _HEAD if k in metrics]
            + [k for k in metrics if k not in _HEAD and k not in _TAIL]
            + [k for k in _TAIL if k in metrics])
    return " | ".join([f"step {step}"] +
                      ["%s %s" % _label_and_value(k, metrics[k]) for k in keys])


def _postfix(metrics: Mapping[str, float]) -> str:
    return ", ".join("%s=%s" % _label_and_value(k, metrics[k])
                     for k in _POSTFIX_KEYS if k in metrics)


def drop_lines_after(path: str, step: int) -> None:
    """Rewrites a metrics.jsonl without the lines of steps after `step`, and any unreadable line
    (atomically)."""
    if not fs.exists(path):
        return
    lines = io.StringIO(fs.read_text(path)).readlines()

    def keep(line: str) -> bool:  # a line cut short by a kill is dropped too
        try:
            return json.loads(line)["step"] <= step
        except (json.JSONDecodeError, KeyError, TypeError):
            return False

    kept = [line for line in lines if keep(line)]
    if len(kept) == len(lines):
        return
    fs.write_text(path + ".tmp", "".join(kept))
    fs.replace(path + ".tmp", path)
    log.info("%s: dropped %d lines after step %d (trained again now)", path,
             len(lines) - len(kept), step)


class MetricsWriter:
    """Writes each report to TensorBoard (`workdir/tensorboard/`), `workdir/metrics.jsonl` and a
    progress bar or a log line on stdout. On any process but 0 every method is a no-op.

    Every write is flushed, so a preempted run keeps its curve. A run resumed at `initial_step`
    (> 0) continues the same curve: metrics.jsonl first loses the lines of steps after it (those
    the interrupted run logged past its last checkpoint; they are trained again), and the new
    event file starts with a SessionLog START at initial_step + 1, which makes TensorBoard drop
    the old files' values from that step on (its own restart convention).
    Non-finite values are written as they are (metrics.jsonl then holds the `NaN`/`Infinity`
    tokens Python's json reads) and are also logged as a warning.
    """

    def __init__(self, workdir: str, *, process_index: int = 0, total_steps: int | None = None,
                 progress: bool | None = None, initial_step: int = 0):
        self.workdir = workdir
        self.active = process_index == 0
        self._closed = False
        self._events: RecordWriter | None = None
        self._jsonl = None
        self._bar: tqdm.tqdm | None = None
        self.event_file: str | None = None
        if not self.active:
            return
        tb_dir = fs.join(workdir, TENSORBOARD_DIR)
        fs.makedirs(tb_dir)
        self.event_file = fs.join(tb_dir, new_event_file_name(tb_dir))
        self._events = RecordWriter(fs.open_appending(self.event_file, truncate=True))
        self._add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        jsonl = fs.join(workdir, JSONL_NAME)
        if initial_step > 0:
            self._add_event(event_pb2.Event(
                wall_time=time.time(), step=initial_step + 1,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
            drop_lines_after(jsonl, initial_step)
        self._jsonl = fs.open_appending(jsonl)
        if progress is None:
            progress = sys.stdout.isatty()
        if progress:
            self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, file=sys.stdout,
                                  unit="step", dynamic_ncols=True)

    def _add_event(self, event: event_pb2.Event) -> None:
        self._events.write(event.SerializeToString())
        self._events.flush()

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Reports `metrics` (scalars: floats, numpy or 0-d JAX arrays) at `step`."""
        if not self.active:
            return
        if self._closed:
            raise ValueError("MetricsWriter is closed")
        step = int(step)
        values = {str(k): float(v) for k, v in metrics.items()}
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            log.warning("step %d: non-finite metrics %s", step,
                        ", ".join(f"{k}={v}" for k, v in bad.items()))

        summary = summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self._add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

        self._jsonl.write((json.dumps({"step": step, **values}) + "\n").encode("utf-8"))
        self._jsonl.flush()

        if self._bar is not None:
            self._bar.set_postfix_str(_postfix(values), refresh=False)
            if step >= self._bar.n:
                self._bar.update(step - self._bar.n)  # (also feeds tqdm's steps/s estimate)
            else:
                self._bar.n = step
            self._bar.refresh()
        else:
            print(format_metrics(step, values), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._events is not None:
            self._events.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class StepTimer:
    """Throughput over the steps between two reporting points.

        timer = StepTimer(tokens_per_step=..., padded_flops_per_step=..., peak_flops_per_s=...,
                          sum_across_processes=...)
        ...                              # every step, from the first:
        timer.add_flops(flops)           # this process's model FLOPs of the step (its rows)
        timer.start(step)                # e.g. once the first (compiling) step's results are ready
        ...
        metrics.update(timer.measure(step))   # at a reporting point, after fetching the metrics

    `measure` returns `step_time_s`, `tokens_per_s` and, when FLOPs are known, `model_flops_per_s`
    and `mfu` (against `peak_flops_per_s`, the peak of all devices together), averaged over the
    steps since the last `start`/`measure`, and starts the next window. Without a window (no
    start yet, or no steps since) it returns {} and starts one.

    Model FLOPs are either the same every step (`flops_per_step`, all processes together) or
    counted per step with `add_flops` (what the step's real tokens need: packing leaves padding,
    which is not work); FLOPs added before `start` are dropped with the window they fell in.
    With several processes each adds its own rows' FLOPs and `measure` sums the window's totals
    with `sum_across_processes` (a collective: every process must call `measure` at the same
    steps). `padded_flops_per_step` (every position counted as a token, all processes) adds
    `mfu_padded`, the figure that counts padding as work.
    """

    def __init__(self, *, tokens_per_step: float, flops_per_step: float | None = None,
                 padded_flops_per_step: float | None = None,
                 peak_flops_per_s: float | None = None,
                 sum_across_processes: Callable[[float], float] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        if peak_flops_per_s is not None and peak_flops_per_s <= 0:
            raise ValueError(f"peak_flops_per_s={peak_flops_per_s} must be positive")
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.padded_flops_per_step = padded_flops_per_step
        self.peak_flops_per_s = peak_flops_per_s
        self._sum_across_processes = sum_across_processes
        self._clock = clock
        self._time: float | None = None
        self._step = 0
        self._added: float | None = None  # this process's FLOPs added in the current window

    def add_flops(self, flops: float) -> None:
        """Adds this process's model FLOPs of one step to the current window."""
        if self.flops_per_step is not None:
            raise ValueError("add_flops with flops_per_step set: give one or the other")
        self._added = (self._added or 0.0) + flops

    def start(self, step: int) -> None:
        self._time, self._step, self._added = self._clock(), step, None

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Leaves the time spent inside (e.g. a held-out evaluation) out of the current window."""
        began = self._clock()
        try:
            yield
        finally:
            if self._time is not None:
                self._time += self._clock() - began

    def measure(self, step: int) -> dict[str, float]:
        now = self._clock()
        steps, last, added = step - self._step, self._time, self._added
        self._time, self._step, self._added = now, step, None
        if last is None or steps <= 0:
            return {}
        if added is not None and self._sum_across_processes is not None:
            added = self._sum_across_processes(added)  # before any clock test: a collective
        if now <= last:
            return {}
        seconds = (now - last) / steps
        out = {"step_time_s": seconds, "tokens_per_s": self.tokens_per_step / seconds}
        flops = added / steps if added is not None else self.flops_per_step
        if flops is not None:
            out["model_flops_per_s"] = flops / seconds
            if self.peak_flops_per_s is not None:
                out["mfu"] = out["model_flops_per_s"] / self.peak_flops_per_s
        if self.padded_flops_per_step is not None and self.peak_flops_per_s is not None:
            out["mfu_padded"] = self.padded_flops_per_step / seconds / self.peak_flops_per_s
        return out


def sum_over_processes(value: float) -> float:
    """`value` summed over all JAX processes (process_allgather: every process must call it).
    Without jax_enable_x64 it travels as float32: 7 significant digits, ample for a rate."""
    from jax.experimental import multihost_utils

    return float(multihost_utils.process_allgather(value).sum())
