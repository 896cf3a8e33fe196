"""AdamW with linear warmup and cosine decay, global-norm clipping, no decay on norms/EOI."""

from __future__ import annotations

import optax
from flax import nnx

from t5g2.train.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.warmup_steps + decay_steps,
        end_value=cfg.learning_rate * cfg.min_learning_rate_ratio)


def _decay_mask(params: nnx.State):
    """Weight decay on matrices only: not on norm scales or the EOI vector."""
    def decays(path, _):
        return not any(("norm" in str(p)) or p == "eoi" for p in path)

    return nnx.map_state(decays, params)


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(cfg)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=_decay_mask)
    if cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw), schedule
    return adamw, schedule
