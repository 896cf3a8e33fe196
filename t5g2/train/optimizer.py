"""AdamW with linear warmup and cosine decay, global-norm clipping, no decay on norms, biases
and the EOI vector.

The optimizer is applied to the trainable parameters only (`t5g2.train.state.split_trainable`):
a frozen vision tower has no moments.
"""

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
    """Weight decay on matrices only: not on norm scales, biases (the vision tower's) or the EOI
    vector. By name, since stacked layers give vectors a leading layer axis."""
    def decays(path, _):
        return not any(("norm" in str(p)) or str(p).endswith("bias") or p == "eoi"
                       for p in path)

    return nnx.map_state(decays, params)


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(cfg)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=_decay_mask)
    if cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw), schedule
    return adamw, schedule
