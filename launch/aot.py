"""Ahead-of-time check: lower and compile the train step for a config on a named topology,
without allocating parameters, and print per-device memory as JSON.

    python -m launch.aot --config configs/t5g2_270m.py                 # 8 virtual CPU devices
    python -m launch.aot --config configs/t5g2_4b.py --devices 16 --config.mesh.fsdp=-1

The devices stand in for the chips of the target host (e.g. 8 for 8xH100 or a v5p-8's 4 chips
times 2); memory is XLA's per-device buffer assignment for the compiled step: parameters,
optimizer state, and the temporaries (activations, gradients, collectives' buffers).
"""

from __future__ import annotations

import json
import os
import sys
import time


def _devices_from_argv(argv) -> int:
    for i, arg in enumerate(argv):
        if arg.startswith("--devices="):
            return int(arg.split("=", 1)[1])
        if arg == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
    return 8


if __name__ == "__main__":  # the virtual device count must be set before JAX starts
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count="
                               f"{_devices_from_argv(sys.argv)}")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from t5g2 import sharding  # noqa: E402
from t5g2.model import ModelConfig  # noqa: E402
from t5g2.model.params import count_params  # noqa: E402
from t5g2.train.config import TrainConfig  # noqa: E402
from t5g2.train.optimizer import make_optimizer  # noqa: E402
from t5g2.train.state import abstract_train_state, state_shardings  # noqa: E402
from t5g2.train.step import make_train_step  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
flags.DEFINE_integer("devices", 8, "virtual CPU devices standing in for the target's chips")
flags.mark_flags_as_required(["config"])

GIB = 2**30
BATCH_FIELDS = {"encoder_input_tokens": "encoder_length", "encoder_segment_ids": "encoder_length",
                "encoder_positions": "encoder_length", "decoder_input_tokens": "decoder_length",
                "decoder_target_tokens": "decoder_length", "decoder_segment_ids": "decoder_length",
                "decoder_positions": "decoder_length", "decoder_loss_weights": "decoder_length"}


def _per_device_bytes(abstract_tree, sharding_tree) -> int:
    """Bytes one device holds of a tree, from each leaf's shape and sharding."""
    total = 0
    for leaf, sh in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(sharding_tree)):
        shard = sh.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * leaf.dtype.itemsize
    return total


def compile_report(config) -> dict:
    model_cfg = ModelConfig.from_config_dict(config.model)
    train_cfg = TrainConfig.from_config_dict(config.train)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_model_fits_mesh(model_cfg, mesh)
    sharding.check_batch_fits_mesh(train_cfg.microbatch_size, mesh)
    tx, schedule = make_optimizer(train_cfg)
    shardings = state_shardings(model_cfg, tx, mesh)
    abstract = abstract_train_state(model_cfg, tx)
    state_in = jax.tree.unflatten(jax.tree.structure(abstract), [
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
        for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))])
    batch_sharding = sharding.batch_sharding(mesh)
    batch_in = {k: jax.ShapeDtypeStruct(
        (train_cfg.batch_size, getattr(train_cfg, length)),
        np.float32 if k == "decoder_loss_weights" else np.int32, sharding=batch_sharding)
        for k, length in BATCH_FIELDS.items()}
    step = make_train_step(model_cfg, train_cfg, tx, schedule, mesh, shardings)
    start = time.perf_counter()
    compiled = step.lower(state_in, batch_in).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    params = _per_device_bytes(abstract.params, shardings.params)
    opt = _per_device_bytes(abstract.opt_state, shardings.opt_state)
    temp = memory.temp_size_in_bytes
    per_device = {
        "parameters": params, "optimizer_state": opt, "temporaries": temp,
        "arguments": memory.argument_size_in_bytes, "outputs_aliased": memory.alias_size_in_bytes,
        "total": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                  - memory.alias_size_in_bytes + temp),
    }
    return {
        "config": config.name, "parameters": count_params(model_cfg),
        "mesh": dict(mesh.shape), "devices": mesh.size,
        "batch_size": train_cfg.batch_size, "encoder_length": train_cfg.encoder_length,
        "decoder_length": train_cfg.decoder_length,
        "grad_accum_steps": train_cfg.grad_accum_steps, "remat": model_cfg.remat,
        "compute_dtype": model_cfg.dtype, "compile_s": round(compile_s, 1),
        "per_device_bytes": per_device,
        "per_device_gib": {k: round(v / GIB, 3) for k, v in per_device.items()},
    }


def main(argv):
    del argv
    print(json.dumps(compile_report(_CONFIG.value), indent=2))


if __name__ == "__main__":
    app.run(main)
