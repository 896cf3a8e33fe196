"""Attention kernels on this machine: forward and forward+backward time and memory of each
implementation behind `t5g2.model.kernels.dot_product_attention`, at the 270M model's attention
shapes. Prints one JSON object. Run from the repository root:

    python -m benchmarks.attention                        # 4K, 8K and 16K tokens, every case
    python -m benchmarks.attention --lengths=4096 --cases=merged_global --impls=cudnn,gpu_flash
    python -m benchmarks.attention --interpret --lengths=256   # CPU: the fused kernels, interpreted

What is measured, per implementation x case x length (batch 1, T queries):
* cases: `encoder_local` (bidirectional two-sided window), `encoder_global`, `decoder_local`
  (causal sliding window), `decoder_global` (causal), and merged attention as T5Gemma 2's
  decoder runs it, `merged_local` / `merged_global`: T queries over T decoder keys (causal,
  windowed or not) and T encoder keys (all visible) under one softmax. One segment per row, no
  padding; heads, kv heads, head_dim, window and scale from the config (`--config`, default the
  270M: 4 query heads, 1 kv head, head_dim 256, window 512);
* implementations: those of this backend (xla always; GPU: cudnn, gpu_flash; TPU: splash), or
  `--impls`. On CPU the fused kernels run only with `--interpret` (Pallas interpret mode: a
  correctness path, its times are no performance figure). An implementation that cannot express
  a case (it raises `Unsupported` while tracing, where the model would fall back to xla) is
  reported as `unsupported` with its reason, not timed; a run that fails (e.g. out of memory) is
  reported as `error`;
* time: the jitted call compiled ahead of time, `--warmup` untimed calls, then the median of
  `--repeats` calls, each until its outputs are ready. Forward: the output; forward+backward: the
  gradients of q and of every part's k and v for a random output cotangent;
* memory: XLA's buffer assignment of the compiled forward+backward (temporaries, outputs,
  arguments: exact, every backend), and where the device reports it (GPU, TPU) its
  `peak_bytes_in_use` after the case ran: the process's high-water mark, so a per-case figure
  needs one case per process (as `benchmarks/gpu.sh` runs them);
* dtype: bfloat16 on accelerators, float32 on CPU, unless `--dtype`. `--query_chunk` is the xla
  path's (`model.attention_query_chunk`; the released configs use 1024).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp

from benchmarks import machine
from t5g2.model import ModelConfig
from t5g2.model.kernels import (AUTO_ORDER, FUSED, Kernel, Unsupported, dot_product_attention,
                                implementation)
from t5g2.model.masks import MaskSpec, decoder_window, encoder_window

CASES = ("encoder_local", "encoder_global", "decoder_local", "decoder_global", "merged_local",
         "merged_global")
LENGTHS = (4096, 8192, 16384)


def shapes(config) -> dict[str, Any]:
    """The attention shapes of a config's decoder (the encoder's are the same in every released
    size): heads, kv heads, head_dim, sliding window, scale."""
    stack = ModelConfig.from_config_dict(config.model).decoder
    return dict(num_heads=stack.num_heads, num_kv_heads=stack.num_kv_heads,
                head_dim=stack.head_dim, sliding_window=stack.sliding_window,
                scale=stack.attention_scale)


def case_inputs(case: str, length: int, shape: dict[str, Any], dtype, seed: int = 0):
    """(q, [(k, v)], [MaskSpec]) of one case at T = S = length, batch 1, one full segment."""
    keys = jax.random.split(jax.random.key(seed), 5)
    n, kh, h = shape["num_heads"], shape["num_kv_heads"], shape["head_dim"]
    q = jax.random.normal(keys[0], (1, length, n, h), dtype)

    def kv(i):
        return tuple(jax.random.normal(keys[i + j], (1, length, kh, h), dtype) for j in (0, 1))

    ids = jnp.arange(length, dtype=jnp.int32)[None]
    ones = jnp.ones_like(ids)
    window = shape["sliding_window"]
    local = case.endswith("local")
    if case.startswith("encoder"):
        self_mask = MaskSpec(ids, ones, ids, ones, window=encoder_window(window) if local else None,
                             contiguous=True)
    else:
        self_mask = MaskSpec(ids, ones, ids, ones, causal=True,
                             window=decoder_window(window) if local else None, contiguous=True)
    kvs, masks = [kv(1)], [self_mask]
    if case.startswith("merged"):
        kvs.append(kv(3))
        masks.append(MaskSpec(ids, ones, ids, ones))
    return q, kvs, masks


def default_impls(backend: str, interpret: bool) -> tuple[str, ...]:
    """xla and this backend's fused kernels; on CPU every fused kernel, interpreted, if asked."""
    if backend == "cpu":
        return ("xla",) + (FUSED if interpret else ())
    return ("xla",) + AUTO_ORDER.get(backend, ())


def unsupported_reason(impl: str, q, kvs, masks, scale: float) -> str | None:
    """Why `impl` cannot take this case (its `Unsupported`, raised while tracing), else None."""
    if impl == "xla":
        return None
    module = implementation(impl)
    interpret = jax.default_backend() not in module.BACKENDS
    parts = [(k, v, m) for (k, v), m in zip(kvs, masks)]
    try:
        jax.eval_shape(lambda q, parts: module.attend(q, parts, scale, interpret=interpret),
                       q, parts)
    except Unsupported as why:
        return str(why)
    return None


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return dict(median_s=round(statistics.median(times), 6), min_s=round(min(times), 6))


def compiled_memory(compiled) -> dict[str, int] | None:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return dict(temp_bytes=int(analysis.temp_size_in_bytes),
                output_bytes=int(analysis.output_size_in_bytes),
                argument_bytes=int(analysis.argument_size_in_bytes),
                temp_plus_output_bytes=int(analysis.temp_size_in_bytes
                                           + analysis.output_size_in_bytes))


def device_peak_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats or "peak_bytes_in_use" not in stats else int(
        stats["peak_bytes_in_use"])


def measure(impl: str, case: str, length: int, shape: dict[str, Any], dtype, *,
            query_chunk: int, warmup: int, repeats: int) -> dict[str, Any]:
    """One implementation on one case: its times and memory, or why it did not run."""
    row: dict[str, Any] = dict(impl=impl, case=case, length=length)
    q, kvs, masks = case_inputs(case, length, shape, dtype)
    scale = shape["scale"]
    reason = unsupported_reason(impl, q, kvs, masks, scale)
    if reason is not None:
        return dict(row, status="unsupported", reason=reason)
    kernel = Kernel(impl, query_chunk if impl == "xla" else 0)

    def forward(q, kvs, masks):
        return dot_product_attention(q, [(k, v, m) for (k, v), m in zip(kvs, masks)], scale,
                                     kernel)

    def forward_backward(q, kvs, masks, cotangent):
        def loss(q, kvs):
            return jnp.sum(forward(q, kvs, masks).astype(jnp.float32) * cotangent)
        return jax.grad(loss, argnums=(0, 1))(q, kvs)

    cotangent = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
    row["status"] = "ok"
    try:
        start = time.perf_counter()
        fwd = jax.jit(forward).lower(q, kvs, masks).compile()
        both = jax.jit(forward_backward).lower(q, kvs, masks, cotangent).compile()
        row["compile_s"] = round(time.perf_counter() - start, 2)
        row["forward"] = timed(lambda: fwd(q, kvs, masks), warmup, repeats)
        row["forward_backward"] = timed(lambda: both(q, kvs, masks, cotangent), warmup, repeats)
    except Exception as why:  # noqa: BLE001 -- a failed size (e.g. out of memory) is a result
        traceback.print_exc(file=sys.stderr)
        return dict(row, status="error", error=f"{type(why).__name__}: {str(why)[:300]}")
    row["memory"] = dict(forward_backward_compiled=compiled_memory(both),
                         forward_compiled=compiled_memory(fwd),
                         device_peak_bytes_in_use=device_peak_bytes())
    return row


def run(config, *, impls: tuple[str, ...] | None = None, cases=CASES, lengths=LENGTHS,
        dtype: str | None = None, query_chunk: int = 0, warmup: int = 2, repeats: int = 5,
        interpret: bool = False) -> dict[str, Any]:
    """The whole benchmark as one JSON-able dict: {"implementations": {impl: [rows]}, ...}."""
    backend = jax.default_backend()
    impls = tuple(impls or default_impls(backend, interpret))
    dtype = dtype or ("float32" if backend == "cpu" else "bfloat16")
    shape = shapes(config)
    out: dict[str, Any] = dict(
        benchmark="attention", config=config.get("name", "?"), shapes=shape, batch=1,
        dtype=dtype, query_chunk=query_chunk, warmup=warmup, repeats=repeats,
        interpreted=[i for i in impls if i != "xla" and backend not in implementation(i).BACKENDS],
        environment=dict(machine.describe(), jax=jax.__version__, backend=backend,
                         device=jax.local_devices()[0].device_kind),
        implementations={})
    for impl in impls:
        out["implementations"][impl] = [
            measure(impl, case, length, shape, jnp.dtype(dtype), query_chunk=query_chunk,
                    warmup=warmup, repeats=repeats)
            for length in lengths for case in cases]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line (see the module docstring): prints the result as JSON, returns it."""
    import argparse
    import importlib

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="t5g2_270m",
                        help="the configs/ module whose attention shapes are used")
    parser.add_argument("--impls", default="",
                        help="comma-separated implementations (default: this backend's)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)),
                        help="comma-separated query (= key) lengths")
    parser.add_argument("--dtype", default=None,
                        help="q/k/v dtype (default: bfloat16, float32 on CPU)")
    parser.add_argument("--query_chunk", type=int, default=0,
                        help="the xla path's query chunk (model.attention_query_chunk; 0: off)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (median reported)")
    parser.add_argument("--interpret", action="store_true",
                        help="on CPU, also the fused kernels in Pallas interpret mode")
    args = parser.parse_args(argv)
    cases = tuple(c for c in args.cases.split(",") if c)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"--cases: {unknown} unknown; valid: {', '.join(CASES)}")
    config = importlib.import_module(f"configs.{args.config}").get_config()
    result = run(config, impls=tuple(i for i in args.impls.split(",") if i), cases=cases,
                 lengths=tuple(int(n) for n in args.lengths.split(",")), dtype=args.dtype,
                 query_chunk=args.query_chunk, warmup=args.warmup, repeats=args.repeats,
                 interpret=args.interpret)
    print(json.dumps(result, indent=2))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
