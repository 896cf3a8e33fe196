"""Peak FLOP/s of a device, the denominator of MFU: published bf16 dense peaks by device kind,
or, where none is known (a CPU), a matmul measured on the spot."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per JAX device (TPU v4/v5p: one device per chip, megacore).
PUBLISHED_PEAKS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def measure_matmul_peak(size: int = 1024, dtype=jnp.float32, repeats: int = 10,
                        device: jax.Device | None = None) -> float:
    """FLOP/s of the best of `repeats` square matmuls on one device (after a warm-up)."""
    device = device or jax.local_devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops_per_device(configured: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where it came from)."""
    if configured:
        return float(configured), "config"
    kind = jax.local_devices()[0].device_kind
    for name, peak in PUBLISHED_PEAKS.items():
        if kind.startswith(name):
            return peak, f"published bf16 peak of {kind}"
    return measure_matmul_peak(), f"measured float32 matmul on {kind}"
