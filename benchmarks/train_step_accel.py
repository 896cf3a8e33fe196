"""One t5g2 train step on this machine's accelerator: step time, tokens/s, MFU against the
device's published bf16 peak, and memory. Prints one JSON object. Run from the repository root,
one attention implementation per process (so the device's peak memory is that run's):

    python -m benchmarks.train_step_accel --config=configs/t5g2_270m.py:text \
        --config.model.attention_impl=cudnn --encoder_length=16384 --decoder_length=16384

What is measured: the jitted `make_train_step` (forward with the loss, backward, clipping, AdamW)
at the config's dtypes, compiled ahead of time, `--warmup` untimed steps, then the median of
`--steps` steps, each until the new state is ready (`benchmarks.train_step.bench_t5g2`, the same
measurement as the CPU comparison with Hugging Face, without the reference). The batch has one
full segment per row, so every token is real: tokens/s counts encoder plus decoder tokens. MFU
is the batch's model FLOPs (`t5g2.model.flops.batch_train_flops`: visible query/key pairs only)
per second over the peak: `--peak_tflops`, else the published dense bf16 peak of the device kind
(`t5g2.train.peak.PUBLISHED_PEAKS`: H100/H200 989, A100 312 TFLOP/s), else (a CPU) a float32
matmul measured on the spot. Memory: the device's `peak_bytes_in_use` (GPU, TPU) and XLA's
buffer assignment of the compiled step (every backend).
"""

from __future__ import annotations

import jax  # before benchmarks.train_step, which defaults JAX_PLATFORMS to cpu when unset

from typing import Any

from benchmarks import machine, train_step
from t5g2.train.peak import peak_flops_per_device

MIB = 2**20
CPU_ONLY_KEYS = ("mfu", "mfu_dense", "matmul_peak_flops_per_s", "matmul_peak_measurements",
                 "peak_rss_delta_mib", "rss_delta_before_steps_mib", "peak_rss_method")


def run(config, *, batch: int = 1, encoder_length: int = 16384, decoder_length: int = 16384,
        steps: int = 5, warmup: int = 2, peak_tflops: float = 0.0) -> dict[str, Any]:
    """The benchmark as one JSON-able dict."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
    cfg = train_step.model_config(config, keep_dtype=True)
    train_cfg = train_step.train_config(config, batch, encoder_length, decoder_length, steps)
    data = train_step.make_batch(cfg, batch, encoder_length, decoder_length)
    flops = train_step.step_flops(cfg, data)
    peak, peak_origin = peak_flops_per_device(peak_tflops * 1e12 if peak_tflops else None)
    step, _ = train_step.bench_t5g2(cfg, train_cfg, data, warmup, steps, flops, peak_size=256)
    stats = jax.local_devices()[0].memory_stats() or {}
    peak_bytes = stats.get("peak_bytes_in_use")
    return dict(
        benchmark="train_step_accel", config=config.get("name", "?"),
        attention_impl=cfg.attention_impl, attention_query_chunk=cfg.attention_query_chunk,
        model=train_step.summary(cfg), batch=batch, encoder_length=encoder_length,
        decoder_length=decoder_length, tokens_per_step=batch * (encoder_length + decoder_length),
        warmup_steps=warmup, timed_steps=steps,
        step_s_median=step["step_s_median"], tokens_per_s=step["tokens_per_s"],
        model_flops_per_step=flops["useful"], model_flops_per_s=step["model_flops_per_s"],
        peak_flops_per_s=peak, peak_origin=peak_origin,
        mfu=round(step["model_flops_per_s"] / peak, 4),
        device_peak_memory_gib=None if peak_bytes is None else round(peak_bytes / 2**30, 2),
        device_memory_limit_gib=(round(stats["bytes_limit"] / 2**30, 2)
                                 if "bytes_limit" in stats else None),
        xla_buffers_mib=step.get("xla_buffers_mib"),
        step={k: v for k, v in step.items() if k not in CPU_ONLY_KEYS},
        environment=dict(machine.describe(), jax=jax.__version__,
                         backend=jax.default_backend(),
                         device=jax.local_devices()[0].device_kind, devices_used=1))


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_integer("batch", 1, "rows per step")
    flags.DEFINE_integer("encoder_length", 16384, "encoder tokens per row")
    flags.DEFINE_integer("decoder_length", 16384, "decoder tokens per row")
    flags.DEFINE_integer("steps", 5, "timed steps (the median is reported)")
    flags.DEFINE_integer("warmup", 2, "untimed steps before the timed ones")
    flags.DEFINE_float("peak_tflops", 0.0, "the device's peak TFLOP/s for MFU (0: published)")


def main(argv=None) -> None:
    machine.config_main(argv, define_flags, lambda config, flags: run(
        config, batch=flags.batch, encoder_length=flags.encoder_length,
        decoder_length=flags.decoder_length, steps=flags.steps, warmup=flags.warmup,
        peak_tflops=flags.peak_tflops))


if __name__ == "__main__":
    main()
