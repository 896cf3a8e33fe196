"""Train-step throughput on this machine: t5g2 (JAX) against the Hugging Face PyTorch
`T5Gemma2ForConditionalGeneration` with the same config, the same initial weights and the same
batch. Prints one JSON object. Run from the repository root:

    python -m benchmarks.train_step --config configs/tiny.py
    python -m benchmarks.train_step --config configs/tiny.py --batch 8 --encoder_length 256 \
        --decoder_length 128 --config.model.encoder.d_model=256 --config.model.decoder.d_model=256

What is measured, per side:
* one full train step per iteration: forward with the loss, backward, global-norm clipping (when
  the config's `train.grad_clip_norm` > 0), AdamW update (t5g2: its jitted `make_train_step`;
  torch: `loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW.step()`, `zero_grad()`);
* `warmup` untimed steps, then `steps` steps timed one by one (JAX: until the new state and
  metrics are ready); the median is reported. t5g2's compile time is the ahead-of-time
  `lower(...).compile()` of the step, reported separately;
* the first step's loss on both sides (same weights, same batch: equal up to float32 noise), so
  the model's compute dtype is forced to float32 unless `--keep_dtype`;
* model FLOPs of the batch's real tokens from `t5g2.model.flops.batch_train_flops`, as the
  training loop counts them (useful: visible query/key pairs only, the MFU convention; dense:
  every pair, what the reference computes), MFU against a
  float32 square matmul measured on the spot by each framework (`measure_matmul_peak`'s method,
  the same loop in torch), before and after each run, the larger used: a measurement can only
  come out too low, e.g. when something else runs on the machine (the load average is reported
  at the start and the end; compare runs only where it stayed below the core count);
* peak memory: the process's peak RSS (VmHWM, reset through /proc/self/clear_refs before the
  warmup steps) minus the RSS before the model was built, with freed heap returned first
  (malloc_trim). JAX's CPU device has no `memory_stats()`. For t5g2 this RSS figure also holds
  what compilation left resident (`rss_delta_before_steps_mib`: state + compiler leftovers), so
  XLA's own buffer assignment of the compiled step is reported too (`xla_buffers_mib`, exact:
  parameters, optimizer state, temporaries). Torch allocates gradients and AdamW moments in the
  first step, so its figure is parameters + gradients + moments + activations.
Each reference run (one per attn_implementation) runs in its own spawned process, so its memory
and lazily initialised libraries are its own and nothing of the JAX run shares the process.

The batch: random token ids below every special id (EOI, image), one segment per row, no
padding; decoder inputs are BOS followed by the targets shifted right; the same arrays feed both.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import machine  # noqa: E402
from t5g2 import sharding  # noqa: E402
from t5g2.model import ModelConfig  # noqa: E402
from t5g2.model.flops import batch_train_flops  # noqa: E402
from t5g2.model.params import count_params, flat_params  # noqa: E402
from t5g2.train.config import TrainConfig  # noqa: E402
from t5g2.train.optimizer import make_optimizer  # noqa: E402
from t5g2.train.peak import measure_matmul_peak  # noqa: E402
from t5g2.train.state import init_train_state, model_graphdef, state_shardings  # noqa: E402
from t5g2.train.step import make_train_step  # noqa: E402

MIB = 2**20
LOSS_RTOL = 1e-4  # float32, same weights and batch: the losses agree to ~1e-6 relative


# --------------------------------------------------------------------------- memory

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak resident memory of a phase, relative to the RSS when the phase's baseline was taken.

    Linux: VmHWM, reset with /proc/self/clear_refs ("5"); elsewhere resource.getrusage's maxrss,
    which cannot be reset (the figure is then a lower bound: an earlier, higher peak hides it).
    """

    def __init__(self):
        self.baseline_kib = 0
        self.method = ""

    @staticmethod
    def release_free_memory() -> None:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    def set_baseline(self) -> None:
        self.release_free_memory()
        self.baseline_kib = _status_kib("VmRSS") or self._maxrss_kib()

    def reset_peak(self) -> None:
        """Start the high-water mark here (the baseline stays where it was set)."""
        self.release_free_memory()
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            self.method = ("VmHWM (peak RSS, reset before the warmup steps) minus VmRSS before "
                           "the model was built")
        except OSError:
            self.method = ("resource.getrusage max RSS (not resettable: lower bound) minus RSS "
                           "before the model was built")

    @staticmethod
    def _maxrss_kib() -> int:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    def current_delta_mib(self) -> float | None:
        rss = _status_kib("VmRSS")
        return None if rss is None else round((rss - self.baseline_kib) / 1024, 1)

    def peak_delta_mib(self) -> float:
        peak = _status_kib("VmHWM") if "VmHWM" in self.method else self._maxrss_kib()
        return round((peak - self.baseline_kib) / 1024, 1)


# --------------------------------------------------------------------------- config and batch

def model_config(config: ml_collections.ConfigDict, keep_dtype: bool = False) -> ModelConfig:
    """The run's ModelConfig; compute dtype forced to float32 unless `keep_dtype`."""
    cfg = ModelConfig.from_config_dict(config.model)
    if not keep_dtype:
        cfg = dataclasses.replace(cfg, dtype="float32", param_dtype="float32")
        cfg.validate()
    return cfg


def train_config(config: ml_collections.ConfigDict, batch: int, encoder_length: int,
                 decoder_length: int, steps: int) -> TrainConfig:
    """The config's optimizer settings with the benchmark's shapes; no accumulation."""
    cfg = TrainConfig.from_config_dict(config.train)
    cfg = dataclasses.replace(cfg, batch_size=batch, encoder_length=encoder_length,
                              decoder_length=decoder_length, steps=max(steps, 1),
                              grad_accum_steps=1)
    cfg.validate()
    return cfg


def make_batch(cfg: ModelConfig, batch: int, encoder_length: int, decoder_length: int,
               seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids in [3, min(vocab, special ids)), one segment per row, no padding."""
    rng = np.random.default_rng(seed)
    high = min(cfg.vocab_size, cfg.eoi_token_id, cfg.image_token_id)
    if high <= 3:
        high = cfg.vocab_size
    enc = rng.integers(3, high, size=(batch, encoder_length), dtype=np.int32)
    targets = rng.integers(3, high, size=(batch, decoder_length), dtype=np.int32)
    dec = np.concatenate([np.full((batch, 1), cfg.bos_id, np.int32), targets[:, :-1]], axis=1)

    def positions(n):
        return np.ascontiguousarray(np.broadcast_to(np.arange(n, dtype=np.int32), (batch, n)))

    return dict(encoder_input_tokens=enc,
                encoder_segment_ids=np.ones_like(enc), encoder_positions=positions(encoder_length),
                decoder_input_tokens=dec, decoder_target_tokens=targets,
                decoder_segment_ids=np.ones_like(targets),
                decoder_positions=positions(decoder_length),
                decoder_loss_weights=np.ones(targets.shape, np.float32))


def summary(cfg: ModelConfig) -> dict[str, Any]:
    def stack(s):
        return dict(num_layers=s.num_layers, d_model=s.d_model, ffn_dim=s.ffn_dim,
                    num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                    sliding_window=s.sliding_window)

    return dict(encoder=stack(cfg.encoder), decoder=stack(cfg.decoder),
                vocab_size=cfg.vocab_size, tie_embeddings=cfg.tie_embeddings,
                cross_attention=cfg.cross_attention, final_logit_softcap=cfg.final_logit_softcap,
                dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat,
                attention_query_chunk=getattr(cfg, "attention_query_chunk", 0),
                parameters=count_params(cfg))


# --------------------------------------------------------------------------- timing

def timed_steps(step: Callable[[], Any], warmup: int, steps: int) -> tuple[list[float], Any]:
    """Runs warmup + steps calls of `step` (which must block until done); returns the timed
    steps' durations and the first call's result."""
    first = None
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        out = step()
        elapsed = time.perf_counter() - start
        if i == 0:
            first = out
        if i >= warmup:
            times.append(elapsed)
    return times, first


def throughput(times: list[float], batch: dict[str, np.ndarray], flops: dict[str, float],
               peak: float) -> dict[str, Any]:
    """Median step time, tokens/s and FLOP/s; MFU against `peak` (float32 matmul FLOP/s)."""
    median = statistics.median(times)
    n, s = batch["encoder_input_tokens"].shape
    t = batch["decoder_input_tokens"].shape[1]
    return dict(step_s_median=round(median, 5), step_s_min=round(min(times), 5),
                step_s_max=round(max(times), 5), tokens_per_s=round(n * (s + t) / median, 1),
                target_tokens_per_s=round(n * t / median, 1),
                model_flops_per_s=round(flops["useful"] / median, 1),
                dense_flops_per_s=round(flops["dense"] / median, 1),
                matmul_peak_flops_per_s=round(peak, 1),
                mfu=round(flops["useful"] / median / peak, 4),
                mfu_dense=round(flops["dense"] / median / peak, 4))


def best_peak(measure: Callable[[], float], before: float) -> tuple[float, dict[str, float]]:
    """The matmul peak measured again after a benchmark; the larger of the two is used (a
    measurement can only be too low, e.g. when something else ran on the machine)."""
    after = measure()
    return max(before, after), dict(before_flops_per_s=round(before, 1),
                                    after_flops_per_s=round(after, 1))


def step_flops(cfg: ModelConfig, batch: dict[str, np.ndarray]) -> dict[str, float]:
    """Model FLOPs of one step on `batch`, over its real tokens (padding is not work), as the
    training loop counts them for MFU."""
    return dict(useful=batch_train_flops(cfg, batch),
                dense=batch_train_flops(cfg, batch, useful_only=False))


# --------------------------------------------------------------------------- t5g2

def bench_t5g2(cfg: ModelConfig, train_cfg: TrainConfig, batch: dict[str, np.ndarray],
               warmup: int, steps: int, flops: dict[str, float], peak_size: int = 1024,
               seed: int = 0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(results, the initial parameters as flat numpy arrays). MFU is against JAX's float32
    matmul peak (`measure_matmul_peak(peak_size)`), measured before and after the steps."""
    def measure():
        return measure_matmul_peak(peak_size, jnp.float32)

    peak_before = measure()
    memory = PeakRSS()
    memory.set_baseline()
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    tx, schedule = make_optimizer(train_cfg)
    shardings = state_shardings(cfg, tx, mesh)
    state = init_train_state(cfg, tx, mesh, seed)
    graphdef, _ = model_graphdef(cfg)
    # Copies: the step donates the state's buffers.
    initial = {k: np.array(v, copy=True)
               for k, v in flat_params(nnx.merge(graphdef, state.params)).items()}
    step_fn = make_train_step(cfg, train_cfg, tx, schedule, mesh, shardings)
    device_batch = sharding.global_batch_from_host(batch, mesh)

    start = time.perf_counter()
    compiled = step_fn.lower(state, device_batch).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()

    holder = {"state": state}
    del state

    def one_step():
        holder["state"], metrics = compiled(holder["state"], device_batch)
        jax.block_until_ready((holder["state"], metrics))
        return metrics

    memory.reset_peak()
    before_steps = memory.current_delta_mib()
    times, first = timed_steps(one_step, warmup, steps)
    peak_rss = memory.peak_delta_mib()
    first = {k: float(v) for k, v in jax.device_get(first).items()}
    peak, peaks = best_peak(measure, peak_before)
    result = dict(compile_s=round(compile_s, 2), first_step_loss=first["loss"],
                  first_step_grad_norm=first["grad_norm"], **throughput(times, batch, flops, peak),
                  matmul_peak_measurements=peaks, peak_rss_delta_mib=peak_rss,
                  rss_delta_before_steps_mib=before_steps, peak_rss_method=memory.method)
    if analysis is not None:
        result["xla_buffers_mib"] = dict(
            arguments=round(analysis.argument_size_in_bytes / MIB, 1),
            outputs=round(analysis.output_size_in_bytes / MIB, 1),
            aliased=round(analysis.alias_size_in_bytes / MIB, 1),
            temporaries=round(analysis.temp_size_in_bytes / MIB, 1),
            total=round((analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                         - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes) / MIB, 1))
    holder = compiled = device_batch = None  # freed (one_step's cells too)
    return result, initial


# --------------------------------------------------------------------------- Hugging Face

def measure_torch_matmul_peak(size: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of the best of `repeats` float32 square matmuls (after a warm-up): the method of
    `t5g2.train.peak.measure_matmul_peak`, in torch."""
    import torch

    a = torch.ones((size, size), dtype=torch.float32)
    with torch.no_grad():
        a @ a
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def hf_model(cfg: ModelConfig, flat: dict[str, np.ndarray], attn_implementation: str):
    """The reference model from the same config and weights, float32, in train mode."""
    import torch
    from transformers import T5Gemma2ForConditionalGeneration

    from t5g2.convert import hf_t5gemma2

    hf_cfg = hf_t5gemma2.to_hf_config(cfg)
    hf_cfg._attn_implementation = attn_implementation
    torch.manual_seed(0)
    model = T5Gemma2ForConditionalGeneration(hf_cfg).float()
    in_memory = set(model.state_dict())

    def module_key(key):  # on-disk names -> the module's (model.encoder.text_model....)
        for alias, name in hf_t5gemma2._IN_MEMORY_ALIASES:
            if key.startswith(name) and alias + key[len(name):] in in_memory:
                return alias + key[len(name):]
        return key

    state = {module_key(k): torch.from_numpy(np.array(v, np.float32))
             for k, v in hf_t5gemma2.to_hf_state_dict(flat, cfg).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(hf_t5gemma2._TIED_COPIES) if cfg.tie_embeddings else set()

    def vision(key):
        return hf_t5gemma2._canonical(key).startswith(hf_t5gemma2.VISION_PREFIXES)

    missing = [k for k in missing if not vision(k) and hf_t5gemma2._canonical(k) not in tied]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit the reference: missing {missing[:8]}, "
                           f"unexpected {unexpected[:8]}")
    for name, p in model.named_parameters():
        p.requires_grad_(not vision(name))
    return model.train()


def _import_reference_modules() -> None:
    import importlib

    for name in ("transformers.models.t5gemma2.modeling_t5gemma2",
                 "transformers.models.siglip.modeling_siglip", "transformers.loss.loss_utils",
                 "torch.optim.adamw"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def bench_hf(cfg: ModelConfig, train_cfg: TrainConfig, flat: dict[str, np.ndarray],
             batch: dict[str, np.ndarray], warmup: int, steps: int, flops: dict[str, float],
             attn_implementation: str = "sdpa", peak_size: int = 1024) -> dict[str, Any]:
    """One reference run; MFU against torch's float32 matmul peak measured the same way as
    JAX's, before and after the steps, in this process."""
    import torch

    def measure():
        return measure_torch_matmul_peak(peak_size)

    peak_before = measure()
    _import_reference_modules()  # lazily imported modules are not the model's memory
    memory = PeakRSS()
    memory.set_baseline()
    model = hf_model(cfg, flat, attn_implementation)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train_cfg.learning_rate, betas=(train_cfg.b1, train_cfg.b2),
                            eps=train_cfg.eps, weight_decay=train_cfg.weight_decay)
    inputs = dict(
        input_ids=torch.from_numpy(batch["encoder_input_tokens"].astype(np.int64)),
        attention_mask=torch.from_numpy((batch["encoder_segment_ids"] != 0).astype(np.int64)),
        decoder_input_ids=torch.from_numpy(batch["decoder_input_tokens"].astype(np.int64)),
        decoder_attention_mask=torch.from_numpy(
            (batch["decoder_segment_ids"] != 0).astype(np.int64)),
        labels=torch.from_numpy(np.where(batch["decoder_loss_weights"] > 0,
                                         batch["decoder_target_tokens"], -100).astype(np.int64)))

    def one_step():
        loss = model(**inputs).loss
        loss.backward()
        grad_norm = None
        if train_cfg.grad_clip_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item(), None if grad_norm is None else grad_norm.item()

    memory.reset_peak()
    before_steps = memory.current_delta_mib()
    times, (loss, grad_norm) = timed_steps(one_step, warmup, steps)
    peak_rss = memory.peak_delta_mib()
    peak, peaks = best_peak(measure, peak_before)
    result = dict(attn_implementation=attn_implementation, first_step_loss=loss,
                  first_step_grad_norm=grad_norm, **throughput(times, batch, flops, peak),
                  matmul_peak_measurements=peaks, peak_rss_delta_mib=peak_rss,
                  rss_delta_before_steps_mib=before_steps, peak_rss_method=memory.method,
                  optimizer=f"torch.optim.AdamW (foreach={opt.defaults.get('foreach')})",
                  torch_num_threads=torch.get_num_threads())
    model = opt = params = inputs = None  # freed (one_step's cells too)
    PeakRSS.release_free_memory()
    return result


def bench_hf_isolated(*args, **kwargs) -> dict[str, Any]:
    """`bench_hf` in a fresh spawned process: its memory and lazily initialised libraries are
    its own, and nothing from the JAX run (heap, thread pools) shares the process."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result = pool.apply(bench_hf, args, kwargs)
    result["process"] = "separate (spawned)"
    return result


# --------------------------------------------------------------------------- the benchmark

def environment() -> dict[str, Any]:
    return dict(machine.describe(), jax=jax.__version__,
                **machine.package_versions(("jaxlib", "flax", "torch", "transformers")),
                jax_backend=jax.default_backend(), jax_devices=[str(d) for d in jax.devices()],
                devices_used=1, xla_flags=os.environ.get("XLA_FLAGS", ""),
                jax_threads="XLA's CPU thread pool (all cores it may use)",
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"))


def run(config: ml_collections.ConfigDict, *, batch: int = 8, encoder_length: int = 128,
        decoder_length: int = 64, steps: int = 10, warmup: int = 3, peak_size: int = 1024,
        attn_implementations: tuple[str, ...] = ("sdpa", "eager"), hf: bool = True,
        keep_dtype: bool = False, isolate: bool = True, seed: int = 0) -> dict[str, Any]:
    """The whole benchmark as one JSON-able dict. `isolate`: each reference run in its own
    spawned process (the default; False runs them here, e.g. for a quick test)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
    cfg = model_config(config, keep_dtype)
    train_cfg = train_config(config, batch, encoder_length, decoder_length, steps)
    data = make_batch(cfg, batch, encoder_length, decoder_length, seed)
    flops = step_flops(cfg, data)
    out: dict[str, Any] = dict(
        config=config.get("name", "?"), model=summary(cfg),
        dtype_forced_to_float32=not keep_dtype,
        batch=batch, encoder_length=encoder_length, decoder_length=decoder_length,
        tokens_per_step=batch * (encoder_length + decoder_length),
        target_tokens_per_step=batch * decoder_length, warmup_steps=warmup, timed_steps=steps,
        train=dict(learning_rate=train_cfg.learning_rate, grad_clip_norm=train_cfg.grad_clip_norm,
                   z_loss=train_cfg.z_loss, weight_decay=train_cfg.weight_decay,
                   b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps),
        environment=environment(),
        model_flops_per_step=flops["useful"], dense_flops_per_step=flops["dense"],
        flops_note=("t5g2.model.flops.batch_train_flops of the batch (real tokens only, as the "
                    "training loop counts MFU; this batch has no padding): useful = visible "
                    "query/key pairs only (MFU convention), dense = every pair, as the reference "
                    "computes (t5g2's banded local attention skips keys outside the window)"),
        matmul_peak=dict(size=peak_size, dtype="float32",
                         method="best of 10 square size x size matmuls after a warm-up "
                                "(t5g2.train.peak.measure_matmul_peak; the same loop in torch), "
                                "measured before and after each run, the larger used"))

    out["t5g2"], initial = bench_t5g2(cfg, train_cfg, data, warmup, steps, flops, peak_size,
                                      seed)
    out["matmul_peak"]["jax_flops_per_s"] = out["t5g2"]["matmul_peak_flops_per_s"]

    if hf and cfg.cross_attention != "merged":
        out["hf"] = dict(skipped=f"cross_attention={cfg.cross_attention!r}: the reference has "
                                 "merged attention only")
    elif hf:
        bench = bench_hf_isolated if isolate else bench_hf
        out["hf"] = {impl: bench(cfg, train_cfg, initial, data, warmup, steps, flops, impl,
                                 peak_size)
                     for impl in attn_implementations}
        out["matmul_peak"]["torch_flops_per_s"] = max(
            r["matmul_peak_flops_per_s"] for r in out["hf"].values())
        out["comparison"] = {impl: compare(out["t5g2"], ref) for impl, ref in out["hf"].items()}
    # Something else running on the machine shows here (and in a low matmul peak measurement).
    out["environment"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    return out


def compare(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    loss_diff = abs(ours["first_step_loss"] - ref["first_step_loss"])
    out = dict(tokens_per_s_ratio_t5g2_over_hf=round(ours["tokens_per_s"] / ref["tokens_per_s"],
                                                     3),
               step_time_ratio_hf_over_t5g2=round(ref["step_s_median"] / ours["step_s_median"],
                                                  3),
               first_step_loss_t5g2=ours["first_step_loss"],
               first_step_loss_hf=ref["first_step_loss"],
               first_step_loss_abs_diff=loss_diff,
               first_step_loss_rel_diff=loss_diff / abs(ref["first_step_loss"]),
               first_step_losses_agree=bool(loss_diff <= LOSS_RTOL * abs(ref["first_step_loss"])))
    if ref.get("first_step_grad_norm") is not None:
        out["first_step_grad_norm_rel_diff"] = (
            abs(ours["first_step_grad_norm"] - ref["first_step_grad_norm"])
            / abs(ref["first_step_grad_norm"]))
    return out


def main(argv=None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)",
                                                  lock_config=True)
    flags.DEFINE_integer("batch", 8, "batch size (rows)")
    flags.DEFINE_integer("encoder_length", 128, "encoder tokens per row")
    flags.DEFINE_integer("decoder_length", 64, "decoder tokens per row")
    flags.DEFINE_integer("steps", 10, "timed steps")
    flags.DEFINE_integer("warmup", 3, "untimed steps before the timed ones")
    flags.DEFINE_integer("peak_size", 1024, "side of the square float32 matmul for the peak")
    flags.DEFINE_list("attn", ["sdpa", "eager"], "HF attn_implementation(s) to run")
    flags.DEFINE_bool("hf", True, "also run the Hugging Face PyTorch reference")
    flags.DEFINE_bool("isolate", True, "run each reference in its own spawned process")
    flags.DEFINE_bool("keep_dtype", False, "keep the config's compute dtype (default: float32)")
    flags.mark_flags_as_required(["config"])
    FLAGS = flags.FLAGS

    def _main(argv):
        del argv
        result = run(config_flag.value, batch=FLAGS.batch, encoder_length=FLAGS.encoder_length,
                     decoder_length=FLAGS.decoder_length, steps=FLAGS.steps,
                     warmup=FLAGS.warmup, peak_size=FLAGS.peak_size,
                     attn_implementations=tuple(FLAGS.attn), hf=FLAGS.hf,
                     keep_dtype=FLAGS.keep_dtype, isolate=FLAGS.isolate)
        print(json.dumps(result, indent=2))
        sys.stdout.flush()

    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
