"""Checkpointing on this machine: t5g2's orbax `Checkpointer` against what a Hugging Face user
does, `torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)` of
`T5Gemma2ForConditionalGeneration` built from the same config, and `torch.load` +
`load_state_dict` to restore. Prints one JSON object. Run from the repository root:

    python -m benchmarks.checkpoint --config configs/tiny.py
    # wider (~78M parameters, ~0.9 GiB of parameters + AdamW moments per side):
    python -m benchmarks.checkpoint --config configs/tiny.py \
        --config.model.encoder.d_model=512 --config.model.decoder.d_model=512 \
        --config.model.encoder.ffn_dim=2048 --config.model.decoder.ffn_dim=2048
    # ~104M parameters (6 + 6 layers of width 768, 12 query / 4 kv heads of 64):
    python -m benchmarks.checkpoint --config configs/tiny.py \
        --config.model.encoder.num_layers=6 --config.model.decoder.num_layers=6 \
        --config.model.encoder.d_model=768 --config.model.decoder.d_model=768 \
        --config.model.encoder.ffn_dim=3072 --config.model.decoder.ffn_dim=3072 \
        --config.model.encoder.num_heads=12 --config.model.decoder.num_heads=12 \
        --config.model.encoder.num_kv_heads=4 --config.model.decoder.num_kv_heads=4 \
        --config.model.encoder.head_dim=64 --config.model.decoder.head_dim=64

`--dir` picks the file system (default: the temp dir), `--repeats` the timed rounds (median
reported), `--warmup` untimed rounds first, `--fsync` makes "durable" mean on the device.

What is saved, per side: the float32 parameters and the AdamW state after one optimizer step
with random gradients (both moments populated, not zeros: a compressing format could not shrink
them), the model's compute dtype forced to float32 too. t5g2: the train state of
`t5g2.train.state.init_train_state` on a one-device mesh, stepped by `make_optimizer`'s
transformation. Torch: `T5Gemma2ForConditionalGeneration` from `to_hf_config` (the parity
tests' `tests.reference.hf_t5gemma2_model`), `torch.optim.AdamW` over its text parameters (the
small text-only vision tower the reference always has is saved with the model but not trained,
as in benchmarks.train_step).

What is measured, per round, each into a fresh directory under `--dir`:
* t5g2 `save_blocking_s`: how long `Checkpointer.save` blocks the caller, i.e. what a training
  step waits for. The save is asynchronous: it blocks for dispatching the arrays' fingerprints
  (a jitted reduction, fetched in the background) and orbax's device-to-host copy (the next step
  may donate the buffers; on a CPU backend a memory copy) plus its per-array bookkeeping, then
  orbax writes in background threads while training continues;
* t5g2 `durable_s`: from the start of `save` until `wait()` returns: the whole write;
* t5g2 `restore_s`: `Checkpointer.restore` onto the same mesh (a fresh Checkpointer, as a
  restarted run makes one), until the arrays are ready. It includes checking every array against
  its saved fingerprint, which torch does not do;
* torch `save_s`: `torch.save` (blocking: that is all of it) and `load_s`: `torch.load` plus
  `model.load_state_dict` and `optimizer.load_state_dict` into a second model and optimizer (built
  beforehand, untimed) — the restore of a restarted run;
* bytes on disk (the files' apparent sizes, and the blocks allocated), against the arrays'
  own bytes (orbax compresses each chunk with zstd level 1 by default, which takes a few percent
  off random float32; torch.save writes the raw bytes plus its pickle); whether every restored
  array equals the saved one bit for bit.
Ratios: torch save / t5g2 blocking, torch save / t5g2 durable, torch load / t5g2 restore (> 1:
t5g2 is faster). A `--warmup` round is untimed: t5g2's first save compiles the fingerprint
reduction (its blocking time is reported as `warmup_save_blocking_s`).

Caveats:
* page cache: without `--fsync`, "durable" here means handed to the operating system (written
  into the page cache), not on the device: a power loss could lose it. With `--fsync` every file
  and directory of the checkpoint is fsync'd, on both sides, inside the timed durable/save
  interval. Restores read right after the save, from the page cache: a cold read from the device
  (a restarted machine) is slower on both sides; dropping the cache needs root, so it is not done;
* t5g2's background write competes with the caller for cores (here a training step would run
  during `durable_s - save_blocking_s`); on a machine with few cores, and with other work running
  (see `load_average_1min` and `load_average_1min_at_end`), the times are noisier;
* the torch side runs in its own spawned process (its memory and thread pools are its own),
  before the JAX side, so the two never run at once.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from typing import Any, Callable, Mapping

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import machine  # noqa: E402
from benchmarks.train_step import environment, model_config, summary  # noqa: E402
from t5g2 import sharding  # noqa: E402
from t5g2.model import ModelConfig  # noqa: E402
from t5g2.train.checkpoint import Checkpointer, config_as_json, flatten  # noqa: E402
from t5g2.train.config import TrainConfig  # noqa: E402
from t5g2.train.optimizer import make_optimizer  # noqa: E402
from t5g2.train.state import (TrainState, abstract_train_state, init_train_state,  # noqa: E402
                              state_shardings)

STEP = 1  # the checkpointed step: the state after one optimizer step


# --------------------------------------------------------------------------- helpers (both sides)

def bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bits (NaNs included)."""
    a, b = np.asarray(a), np.asarray(b)
    return (a.dtype == b.dtype and a.shape == b.shape
            and np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))


def disk_usage(path: str) -> dict[str, int]:
    """Files below `path`: their count, apparent bytes and allocated bytes (st_blocks)."""
    files = size = allocated = 0
    for root, _, names in os.walk(path):
        for name in names:
            st = os.stat(os.path.join(root, name))
            files += 1
            size += st.st_size
            allocated += st.st_blocks * 512
    return dict(files=files, bytes_on_disk=size, bytes_allocated=allocated)


def fsync_tree(path: str) -> None:
    """fsync every file and directory below `path` (and `path` itself)."""
    for root, _, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def filesystem(path: str) -> dict[str, str]:
    """The mount `path` lies on (the longest /proc/mounts prefix): mount point, type, device."""
    path = os.path.realpath(path)
    best = dict(mount_point="?", type="?", device="?")
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            mounts = [line.split()[:3] for line in f]
    except OSError:
        return best
    for device, point, kind in sorted(mounts, key=lambda m: len(m[1])):
        if path == point or path.startswith(point.rstrip("/") + "/"):
            best = dict(mount_point=point, type=kind, device=device)
    return best


def rounds(warmup: int, repeats: int, one: Callable[[str], dict[str, Any]], root: str
           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`warmup` then `repeats` calls of `one(directory)`, each with a fresh directory under
    `root` (removed afterwards); returns (warmup results, timed results)."""
    results = []
    for _ in range(warmup + repeats):
        directory = tempfile.mkdtemp(prefix="t5g2-ckpt-bench-", dir=root)
        try:
            results.append(one(directory))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    return results[:warmup], results[warmup:]


def medians(results: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for key in keys:
        values = [r[key] for r in results]
        out[f"{key}_median"] = round(statistics.median(values), 4)
        out[f"{key}_all"] = [round(v, 4) for v in values]
    return out


def sizes(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The last round's disk usage, and whether every round was equal bit for bit."""
    return dict(**{k: results[-1][k] for k in ("files", "bytes_on_disk", "bytes_allocated")},
                restored_bitwise_equal=all(r["equal"] for r in results))


# --------------------------------------------------------------------------- t5g2

def populated_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh, seed: int
                    ) -> tuple[TrainState, TrainState]:
    """(the train state after one optimizer step with random gradients, its shardings). The
    gradients are drawn on the host: random draws inside the jitted update compile slowly."""
    shardings = state_shardings(cfg, tx, mesh)
    state = init_train_state(cfg, tx, mesh, seed)
    rng = np.random.default_rng(seed)
    grads = jax.tree.map(lambda p: rng.standard_normal(p.shape, np.float32).astype(p.dtype),
                         state.params)
    grads = jax.device_put(grads, shardings.params)

    def step(state: TrainState, grads) -> TrainState:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state)

    with sharding.use_mesh(mesh):
        state = jax.jit(step, out_shardings=shardings)(state, grads)
    return jax.block_until_ready(state), shardings


def t5g2_arrays(state: TrainState) -> dict[str, Any]:
    return dict(step=state.step, **{f"{item}/{k}": v for item in ("params", "opt_state")
                                   for k, v in flatten(getattr(state, item)).items()})


def bench_t5g2(cfg: ModelConfig, train_cfg: TrainConfig, config_json: Mapping[str, Any],
               root: str, repeats: int, warmup: int, fsync: bool, seed: int) -> dict[str, Any]:
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    tx, _ = make_optimizer(train_cfg)
    state, shardings = populated_state(cfg, tx, mesh, seed)
    abstract = abstract_train_state(cfg, tx)
    saved = t5g2_arrays(state)  # kept as they are: compared with each restore
    data_state = {"batches_returned": STEP}

    def one(directory: str) -> dict[str, Any]:
        ckpt = Checkpointer(directory, every=1, keep=1, async_save=True)
        start = time.perf_counter()
        ckpt.save(STEP, state, data_state, config_json)
        blocking = time.perf_counter() - start
        ckpt.wait()
        if fsync:
            fsync_tree(directory)
        durable = time.perf_counter() - start
        ckpt.close()
        usage = disk_usage(directory)
        reader = Checkpointer(directory, every=1, keep=1, async_save=True)
        start = time.perf_counter()
        restored = jax.block_until_ready(reader.restore(STEP, abstract, shardings).state)
        restore = time.perf_counter() - start
        reader.close()
        got = t5g2_arrays(restored)
        equal = got.keys() == saved.keys() and all(bitwise_equal(saved[k], got[k])
                                                   for k in saved)
        del restored, got
        return dict(save_blocking_s=blocking, durable_s=durable, restore_s=restore, equal=equal,
                    **usage)

    cold, timed = rounds(warmup, repeats, one, root)
    out = dict(parameters=int(sum(v.size for k, v in saved.items() if k.startswith("params/"))),
               arrays=len(saved), array_bytes=int(sum(v.nbytes for v in saved.values())),
               **sizes(timed), **medians(timed, ("save_blocking_s", "durable_s", "restore_s")))
    if cold:
        out["warmup_save_blocking_s"] = round(cold[0]["save_blocking_s"], 4)
    out["what"] = ("Checkpointer(async_save=True).save -> wait -> a fresh Checkpointer's restore "
                   "onto the same one-device mesh (fingerprints checked)")
    return out


# --------------------------------------------------------------------------- torch

def bench_torch(cfg: ModelConfig, train_cfg: TrainConfig, root: str, repeats: int,
                warmup: int, fsync: bool, seed: int) -> dict[str, Any]:
    import torch

    from t5g2.convert import hf_t5gemma2
    from tests.reference import hf_t5gemma2_model

    def vision(name):
        return hf_t5gemma2._canonical(name).startswith(hf_t5gemma2.VISION_PREFIXES)

    def model_and_optimizer(model_seed):
        model = hf_t5gemma2_model(cfg, model_seed).train()
        for name, p in model.named_parameters():
            p.requires_grad_(not vision(name))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=train_cfg.learning_rate,
                                betas=(train_cfg.b1, train_cfg.b2), eps=train_cfg.eps,
                                weight_decay=train_cfg.weight_decay)
        return model, opt, params

    model, opt, params = model_and_optimizer(seed)
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    opt.step()
    opt.zero_grad(set_to_none=True)
    # The restore target: other weights, an empty optimizer, built once (not timed).
    target, target_opt, _ = model_and_optimizer(seed + 1)

    def tensors(m, o) -> dict[str, np.ndarray]:
        out = {f"model/{k}": v.detach().numpy() for k, v in m.state_dict().items()}
        for index, state in o.state_dict()["state"].items():
            out.update({f"optimizer/{index}/{k}": v.detach().numpy() for k, v in state.items()})
        return out

    saved = tensors(model, opt)  # views of the live tensors, which nothing changes
    storages = {}
    for t in list(model.state_dict().values()) + [v for s in opt.state.values()
                                                   for v in s.values()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    def one(directory: str) -> dict[str, Any]:
        path = os.path.join(directory, "checkpoint.pt")
        start = time.perf_counter()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        if fsync:
            fsync_tree(directory)
        save = time.perf_counter() - start
        usage = disk_usage(directory)
        start = time.perf_counter()
        checkpoint = torch.load(path)
        target.load_state_dict(checkpoint["model"])
        target_opt.load_state_dict(checkpoint["optimizer"])
        load = time.perf_counter() - start
        del checkpoint
        got = tensors(target, target_opt)
        equal = got.keys() == saved.keys() and all(bitwise_equal(saved[k], got[k])
                                                   for k in saved)
        return dict(save_s=save, load_s=load, equal=equal, **usage)

    _, timed = rounds(warmup, repeats, one, root)
    vision_params = sum(p.numel() for n, p in model.named_parameters() if vision(n))
    return dict(parameters=int(sum(p.numel() for p in model.parameters())),
                trained_parameters=int(sum(p.numel() for p in params)),
                vision_tower_parameters=int(vision_params),
                array_bytes=int(sum(storages.values())),
                **sizes(timed), **medians(timed, ("save_s", "load_s")),
                what=('torch.save({"model": model.state_dict(), "optimizer": '
                      'optimizer.state_dict()}) -> torch.load + model.load_state_dict + '
                      'optimizer.load_state_dict into a second model and AdamW'),
                torch_num_threads=torch.get_num_threads())


def bench_torch_isolated(*args, **kwargs) -> dict[str, Any]:
    """`bench_torch` in a fresh spawned process (its own memory and thread pools)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result = pool.apply(bench_torch, args, kwargs)
    result["process"] = "separate (spawned)"
    return result


# --------------------------------------------------------------------------- the benchmark

def run(config: ml_collections.ConfigDict, *, repeats: int = 3, warmup: int = 1,
        directory: str | None = None, fsync: bool = False, isolate: bool = True,
        seed: int = 0) -> dict[str, Any]:
    """The whole benchmark as one JSON-able dict. `isolate`: the torch side in its own spawned
    process (the default; False runs it here, e.g. for a quick test)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    root = os.path.abspath(directory or tempfile.gettempdir())
    os.makedirs(root, exist_ok=True)
    cfg = model_config(config)
    train_cfg = TrainConfig.from_config_dict(config.train)
    out: dict[str, Any] = dict(
        config=config.get("name", "?"), model=summary(cfg), dtype="float32",
        repeats=repeats, warmup_rounds=warmup, directory=root, filesystem=filesystem(root),
        fsync=fsync, durable_means=("fsync'd to the device" if fsync else
                                    "written to the OS (page cache), not fsync'd"),
        environment=dict(environment(), **machine.package_versions(("orbax-checkpoint",))))
    bench = bench_torch_isolated if isolate else bench_torch
    out["torch"] = bench(cfg, train_cfg, root, repeats, warmup, fsync, seed)
    out["t5g2"] = bench_t5g2(cfg, train_cfg, config_as_json(config), root, repeats, warmup,
                             fsync, seed)
    t5g2, torch = out["t5g2"], out["torch"]
    out["ratios"] = dict(
        torch_save_over_t5g2_blocking=round(torch["save_s_median"]
                                            / t5g2["save_blocking_s_median"], 3),
        torch_save_over_t5g2_durable=round(torch["save_s_median"] / t5g2["durable_s_median"], 3),
        torch_load_over_t5g2_restore=round(torch["load_s_median"] / t5g2["restore_s_median"], 3),
        torch_bytes_over_t5g2_bytes=round(torch["bytes_on_disk"] / t5g2["bytes_on_disk"], 3))
    out["environment"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    return out


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_integer("repeats", 3, "timed rounds (medians reported)")
    flags.DEFINE_integer("warmup", 1, "untimed rounds before the timed ones")
    flags.DEFINE_string("dir", None, "where the checkpoints go (default: the temp dir)")
    flags.DEFINE_bool("fsync", False, "fsync every checkpoint file: durable = on the device")
    flags.DEFINE_bool("isolate", True, "run the torch side in its own spawned process")
    flags.DEFINE_integer("seed", 0, "initialisation and gradient seed")


def main(argv=None) -> None:
    machine.config_main(argv, define_flags, lambda config, f: run(
        config, repeats=f.repeats, warmup=f.warmup, directory=f.dir, fsync=f.fsync,
        isolate=f.isolate, seed=f.seed))


if __name__ == "__main__":
    main()
