"""Generation speed and long-input prefill on this machine: t5g2's cached generation
(`t5g2.generate`) against Hugging Face `T5Gemma2ForConditionalGeneration.generate` with the same
config and weights, in the same run. Prints one JSON object. From the repository root:

    python -m benchmarks.generate --config configs/tiny.py
    python -m benchmarks.generate --config configs/tiny.py --prefill_lengths 4096,8192 --attn sdpa

Two parts:
* decode: for each batch size (default 1 and 8), random encoder inputs of `encoder_length`
  tokens, greedy, EOS off so that every row makes `new_tokens` tokens. Time to first token =
  a call with max_new_tokens=1 (encoder, cross keys/values, first decoder step and pick);
  decode tokens/s = batch x (new_tokens - 1) / (time(new_tokens) - time(1)). Warm calls (after
  one untimed call of each shape), the median of `repeats`. Both sides' tokens are compared.
* prefill: one request of L input tokens for each L in `prefill_lengths` (default 4K ... 128K),
  max_new_tokens=1, each (side, L) in its own fresh process so that its peak memory is its own:
  peak RSS of the timed call (VmHWM reset before it) above the RSS once the model is built, and
  the call's time (t5g2: its second call, the first compiles; the reference has no compile).
  t5g2's encoder attends in query chunks of `query_chunk` (`model.attention_query_chunk`), so
  its memory grows linearly with L; the reference runs each attn implementation under an
  address-space limit of `memory_limit_gib` (default: this machine's available memory less
  1 GiB), so that running out of memory is an error it reports, not the kernel's OOM killer.
  A run past `timeout_s` is reported as such. The FLOPs split (local layers: linear in L;
  global layers' attention: quadratic) comes from t5g2.model.flops, to read the times by.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import machine  # noqa: E402
from benchmarks.train_step import PeakRSS, environment, hf_model, model_config, summary  # noqa: E402
from t5g2.model import ModelConfig, T5Gemma2  # noqa: E402
from t5g2.model.params import abstract_model, load_params, param_shapes  # noqa: E402

GIB = 2**30
PREFILL_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
NO_EOS = -1  # an id no step emits: every row runs max_new_tokens steps


# --------------------------------------------------------------------------- models and inputs

def random_params(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Every parameter random with O(1) logits (the default init's near-zero logits make greedy
    ties, which two frameworks may break differently), float32."""
    rng = np.random.default_rng(seed)
    std = cfg.decoder.d_model ** -0.5
    return {name: (rng.standard_normal(s.shape) * (std if len(s.shape) >= 2 else 0.3)
                   ).astype(np.float32)
            for name, s in param_shapes(abstract_model(cfg)).items()}


def t5g2_model(cfg: ModelConfig, flat: dict[str, np.ndarray]) -> T5Gemma2:
    model = abstract_model(cfg)
    load_params(model, flat)
    return model


def reference_model(cfg: ModelConfig, flat: dict[str, np.ndarray], attn: str):
    """The Hugging Face model with the same weights, in eval mode, EOS off."""
    model = hf_model(cfg, flat, attn).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = cfg.pad_id
    return model


def encoder_inputs(cfg: ModelConfig, batch: int, length: int, seed: int) -> np.ndarray:
    """Random ids below every special id (EOI, image), no padding."""
    high = min(cfg.vocab_size, cfg.eoi_token_id, cfg.image_token_id)
    return np.random.default_rng(seed).integers(3, high, size=(batch, length), dtype=np.int32)


def t5g2_generator(model: T5Gemma2, enc: np.ndarray):
    from t5g2.generate import generate

    def call(new_tokens: int) -> np.ndarray:
        return generate(model, enc, max_new_tokens=new_tokens, eos_id=NO_EOS).tokens
    return call


def reference_generator(model, enc: np.ndarray):
    import torch

    ids = torch.from_numpy(enc.astype(np.int64))
    mask = torch.ones_like(ids)

    def call(new_tokens: int) -> np.ndarray:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=0, do_sample=False)
        return out[:, 1:].numpy()  # after the decoder start (bos)
    return call


# --------------------------------------------------------------------------- decode

def median_time(call, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def decode_speed(call, batch: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    """Time to first token and decode tokens/s of a generator (warm: one untimed call of each
    length first)."""
    call(1), call(new_tokens)
    first, _ = median_time(lambda: call(1), repeats)
    whole, tokens = median_time(lambda: call(new_tokens), repeats)
    # None: the decode steps took less time than the timing noise; raise new_tokens.
    rate = round(batch * (new_tokens - 1) / (whole - first), 1) if whole > first else None
    return dict(time_to_first_token_s=round(first, 5), generate_s=round(whole, 5),
                decode_tokens_per_s=rate, tokens=tokens)


def bench_decode(cfg: ModelConfig, flat: dict[str, np.ndarray], batches: tuple[int, ...],
                 encoder_length: int, new_tokens: int, repeats: int, attn: tuple[str, ...],
                 seed: int) -> dict[str, Any]:
    import torch

    model = t5g2_model(cfg, flat)
    references = {impl: reference_model(cfg, flat, impl) for impl in attn}
    out = {}
    for batch in batches:
        enc = encoder_inputs(cfg, batch, encoder_length, seed + batch)
        ours = decode_speed(t5g2_generator(model, enc), batch, new_tokens, repeats)
        tokens = ours.pop("tokens")
        row: dict[str, Any] = dict(t5g2=ours)
        for impl, ref_model in references.items():
            ref = decode_speed(reference_generator(ref_model, enc), batch, new_tokens, repeats)
            ref_tokens = ref.pop("tokens")
            row[f"hf_{impl}"] = ref
            rates = ours["decode_tokens_per_s"], ref["decode_tokens_per_s"]
            row[f"ratio_t5g2_over_hf_{impl}"] = dict(
                decode_tokens_per_s=round(rates[0] / rates[1], 3) if all(rates) else None,
                time_to_first_token_hf_over_t5g2=round(ref["time_to_first_token_s"]
                                                       / ours["time_to_first_token_s"], 3))
            row[f"tokens_equal_hf_{impl}"] = bool(np.array_equal(tokens, ref_tokens))
        out[f"batch_{batch}"] = row
    out["torch_num_threads"] = torch.get_num_threads()
    return out


# --------------------------------------------------------------------------- prefill

def prefill_case(side: str, config: dict[str, Any], length: int, seed: int) -> dict[str, Any]:
    """One long request in this process: max_new_tokens=1 on an input of `length` tokens.
    side: "t5g2", "t5g2_local_only" (every encoder layer local: the part of the work that grows
    linearly) or an HF attn implementation ("hf_eager", "hf_sdpa")."""
    cfg = ModelConfig.from_config_dict(config)
    if side == "t5g2_local_only":
        cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(
            cfg.encoder, sliding_window_pattern=cfg.encoder.num_layers + 1))
    memory = PeakRSS()
    flat = random_params(cfg, seed)
    enc = encoder_inputs(cfg, 1, length, seed)
    if side.startswith("t5g2"):
        call = t5g2_generator(t5g2_model(cfg, flat), enc)
        start = time.perf_counter()
        call(1)  # compiles
        compile_and_run = time.perf_counter() - start
        result = dict(first_call_s=round(compile_and_run, 3))
    else:
        call = reference_generator(reference_model(cfg, flat, side.removeprefix("hf_")), enc)
        result = {}
    del flat
    memory.set_baseline()
    memory.reset_peak()
    start = time.perf_counter()
    token = call(1)
    result.update(prefill_s=round(time.perf_counter() - start, 3),
                  peak_rss_delta_mib=memory.peak_delta_mib(), first_token=int(token[0, 0]))
    return result


def encoder_flops(cfg: ModelConfig, length: int) -> dict[str, float]:
    """The encoder's forward FLOPs over one input of `length` tokens: projections and MLPs and
    local layers' attention grow linearly with it, global layers' attention quadratically."""
    from t5g2.model.flops import encoder_pairs, forward_flops

    enc = cfg.encoder
    parts = forward_flops(cfg, length, 0)
    global_attention = sum(4 * enc.num_heads * enc.head_dim * encoder_pairs(enc, length, i)
                           for i in range(enc.num_layers) if enc.is_global(i))
    return dict(matmuls=parts["encoder_matmuls"],
                local_attention=parts["encoder_attention"] - global_attention,
                global_attention=float(global_attention))


def run_prefill_case(side: str, cfg: ModelConfig, length: int, seed: int, timeout_s: float,
                     memory_limit_gib: float | None) -> dict[str, Any]:
    """`prefill_case` in a fresh Python process (under an address-space limit for the
    reference); an out-of-memory error, a kill or a timeout is the result, not a crash."""
    args = json.dumps(dict(side=side, config=cfg.to_dict(), length=length, seed=seed))
    limit = None if side.startswith("t5g2") or not memory_limit_gib \
        else int(memory_limit_gib * GIB)

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    code = ("import json, sys\nfrom benchmarks.generate import prefill_case\n"
            "a = json.loads(sys.argv[1])\n"
            "try:\n    r = prefill_case(a['side'], a['config'], a['length'], a['seed'])\n"
            "except (MemoryError, RuntimeError) as e:\n"
            "    r = dict(failed=type(e).__name__ + ': ' + str(e).splitlines()[0][:300])\n"
            "print(json.dumps(r))\n")
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True,
                              timeout=timeout_s, preexec_fn=limit_memory if limit else None,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired:
        return dict(failed=f"timed out after {timeout_s:g} s")
    wall = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        return dict(failed=f"exit status {proc.returncode}: {tail}", process_s=wall)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if limit:
        result["address_space_limit_gib"] = round(limit / GIB, 1)
    return dict(result, process_s=wall)


def available_memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def bench_prefill(cfg: ModelConfig, lengths: tuple[int, ...], sides: tuple[str, ...], seed: int,
                  timeout_s: float, memory_limit_gib: float | None,
                  isolate: bool = True) -> dict[str, Any]:
    """Per side and length: time and peak memory, or why it failed. A side that failed at one
    length is not run at longer ones. isolate=False runs every case in this process, without
    a memory limit (a quick test)."""
    out: dict[str, Any] = {}
    for side in sides:
        rows, failed_at = {}, None
        for length in lengths:
            if failed_at is not None:
                rows[str(length)] = dict(skipped=f"failed at {failed_at} tokens")
                continue
            if not isolate:
                rows[str(length)] = prefill_case(side, cfg.to_dict(), length, seed)
            else:
                rows[str(length)] = run_prefill_case(side, cfg, length, seed, timeout_s,
                                                     memory_limit_gib)
            print(f"prefill {side} {length}: {rows[str(length)]}", file=sys.stderr, flush=True)
            if "failed" in rows[str(length)]:
                failed_at = length
        out[side] = rows
    out["encoder_forward_flops"] = {str(n): encoder_flops(cfg, n) for n in lengths}
    out["growth_per_doubling"] = {side: growth(lengths, [out[side][str(n)] for n in lengths])
                                  for side in sides}
    return out


def growth(lengths: tuple[int, ...], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Time and peak-memory ratios between successive lengths, where both ran."""
    return [dict(tokens=f"{a}->{b}", time=round(rb["prefill_s"] / ra["prefill_s"], 2),
                 memory=round(rb["peak_rss_delta_mib"] / max(ra["peak_rss_delta_mib"], 1e-3), 2))
            for a, b, ra, rb in zip(lengths, lengths[1:], rows, rows[1:])
            if "prefill_s" in ra and "prefill_s" in rb]


# --------------------------------------------------------------------------- the benchmark

def run(config: ml_collections.ConfigDict, *, batches=(1, 8), encoder_length: int = 128,
        new_tokens: int = 32, repeats: int = 5, attn=("sdpa", "eager"),
        prefill_lengths=PREFILL_LENGTHS, prefill_sides=None, query_chunk: int = 1024,
        timeout_s: float = 1200, memory_limit_gib: float | None = None, seed: int = 0,
        isolate: bool = True) -> dict[str, Any]:
    """The whole benchmark as one JSON-able dict; no batches: no decode part, no lengths: no
    prefill part. prefill_sides default: t5g2, t5g2_local_only and hf_<attn> for each attn."""
    if new_tokens < 2 or repeats < 1:
        raise ValueError(f"new_tokens={new_tokens} must be >= 2 and repeats={repeats} >= 1")
    cfg = dataclasses.replace(model_config(config), attention_query_chunk=query_chunk)
    cfg.validate()
    if memory_limit_gib is None and available_memory_gib():
        memory_limit_gib = round(available_memory_gib() - 1, 1)
    out: dict[str, Any] = dict(
        config=config.get("name", "?"), model=summary(cfg), environment=environment(),
        decode=dict(batches=list(batches), encoder_length=encoder_length, new_tokens=new_tokens,
                    repeats=repeats, sampling="greedy, EOS off"),
        prefill=dict(lengths=list(prefill_lengths), query_chunk=query_chunk,
                     peak_rss=("VmHWM reset just before the timed call, minus VmRSS then (the "
                               "model built; t5g2: also compiled)"),
                     reference_memory_limit_gib=memory_limit_gib, timeout_s=timeout_s))
    out["environment"].update(machine.package_versions(("torch", "transformers")))
    if batches:
        out["decode"].update(bench_decode(cfg, random_params(cfg, seed), tuple(batches),
                                          encoder_length, new_tokens, repeats, tuple(attn), seed))
    if prefill_lengths:
        sides = prefill_sides or ("t5g2", "t5g2_local_only", *(f"hf_{a}" for a in attn))
        out["prefill"].update(bench_prefill(cfg, tuple(prefill_lengths), tuple(sides), seed,
                                            timeout_s, memory_limit_gib, isolate))
    out["environment"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    return out


def main(argv=None) -> None:
    from absl import flags

    def define():
        flags.DEFINE_list("batches", ["1", "8"], "decode batch sizes ('' for no decode part)")
        flags.DEFINE_integer("encoder_length", 128, "decode part: encoder tokens per row")
        flags.DEFINE_integer("new_tokens", 32, "decode part: tokens generated per row")
        flags.DEFINE_integer("repeats", 5, "timed calls per measurement (median)")
        flags.DEFINE_list("attn", ["sdpa", "eager"], "HF attn_implementation(s)")
        flags.DEFINE_list("prefill_lengths", [str(n) for n in PREFILL_LENGTHS],
                          "prefill part: input lengths ('' for none)")
        flags.DEFINE_list("prefill_sides", None, "prefill part: of t5g2, t5g2_local_only, "
                          "hf_sdpa, hf_eager (default: both t5g2 and hf_<attn>)")
        flags.DEFINE_integer("query_chunk", 1024, "t5g2's encoder attention query chunk")
        flags.DEFINE_float("timeout_s", 1200, "prefill part: seconds per (side, length)")
        flags.DEFINE_float("memory_limit_gib", None, "the reference's address-space limit "
                           "(default: available memory less 1 GiB)")

    def bench(config, f):
        return run(config, batches=tuple(int(b) for b in f.batches),
                   encoder_length=f.encoder_length, new_tokens=f.new_tokens, repeats=f.repeats,
                   attn=tuple(f.attn), prefill_lengths=tuple(int(n) for n in f.prefill_lengths),
                   prefill_sides=tuple(f.prefill_sides) if f.prefill_sides else None,
                   query_chunk=f.query_chunk, timeout_s=f.timeout_s,
                   memory_limit_gib=f.memory_limit_gib)

    machine.config_main(argv, define, bench)


if __name__ == "__main__":
    main()
