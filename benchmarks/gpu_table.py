"""Markdown tables of `benchmarks/attention.py` and `benchmarks/train_step_accel.py` JSON files
(what `benchmarks/gpu.sh` prints at the end):

    python -m benchmarks.gpu_table results/*.json
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable

MIB = 2**20


def _ms(timing: dict[str, float] | None) -> str:
    return "" if not timing else f"{timing['median_s'] * 1e3:.2f}"


def _attention_memory(row: dict[str, Any]) -> tuple[str, str]:
    """(device peak GiB, compiled fwd+bwd temporaries + outputs MiB)."""
    memory = row.get("memory") or {}
    peak = memory.get("device_peak_bytes_in_use")
    compiled = memory.get("forward_backward_compiled") or {}
    planned = compiled.get("temp_plus_output_bytes")
    return ("" if peak is None else f"{peak / 2**30:.2f}",
            "" if planned is None else f"{planned / MIB:.0f}")


def attention_table(results: Iterable[dict[str, Any]]) -> str:
    lines = ["| case | length | impl | forward ms | fwd+bwd ms | device peak GiB "
             "| XLA fwd+bwd temp+out MiB | note |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [row for result in results for impl_rows in result["implementations"].values()
            for row in impl_rows]
    for row in sorted(rows, key=lambda r: (r["case"], r["length"], r["impl"])):
        note = {"ok": "", "unsupported": f"unsupported: {row.get('reason', '')}",
                "error": f"error: {row.get('error', '')[:80]}"}[row["status"]]
        peak, planned = _attention_memory(row)
        lines.append(f"| {row['case']} | {row['length']} | {row['impl']} "
                     f"| {_ms(row.get('forward'))} | {_ms(row.get('forward_backward'))} "
                     f"| {peak} | {planned} | {note} |")
    return "\n".join(lines)


def train_step_table(results: Iterable[dict[str, Any]]) -> str:
    lines = ["| attention_impl | encoder/decoder tokens | step s | tokens/s | MFU | peak TFLOP/s "
             "| device peak GiB | first-step loss |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r["attention_impl"]):
        peak = "" if r["device_peak_memory_gib"] is None else r["device_peak_memory_gib"]
        lines.append(f"| {r['attention_impl']} | {r['encoder_length']}/{r['decoder_length']} "
                     f"| {r['step_s_median']:.3f} | {r['tokens_per_s']:.0f} | {r['mfu']:.3f} "
                     f"| {r['peak_flops_per_s'] / 1e12:.3g} | {peak} "
                     f"| {r['step']['first_step_loss']:.4f} |")
    return "\n".join(lines)


def tables(results: list[dict[str, Any]]) -> str:
    """Both tables (those with results), with the device they ran on."""
    by_kind = {"attention": [], "train_step_accel": []}
    for result in results:
        by_kind[result["benchmark"]].append(result)
    devices = sorted({r["environment"]["device"] for r in results})
    out = [f"Device: {', '.join(devices)}"]
    if by_kind["attention"]:
        first = by_kind["attention"][0]
        shape = first["shapes"]
        out += ["", f"Attention ({first['config']}: {shape['num_heads']} query heads, "
                    f"{shape['num_kv_heads']} kv heads, head_dim {shape['head_dim']}, window "
                    f"{shape['sliding_window']}; batch 1, {first['dtype']}, xla query_chunk "
                    f"{first['query_chunk']})", "",
                attention_table(by_kind["attention"])]
    steps = by_kind["train_step_accel"]
    if steps:
        out += ["", f"Train step ({steps[0]['config']}, batch {steps[0]['batch']}, "
                    f"{steps[0]['model']['dtype']})", "", train_step_table(steps)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    paths = sys.argv[1:] if argv is None else argv
    results = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            results.append(json.load(f))
    text = tables(results)
    print(text)
    return text


if __name__ == "__main__":
    main()
