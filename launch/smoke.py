"""CPU smoke run: a few AdamW steps of a config's model on one fixed synthetic batch.

    python -m launch.smoke --config configs/tiny.py --steps 30
    python -m launch.smoke --config configs/tiny.py --config.model.cross_attention=separate

It checks the whole forward/backward path of the chosen ablation and prints the loss per step;
the loss must fall on a repeated batch. The UL2 adaptation run replaces this as the main job.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from t5g2.model import ModelConfig, T5Gemma2
from t5g2.model.params import count_params
from t5g2.train.loss import cross_entropy

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "model config file")
_STEPS = flags.DEFINE_integer("steps", 30, "optimizer steps")
_BATCH = flags.DEFINE_integer("batch", 4, "batch size")
_ENC_LEN = flags.DEFINE_integer("encoder_length", 32, "encoder tokens per example")
_DEC_LEN = flags.DEFINE_integer("decoder_length", 16, "decoder tokens per example")
_LR = flags.DEFINE_float("learning_rate", 3e-3, "AdamW learning rate")


def synthetic_batch(cfg: ModelConfig, seed: int, batch: int, enc_len: int, dec_len: int):
    """A copy task: the decoder must reproduce the start of the encoder input."""
    rng = np.random.default_rng(seed)
    enc = rng.integers(3, min(cfg.vocab_size, 1000), size=(batch, enc_len), dtype=np.int32)
    targets = enc[:, :dec_len]
    dec = np.concatenate([np.full((batch, 1), cfg.bos_id, np.int32), targets[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
            "decoder_target_tokens": targets, "decoder_loss_weights": np.ones_like(targets)}


def main(argv):
    del argv
    config = _CONFIG.value
    cfg = ModelConfig.from_config_dict(config.model)
    print(f"{config.name}: {count_params(cfg):,} parameters, tie_embeddings={cfg.tie_embeddings},"
          f" cross_attention={cfg.cross_attention}, devices={jax.devices()}")
    model = T5Gemma2(cfg, rngs=nnx.Rngs(config.seed))
    optimizer = nnx.Optimizer(model, optax.adamw(_LR.value), wrt=nnx.Param)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(
        cfg, config.seed, _BATCH.value, _ENC_LEN.value, _DEC_LEN.value).items()}

    @nnx.jit
    def train_step(model, optimizer, batch):
        def loss_fn(model):
            logits = model(batch["encoder_input_tokens"], batch["decoder_input_tokens"])
            total, weight = cross_entropy(logits, batch["decoder_target_tokens"],
                                          batch["decoder_loss_weights"])
            return total / weight

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = []
    start = time.perf_counter()
    for step in range(_STEPS.value):
        losses.append(float(train_step(model, optimizer, batch)))
        if step == 0:
            compiled = time.perf_counter()
        print(f"step {step:4d}  loss {losses[-1]:.4f}")
    steps_per_s = (_STEPS.value - 1) / max(time.perf_counter() - compiled, 1e-9)
    print(f"first step (compile) {compiled - start:.1f}s, then {steps_per_s:.1f} steps/s")
    if not losses[-1] < losses[0]:
        raise SystemExit(f"loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"ok: loss {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    app.run(main)
