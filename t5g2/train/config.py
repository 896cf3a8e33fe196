"""The `train` section of a config: batch, lengths, schedule, optimizer, accumulation, logging,
and what a non-finite step does."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from t5g2.configlib import ConfigError, build, positive, to_dict

# train.on_nonfinite: what a step whose loss, gradients or updated state are not finite does
# (t5g2.train.divergence). "stop": the run ends with an error naming the last good checkpoint;
# "skip": the step's update is dropped, and `max_skipped` such steps in a row end the run.
ON_NONFINITE = ("stop", "skip")
# The fields the learning rate at a step depends on (t5g2.train.optimizer.learning_rate_schedule).
SCHEDULE_FIELDS = ("learning_rate", "warmup_steps", "min_learning_rate_ratio", "steps")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int  # global, across all processes and accumulation steps
    encoder_length: int
    decoder_length: int
    steps: int
    learning_rate: float = 1e-4
    warmup_steps: int = 100  # the paper's recipe: 100 warmup steps, then cosine decay
    min_learning_rate_ratio: float = 0.1  # cosine decays to this fraction of the peak
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float = 1.0  # global-norm clipping; 0 disables
    z_loss: float = 0.0  # z_loss * log(Z)^2 per target token
    grad_accum_steps: int = 1
    # Cross-entropy over chunks of this many decoder positions (0: all at once); same numbers,
    # logits memory [B, chunk, vocab] instead of [B, T, vocab].
    loss_chunk: int = 0
    log_every: int = 10
    on_nonfinite: str = "stop"
    max_skipped: int = 10  # with on_nonfinite="skip": this many skipped steps in a row stop the run

    @classmethod
    def from_config_dict(cls, cd: Mapping[str, Any], prefix: str = "train") -> "TrainConfig":
        cfg = build(cls, to_dict(cd), prefix)
        cfg.validate(prefix)
        return cfg

    @property
    def microbatch_size(self) -> int:
        return self.batch_size // self.grad_accum_steps

    def validate(self, prefix: str = "train") -> None:
        for name in ("batch_size", "encoder_length", "decoder_length", "steps",
                     "grad_accum_steps", "log_every", "max_skipped"):
            positive(getattr(self, name), f"{prefix}.{name}")
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(f"{prefix}.batch_size={self.batch_size} is not divisible by "
                              f"{prefix}.grad_accum_steps={self.grad_accum_steps}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{prefix}.warmup_steps={self.warmup_steps} must be >= 0")
        if not self.learning_rate > 0:
            raise ConfigError(f"{prefix}.learning_rate={self.learning_rate} must be > 0")
        if not 0 <= self.min_learning_rate_ratio <= 1:
            raise ConfigError(f"{prefix}.min_learning_rate_ratio={self.min_learning_rate_ratio} "
                              "must be in [0, 1]")
        for name in ("weight_decay", "grad_clip_norm", "z_loss", "loss_chunk"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}={getattr(self, name)} must be >= 0")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ConfigError(f"{prefix}.on_nonfinite={self.on_nonfinite!r} is unknown; valid: "
                              f"{', '.join(ON_NONFINITE)}")
