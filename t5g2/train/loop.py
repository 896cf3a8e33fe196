"""The training loop: validated config -> mesh -> sharded state -> steps -> metrics.

Every process runs this same program (JAX multi-controller); each feeds its share of the global
batch, and process 0 writes metrics (TensorBoard, metrics.jsonl, a progress bar or log lines).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import ml_collections

from t5g2 import sharding
from t5g2.data.synthetic import SyntheticCopySource
from t5g2.model import ModelConfig
from t5g2.model.flops import train_flops
from t5g2.model.params import count_params
from t5g2.train.config import TrainConfig
from t5g2.train.metrics import MetricsWriter, StepTimer
from t5g2.train.optimizer import make_optimizer
from t5g2.train.peak import peak_flops_per_device
from t5g2.train.state import init_train_state, state_shardings
from t5g2.train.step import make_train_step

log = logging.getLogger(__name__)


def make_source(config: ml_collections.ConfigDict, model_cfg: ModelConfig,
                train_cfg: TrainConfig):
    source = config.data.source
    if source != "synthetic":
        raise ValueError(f"data.source={source!r} is unknown; valid: synthetic (the UL2 "
                         "pipeline plugs in here)")
    return SyntheticCopySource(
        global_batch_size=train_cfg.batch_size, encoder_length=train_cfg.encoder_length,
        decoder_length=train_cfg.decoder_length, vocab_size=model_cfg.vocab_size,
        seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), bos_id=model_cfg.bos_id,
        distinct_batches=config.data.get("distinct_batches", 0))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Runs `config.train.steps` steps; returns the last logged metrics."""
    model_cfg = ModelConfig.from_config_dict(config.model)
    train_cfg = TrainConfig.from_config_dict(config.train)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_model_fits_mesh(model_cfg, mesh)
    sharding.check_batch_fits_mesh(train_cfg.microbatch_size, mesh)
    sharding.host_local_batch_size(train_cfg.batch_size)

    tx, schedule = make_optimizer(train_cfg)
    shardings = state_shardings(model_cfg, tx, mesh)
    state = init_train_state(model_cfg, tx, mesh, config.seed)
    step_fn = make_train_step(model_cfg, train_cfg, tx, schedule, mesh, shardings)
    batches = iter(make_source(config, model_cfg, train_cfg))

    peak, peak_origin = peak_flops_per_device(config.peak_flops_per_device)
    step_flops = train_cfg.batch_size * train_flops(model_cfg, train_cfg.encoder_length,
                                                    train_cfg.decoder_length)
    step_tokens = train_cfg.batch_size * (train_cfg.encoder_length + train_cfg.decoder_length)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2))
        log.info("%s: %s parameters on mesh %s; peak %.3g FLOP/s per device (%s)", config.name,
                 f"{count_params(model_cfg):,}", sharding.describe(mesh), peak, peak_origin)

    timer = StepTimer(tokens_per_step=step_tokens, flops_per_step=step_flops,
                      peak_flops_per_s=peak * mesh.size)
    metrics: dict[str, float] = {}
    with MetricsWriter(workdir, process_index=jax.process_index(),
                       total_steps=train_cfg.steps) as writer:
        for step in range(1, train_cfg.steps + 1):
            batch = sharding.global_batch_from_host(next(batches), mesh)
            state, step_metrics = step_fn(state, batch)
            if step == 1:  # throughput windows start after the first (compiling) step
                jax.block_until_ready(step_metrics)
                timer.start(step)
            if step % train_cfg.log_every and step != train_cfg.steps:
                continue
            metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            metrics.update(timer.measure(step))
            writer.write(step, metrics)
    return metrics


def summary(metrics: dict[str, Any]) -> str:
    return json.dumps({k: round(v, 6) for k, v in metrics.items()})
