"""A diverging run: what happens when a step's loss, gradient norm or updated state is not finite
(the step's `nonfinite` metric), per `train.on_nonfinite`:

  stop  (default) the run ends with a DivergenceError naming the step and the last good
        checkpoint; nothing is saved after the last finite step.
  skip  the step has already dropped its update (t5g2.train.step); the loop counts such steps
        (`skipped_steps` in the metrics: those since the previous report) and ends the run with
        a DivergenceError after `train.max_skipped` in a row.

Either way no non-finite state is ever checkpointed: the loop saves a step only once its metrics
say it is finite. Every checkpoint is therefore finite, and retention (which drops the oldest)
always keeps the newest finite one.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """Training diverged (non-finite loss, gradients or update); the message names the step, the
    values and the last good checkpoint to resume from."""


def _values(metrics: Mapping[str, float]) -> str:
    shown = ", ".join(f"{k}={metrics[k]:.4g}" for k in ("loss", "grad_norm") if k in metrics)
    if all(math.isfinite(metrics.get(k, 0.0)) for k in ("loss", "z_loss", "grad_norm")):
        return f"{shown}: the update overflowed the parameters or optimizer state"
    return shown


class NonFiniteGuard:
    """Follows the `nonfinite` metric of every step, in order (`observe`)."""

    def __init__(self, mode: str, max_skipped: int):
        self.mode = mode
        self.max_skipped = max_skipped
        self.in_a_row = 0  # skipped steps since the last finite one
        self._since_report = 0

    def observe(self, step: int, metrics: Mapping[str, float]) -> str | None:
        """Why the run must stop after `step` (None: it goes on)."""
        if not metrics.get("nonfinite"):
            self.in_a_row = 0
            return None
        if self.mode == "stop":
            return (f"step {step} is not finite ({_values(metrics)}) and "
                    "train.on_nonfinite=stop")
        self.in_a_row += 1
        self._since_report += 1
        log.warning("step %d is not finite (%s): its update was skipped (%d in a row, "
                    "train.max_skipped=%d)", step, _values(metrics), self.in_a_row,
                    self.max_skipped)
        if self.in_a_row >= self.max_skipped:
            steps = (f"steps {step - self.in_a_row + 1}-{step} were" if self.in_a_row > 1
                     else f"step {step} was")
            return (f"{steps} not finite, "
                    f"train.max_skipped={self.max_skipped} in a row (the last: "
                    f"{_values(metrics)})")
        return None

    def report(self) -> dict[str, float]:
        """With "skip": {"skipped_steps": steps skipped since the previous report}."""
        if self.mode != "skip":
            return {}
        skipped, self._since_report = self._since_report, 0
        return {"skipped_steps": float(skipped)}

    def error(self, reason: str, last_checkpoint: str | None) -> DivergenceError:
        """The error that ends the run: the reason, where to resume, and what to change."""
        if last_checkpoint:
            where = (f"the last good checkpoint is {last_checkpoint} (nothing later was saved): "
                     "the same command resumes from it; lower --config.train.learning_rate (or "
                     "change something else) so as not to repeat the divergence")
        else:
            where = ("no checkpoint was saved: lower --config.train.learning_rate and start "
                     "again")
        if self.mode == "stop":
            where += ", or set --config.train.on_nonfinite=skip to drop such steps"
        return DivergenceError(f"training diverged: {reason}; {where}")
