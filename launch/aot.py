"""Ahead-of-time check: lower and compile the train step for a config on a named target, without
allocating parameters, and print per-device memory as JSON and whether it fits the target's HBM.

    python -m launch.aot --config configs/t5g2_270m.py --topology v5p-8     # 4 devices, 95 GiB
    python -m launch.aot --config configs/t5g2_4b.py --topology h100-16 --config.mesh.fsdp=-1
    python -m launch.aot --config configs/t5g2_1b.py --devices 8 --hbm_gib 40   # any other

A target is `<chip>-<n>` as the slice or machine is sold (CHIPS: TPU slice names count
TensorCores for v4 / v5p, whose two-core megacore chip is one JAX device, so a v5p-8 host is 4
devices; v5e names and GPU counts are devices), or `--devices` with `--hbm_gib`. Virtual CPU
devices stand in for the target's; memory is XLA's per-device buffer assignment for the compiled
step: parameters, optimizer state, and the temporaries (activations, gradients, collectives'
buffers). TPU and GPU compilers schedule memory differently from XLA:CPU, so a tight fit needs
checking on the real backend.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before JAX is imported

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch import cli  # noqa: E402
from t5g2 import sharding  # noqa: E402
from t5g2.configlib import ConfigError  # noqa: E402
from t5g2.model import ModelConfig  # noqa: E402
from t5g2.model.params import count_params  # noqa: E402
from t5g2.train.config import TrainConfig  # noqa: E402
from t5g2.train.optimizer import make_optimizer  # noqa: E402
from t5g2.train.state import abstract_train_state, state_shardings  # noqa: E402
from t5g2.train.step import make_train_step  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Chip:
    """One kind of accelerator as JAX sees it, from the vendor's documentation."""
    hbm_gib: float  # HBM per JAX device
    devices_per_host: int
    named_units_per_device: int  # what a slice name counts per device (v4/v5p: 2 TensorCores)
    note: str = ""


CHIPS = {
    # cloud.google.com/tpu/docs/v4, /v5p, /v5e (system architecture tables)
    "v4": Chip(32, 4, 2, "megacore: a chip's 2 TensorCores are one device"),
    "v5p": Chip(95, 4, 2, "megacore: a chip's 2 TensorCores are one device"),
    "v5e": Chip(16, 8, 1),
    # NVIDIA data sheets (SXM, 8 per HGX host). JAX preallocates 75% of a GPU's memory unless
    # XLA_PYTHON_CLIENT_MEM_FRACTION says more.
    "a100": Chip(80, 8, 1, "A100 80GB; JAX uses 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION is set"),
    "h100": Chip(80, 8, 1, "JAX uses 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION is set"),
    "h200": Chip(141, 8, 1, "JAX uses 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION is set"),
}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    devices: int
    hbm_gib: float  # per device
    devices_per_host: int
    note: str = ""

    @property
    def hosts(self) -> int:
        return math.ceil(self.devices / self.devices_per_host)


def resolve_target(topology: str | None, devices: int | None, hbm_gib: float | None) -> Target:
    """The target a command line names: `topology` (`<chip>-<n>`, CHIPS), whose device count and
    HBM `devices` / `hbm_gib` may override, or `devices` and `hbm_gib` alone."""
    known = ", ".join(f"{c}-<n>" for c in CHIPS)
    if topology is None:
        if devices is None or hbm_gib is None:
            raise ConfigError("name the target: --topology=v5p-8 (or any of "
                              f"{known}), or --devices=<n> --hbm_gib=<HBM per device>")
        target = Target(f"{devices} devices", devices, hbm_gib, devices)
    else:
        m = re.fullmatch(r"([a-z0-9]+)-(\d+)", topology.strip().lower())
        chip = CHIPS.get(m.group(1)) if m else None
        if chip is None or int(m.group(2)) % chip.named_units_per_device \
                or int(m.group(2)) == 0:
            raise ConfigError(f"--topology={topology!r} is not a known target; valid: {known} "
                              "(e.g. v5p-8, v5e-8, h100-8), or --devices=<n> --hbm_gib=<GiB>")
        target = Target(topology, int(m.group(2)) // chip.named_units_per_device, chip.hbm_gib,
                        chip.devices_per_host, chip.note)
    if devices is not None or hbm_gib is not None:
        target = dataclasses.replace(target, devices=devices or target.devices,
                                     hbm_gib=hbm_gib or target.hbm_gib)
    if target.devices <= 0 or target.hbm_gib <= 0:
        raise ConfigError(f"--devices={target.devices} and --hbm_gib={target.hbm_gib} must be "
                          "positive")
    return target


def _devices_from_argv(argv) -> int | None:
    """The target's device count, read from the command line before JAX starts its backend (None
    if the command line is wrong: the flags, parsed later, say how)."""
    try:
        devices, hbm = cli.flag_value(argv, "devices"), cli.flag_value(argv, "hbm_gib")
        return resolve_target(cli.flag_value(argv, "topology"), devices and int(devices),
                              hbm and float(hbm)).devices
    except (ConfigError, ValueError):
        return None


_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, f"the target, <chip>-<n> for a chip of {', '.join(CHIPS)}: v5p-8 (1 host, "
    "4 devices of 95 GiB), v5e-8, h100-8, v5p-32...")
_DEVICES = flags.DEFINE_integer("devices", None, "the target's JAX devices (default: the "
                                "topology's), stood in for by virtual CPU devices")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None, "HBM per device in GiB the plan is checked "
                              "against (default: the topology's)")
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


def fits(report: dict, target: Target) -> dict:
    """Whether the compiled step's per-device total fits the target's HBM, and by how much."""
    total_gib = report["per_device_bytes"]["total"] / GIB
    return {"target": dataclasses.asdict(target) | {"hosts": target.hosts},
            "fits": total_gib <= target.hbm_gib,
            "headroom_gib": round(target.hbm_gib - total_gib, 2)}


def main(argv):
    del argv
    target = resolve_target(_TOPOLOGY.value, _DEVICES.value, _HBM_GIB.value)
    if jax.device_count() != target.devices:
        raise ConfigError(f"{target.name} has {target.devices} devices but JAX has "
                          f"{jax.device_count()}; run `python -m launch.aot` as a program (it "
                          "sets the virtual device count before JAX starts)")
    report = compile_report(_CONFIG.value)
    report |= fits(report, target)
    print(json.dumps(report, indent=2))
    total = report["per_device_gib"]["total"]
    print(f"{report['config']} on {target.name} ({target.devices} devices, {target.hosts} "
          f"host(s), mesh {report['mesh']}): {total:.2f} GiB per device of "
          f"{target.hbm_gib:g} GiB: {'fits' if report['fits'] else 'DOES NOT FIT'} "
          f"({report['headroom_gib']:+.1f} GiB){'; ' + target.note if target.note else ''}",
          file=sys.stderr)


if __name__ == "__main__":
    if (_count := _devices_from_argv(sys.argv)) is not None:  # read when the backend starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={_count}")
    cli.run(main)
