"""Attention kernels behind one interface: `dot_product_attention(q, parts, scale, kernel)`.

Every implementation takes the same key/value parts, each with its `MaskSpec`, and computes one
float32 softmax over all of them (merged attention included):

* `xla`: blocked einsums (`kernels/xla.py`), correct on every backend, the reference.
* `splash`: Pallas splash attention on TPU (`kernels/splash.py`).
* `cudnn`: cuDNN's fused attention through `jax.nn.dot_product_attention` on GPU.
* `gpu_flash`: t5g2's Pallas flash kernel on GPU, for the masks cuDNN cannot take.
* `auto`: the fused kernels of this backend in order of preference, then `xla`.

A kernel that cannot express some parts raises `Unsupported` while tracing; the call then falls
back to `xla` and the reason is logged once. A fused kernel asked for on CPU runs in Pallas
interpret mode: exact, slow, for tests.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Sequence

import jax

from t5g2.configlib import ConfigError
from t5g2.model.masks import KVPart

log = logging.getLogger(__name__)

FUSED = ("splash", "cudnn", "gpu_flash")
IMPLS = ("auto", "xla") + FUSED
AUTO_ORDER = {"tpu": ("splash",), "gpu": ("cudnn", "gpu_flash")}  # others: xla


class Unsupported(Exception):
    """A kernel cannot express these parts; the message says why (one sentence)."""


@dataclasses.dataclass(frozen=True)
class Kernel:
    """Which attention implementation runs, and the XLA path's query chunk (0: all at once)."""

    impl: str = "xla"
    query_chunk: int = 0


def implementation(name: str):
    """The module of implementation `name` (imported on first use: a backend's kernels load
    only where they are asked for)."""
    return importlib.import_module(f"{__name__}.{name}")


def check_backend(impl: str, backend: str, where: str = "model.attention_impl") -> None:
    """ConfigError when `impl` cannot run on `backend` (CPU runs every kernel interpreted)."""
    if impl not in IMPLS:
        raise ConfigError(f"{where}={impl!r} is unknown; valid: {', '.join(IMPLS)}")
    if impl in FUSED and backend != "cpu":
        native = implementation(impl).BACKENDS
        if backend not in native:
            others = ", ".join(("auto", "xla") + AUTO_ORDER.get(backend, ()))
            raise ConfigError(f"{where}={impl!r} runs on {'/'.join(native)}, not on this "
                              f"{backend} backend; use one of: {others}")


def describe(impl: str, backend: str) -> str:
    """One log line: which attention runs here (ConfigError if `impl` cannot run on `backend`)."""
    check_backend(impl, backend)
    fused = candidates(impl, backend)
    if not fused:
        return f"attention: xla on {backend}"
    mode = " (Pallas interpret mode: exact, slow)" if backend == "cpu" else ""
    return (f"attention: {impl} on {backend}: {', '.join(fused)}{mode}, then xla where a kernel "
            "cannot express a mask")


def candidates(impl: str, backend: str) -> tuple[str, ...]:
    """The fused kernels to try, in order, before the XLA core."""
    if impl == "auto":
        return AUTO_ORDER.get(backend, ())
    return () if impl == "xla" else (impl,)


XLA = Kernel()  # the XLA core, all queries at once


def dot_product_attention(q: jax.Array, parts: Sequence[KVPart], scale: float,
                          kernel: Kernel = XLA) -> jax.Array:
    """Grouped-query attention of q [B,T,N,H] over the concatenation of key/value parts
    (k [B,S,K,H], v [B,S,K,H], MaskSpec), one float32 softmax over all of them -> [B,T,N,H].

    Outputs at padding queries (segment 0) are finite and unspecified."""
    backend = jax.default_backend()
    check_backend(kernel.impl, backend)
    for name in candidates(kernel.impl, backend):
        module = implementation(name)
        interpret = backend not in module.BACKENDS
        if interpret:
            _log_once(f"attention: {name} runs in Pallas interpret mode on {backend} (exact, "
                      "slow: for tests)")
        try:
            return module.attend(q, parts, scale, interpret=interpret)
        except Unsupported as why:
            _log_once(f"attention: {name} cannot run this attention ({why}); using xla")
    return implementation("xla").attend(q, parts, scale, query_chunk=kernel.query_chunk)


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.warning(message)
