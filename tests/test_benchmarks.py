"""benchmarks.train_step end to end at a trivial size: both sides run, the JSON has its keys, and
the same weights and batch give the same first-step loss in t5g2 and the reference."""

import json
import os

import pytest

from configs import tiny
from benchmarks import train_step
from t5g2.model.flops import train_flops

STEP_KEYS = {"step_s_median", "tokens_per_s", "target_tokens_per_s", "model_flops_per_s",
             "dense_flops_per_s", "mfu", "mfu_dense", "first_step_loss", "peak_rss_delta_mib",
             "peak_rss_method", "matmul_peak_flops_per_s"}


def test_train_step_benchmark_runs_and_reports():
    config = tiny.get_config()
    config.model.encoder.num_layers = 2
    config.model.decoder.num_layers = 2
    config.model.dtype = "bfloat16"  # forced to float32 by the benchmark
    out = train_step.run(config, batch=2, encoder_length=16, decoder_length=8, steps=1,
                         warmup=1, peak_size=64, attn_implementations=("sdpa",),
                         isolate=False)
    json.dumps(out)  # JSON-able as printed
    assert out["model"]["dtype"] == "float32" and out["dtype_forced_to_float32"]
    assert out["model"]["encoder"]["num_layers"] == 2
    assert out["tokens_per_step"] == 2 * (16 + 8)
    assert 0 < out["model_flops_per_step"] <= out["dense_flops_per_step"]
    # The batch's real tokens, as the training loop counts: its rows are full, so 2 examples.
    cfg = train_step.model_config(config)
    assert out["model_flops_per_step"] == 2 * train_flops(cfg, 16, 8)
    assert out["dense_flops_per_step"] == 2 * train_flops(cfg, 16, 8, useful_only=False)
    assert {"jax_flops_per_s", "torch_flops_per_s", "size"} <= set(out["matmul_peak"])
    assert STEP_KEYS | {"compile_s", "xla_buffers_mib"} <= set(out["t5g2"])
    assert STEP_KEYS <= set(out["hf"]["sdpa"])
    comparison = out["comparison"]["sdpa"]
    assert comparison["tokens_per_s_ratio_t5g2_over_hf"] > 0
    assert comparison["first_step_losses_agree"], comparison


@pytest.mark.slow  # the benchmark itself runs by default in test_train_step_benchmark_...
def test_separate_cross_attention_skips_the_reference():
    config = tiny.get_config()
    config.model.encoder.num_layers = 1
    config.model.decoder.num_layers = 1
    config.model.cross_attention = "separate"
    out = train_step.run(config, batch=1, encoder_length=8, decoder_length=4, steps=1, warmup=0,
                         peak_size=64, isolate=False)
    assert "skipped" in out["hf"] and "comparison" not in out
    assert out["t5g2"]["tokens_per_s"] > 0


def test_data_pipeline_benchmark_reports_both_pipelines(capsys, cache_dir):
    """benchmarks.data_pipeline at a trivial size: both sides give positive rates, the raw text
    tokens counted from t5g2's batches are its pipeline's own count, cores_needed is finite; and
    the CPU clock counts child processes that are still running (grain's workers)."""
    import math
    import subprocess
    import sys

    from benchmarks import data_pipeline

    burn = ("import sys, time\nend = time.process_time() + 0.3\n"
            "while time.process_time() < end: pass\nprint(flush=True)\nsys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        before = data_pipeline.cpu_seconds()
        child.stdout.readline()  # the child has burnt its 0.3 s and is still alive
        assert data_pipeline.cpu_seconds()["children"] - before["children"] >= 0.25
    finally:
        child.communicate("")

    result = data_pipeline.main(["--encoder_length", "64", "--decoder_length", "64", "--batch",
                                 "2", "--batches", "2", "--warmup", "1", "--vocab_size", "512",
                                 "--cache_dir", cache_dir])
    assert json.loads(capsys.readouterr().out) == result  # one JSON object on stdout
    for side in ("t5g2_grain", "seqio_tensorflow", "t5_span_corruption_tf"):
        assert result[side]["first_batch_s"] > 0
        for window in ("steady", "whole_run"):
            rates = result[side][window]
            for key in ("batches_per_s", "examples_per_s", "positions_per_s",
                        "real_tokens_per_s", "raw_text_tokens_per_s", "real_tokens_per_cpu_s"):
                assert rates[key] > 0, (side, window, key)
            assert 0 < rates["encoder_fill"] <= 1 and 0 < rates["decoder_fill"] <= 1
    steady = result["t5g2_grain"]["steady"]
    assert steady["raw_text_tokens_per_s"] == steady["consumed_raw_tokens_per_s"]
    assert 0 < result["cores_needed"] < math.inf
    assert result["cores_needed"] == round(300_000 / steady["real_tokens_per_cpu_s"], 2)
    assert set(result["ratios_t5g2_over_seqio"]) == {"whole_run", "steady"}
    assert set(result["ratios_t5g2_over_t5_span_corruption"]) == {"whole_run", "steady"}
    # T5's arithmetic sizes the chunk so its corrupted inputs (EOS included) fill the encoder
    assert result["t5_span_corruption_tf"]["steady"]["encoder_fill"] == 1.0
    assert result["seqio_packing"]["examples_before_first_batch"] == 64
    assert result["environment"]["cpu_count"] >= 1
    assert set(result["environment"]["versions"]) >= {"grain", "seqio", "tensorflow",
                                                      "sentencepiece"}


def test_t5_span_corruption_baseline_follows_t5s_arithmetic():
    """The TF-op span corruption of the T5 baseline on known tokens: T5's counts (round(L*.15)
    noise tokens clamped to [1, L-1] in round(noise/3) spans, non-noise first), sentinels in
    order, EOS last, and inputs + targets put back together give the chunk back."""
    import numpy as np
    import seqio
    import tensorflow as tf

    from benchmarks import data_pipeline

    sentinel_ids = np.arange(999, 949, -1, dtype=np.int32)
    corrupt = data_pipeline.t5_span_corruption_map(sentinel_ids=sentinel_ids, eos_id=1)
    for length in (2, 5, 37, 100, 571):
        chunk = np.arange(100, 100 + length, dtype=np.int32)
        with seqio.utils.map_seed_manager(length):
            ds = corrupt(tf.data.Dataset.from_tensors({"targets": chunk}).repeat(3))
        examples = list(ds.as_numpy_iterator())
        noise = min(max(round(length * 0.15), 1), length - 1)
        spans = max(round(noise / 3), 1)
        for example in examples:
            inputs, targets = example["inputs"].tolist(), example["targets"].tolist()
            assert inputs[-1] == targets[-1] == 1
            inputs, targets = inputs[:-1], targets[:-1]
            in_sentinels = [t for t in inputs if t in sentinel_ids]
            assert in_sentinels == sentinel_ids[:spans].tolist()
            assert len(inputs) == length - noise + spans
            assert inputs[0] == chunk[0] and targets[0] == sentinel_ids[0]  # non-noise first
            noise_spans, current = {}, None
            for t in targets:
                if t in sentinel_ids:
                    current = int(np.flatnonzero(sentinel_ids == t)[0])
                    noise_spans[current] = []
                else:
                    noise_spans[current].append(t)
            assert sum(map(len, noise_spans.values())) == noise
            rebuilt = []
            for t in inputs:
                rebuilt += noise_spans[int(np.flatnonzero(sentinel_ids == t)[0])] \
                    if t in sentinel_ids else [t]
            assert rebuilt == chunk.tolist()
        if length > 30:  # each example gets its own noise
            assert len({tuple(e["inputs"]) for e in examples}) == 3


def test_data_pipeline_index_benchmark_reports_cold_and_warm(capsys, cache_dir, tmp_path):
    """`--index` at a trivial size: every run opens the same documents, the warm ones from the
    cache (one index per shard), and the generated corpus is deleted."""
    from benchmarks import data_pipeline

    result = data_pipeline.main(["--index", "--index_corpus_mb", "1", "--index_shards", "2",
                                 "--index_tmp", str(tmp_path), "--encoder_length", "64",
                                 "--decoder_length", "64", "--batch", "2", "--vocab_size",
                                 "512", "--cache_dir", cache_dir])
    assert json.loads(capsys.readouterr().out) == result
    runs = ("cold_one_process", "cold_parallel", "warm", "warm_again")
    assert {result[r]["documents"] for r in runs} == {result["corpus"]["documents"]}
    assert result["corpus"]["bytes"] >= 2**20 and result["corpus"]["shards"] == 2
    assert all(result[r]["first_batch_s"] >= result[r]["open_documents_s"] > 0 for r in runs)
    assert result["warm"]["index_cached"] and result["index"]["files"] == 2
    assert result["corpus_deleted"] and os.listdir(tmp_path) == []


def test_checkpoint_benchmark_reports_both_sides(tmp_path):
    """benchmarks.checkpoint on the tiny config, one round: both sides save and restore bit for
    bit, the JSON has its keys, and the bytes on disk are positive."""
    from benchmarks import checkpoint

    out = checkpoint.run(tiny.get_config(), repeats=1, warmup=0, directory=str(tmp_path),
                         isolate=False)
    json.dumps(out)  # JSON-able as printed
    assert out["model"]["dtype"] == "float32" and out["repeats"] == 1
    assert {"load_average_1min", "load_average_1min_at_end"} <= set(out["environment"])
    t5g2, torch = out["t5g2"], out["torch"]
    assert {"save_blocking_s_median", "durable_s_median", "restore_s_median", "bytes_on_disk",
            "array_bytes", "restored_bitwise_equal"} <= set(t5g2)
    assert {"save_s_median", "load_s_median", "bytes_on_disk", "array_bytes",
            "restored_bitwise_equal"} <= set(torch)
    assert t5g2["restored_bitwise_equal"] is True and torch["restored_bitwise_equal"] is True
    assert t5g2["bytes_on_disk"] > 0 and torch["bytes_on_disk"] > 0
    assert t5g2["parameters"] == torch["trained_parameters"] == out["model"]["parameters"]
    assert 0 < t5g2["save_blocking_s_median"] <= t5g2["durable_s_median"]
    assert set(out["ratios"]) >= {"torch_save_over_t5g2_blocking", "torch_save_over_t5g2_durable",
                                  "torch_load_over_t5g2_restore"}
    assert all(r > 0 for r in out["ratios"].values())
    assert os.listdir(tmp_path) == []  # every round's directory removed


def test_generate_benchmark_reports_both_sides_and_equal_tokens():
    """benchmarks.generate at a trivial size: decode rates and prefill figures on both sides,
    greedy tokens equal to Hugging Face generate's, the FLOPs split adding up."""
    from benchmarks import generate as bench
    from t5g2.model.flops import forward_flops

    config = tiny.get_config()
    for side in (config.model.encoder, config.model.decoder):  # a local and a global layer
        side.update(num_layers=2, sliding_window_pattern=2)
    out = bench.run(config, batches=(2,), encoder_length=12, new_tokens=4, repeats=1,
                    attn=("sdpa",), prefill_lengths=(32, 64), prefill_sides=("t5g2", "hf_sdpa"),
                    query_chunk=16, isolate=False)
    json.dumps(out)
    assert out["model"]["attention_query_chunk"] == 16
    for batch in ("batch_2",):
        row = out["decode"][batch]
        assert row["tokens_equal_hf_sdpa"], row
        for side in ("t5g2", "hf_sdpa"):
            assert row[side]["time_to_first_token_s"] > 0
    prefill = out["prefill"]
    for side in ("t5g2", "hf_sdpa"):
        for n in ("32", "64"):
            assert prefill[side][n]["prefill_s"] > 0 and "failed" not in prefill[side][n]
    # the same weights and input: the same first token
    assert prefill["t5g2"]["64"]["first_token"] == prefill["hf_sdpa"]["64"]["first_token"]
    split = prefill["encoder_forward_flops"]["64"]
    parts = forward_flops(bench.model_config(config), 64, 0)
    assert split["matmuls"] == parts["encoder_matmuls"]
    assert split["local_attention"] + split["global_attention"] == parts["encoder_attention"]
    assert split["global_attention"] == 4 * 4 * 16 * 64 * 64  # 4 heads of 16, all pairs
    assert [len(prefill["growth_per_doubling"][side]) for side in ("t5g2", "hf_sdpa")] == [1, 1]


def test_vision_benchmark_reports_both_sides_and_their_agreement(capsys):
    """benchmarks.vision at the tiny tower: both sides timed per image, the same image tokens
    from the same weights, and the tower + projector's parameters counted from their shapes."""
    from benchmarks import vision

    result = vision.main(["--image_size", "56", "--d_model", "32", "--ffn_dim", "64",
                          "--num_layers", "2", "--num_heads", "2", "--tokens_per_image", "4",
                          "--text_width", "64", "--batch", "2", "--repeats", "1",
                          "--dtypes", "float32,bfloat16", "--attn", "sdpa"])
    assert json.loads(capsys.readouterr().out) == result  # one JSON object on stdout
    assert result["vision"]["num_layers"] == 2 and result["batch"] == 2
    for dtype in ("float32", "bfloat16"):
        row = result[dtype]
        for side in ("t5g2", "hf_sdpa"):
            assert row[side]["ms_per_image"] > 0 and len(row[side]["times_s"]) == 1
        assert row["hf_sdpa"]["attn_implementation"] == "sdpa"
        assert row["hf_sdpa_ms_per_image_over_t5g2"] > 0
        # patch embedding + positions, 2 layers (q, k, v, o and the MLP with biases, two
        # LayerNorms), the final LayerNorm; the projector's norm and 32 x 64 projection
        layer = 4 * (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32) + 2 * 64
        assert row["vision_parameters"] == \
            14 * 14 * 3 * 32 + 32 + 16 * 32 + 2 * layer + 64 + 32 + 32 * 64
    assert result["float32"]["max_abs_image_token"] > 0.5
    assert result["float32"]["max_abs_diff_hf_sdpa"] <= 1e-4
    assert result["bfloat16"]["max_abs_diff_hf_sdpa"] <= 0.05 * result["bfloat16"][
        "max_abs_image_token"]


def test_accelerator_benchmarks_report_and_tabulate(capsys):
    """benchmarks.attention (xla, and cudnn's unsupported cases, at a trivial length),
    benchmarks.train_step_accel (tiny model) and the table gpu.sh prints from their JSON."""
    from benchmarks import attention, gpu_table, train_step_accel

    assert attention.default_impls("cpu", interpret=False) == ("xla",)
    assert set(attention.default_impls("cpu", interpret=True)) == {"xla", "splash", "cudnn",
                                                                    "gpu_flash"}
    result = attention.main(["--impls=xla,cudnn", "--cases=encoder_local,merged_global",
                             "--lengths=40", "--warmup=0", "--repeats=2",
                             "--query_chunk=16"])
    assert json.loads(capsys.readouterr().out) == result  # one JSON object on stdout
    assert result["shapes"] == dict(num_heads=4, num_kv_heads=1, head_dim=256,
                                    sliding_window=512, scale=256**-0.5)  # the 270M's
    assert result["dtype"] == "float32" and result["interpreted"] == ["cudnn"]
    rows = result["implementations"]
    assert [(r["case"], r["length"]) for r in rows["xla"]] == [("encoder_local", 40),
                                                                ("merged_global", 40)]
    for row in rows["xla"]:
        assert row["status"] == "ok", row
        for timing in (row["forward"], row["forward_backward"]):
            assert 0 < timing["min_s"] <= timing["median_s"]
        planned = row["memory"]["forward_backward_compiled"]
        assert planned["temp_plus_output_bytes"] == planned["temp_bytes"] + planned["output_bytes"]
        parts = 2 if row["case"].startswith("merged") else 1
        gradients = 4 * row["length"] * 256 * (4 + 2 * parts)  # float32 dq; dk, dv per part
        assert gradients <= planned["output_bytes"] < gradients + 1024
        assert row["memory"]["device_peak_bytes_in_use"] is None  # CPU: no memory_stats
    # cuDNN takes neither a two-sided window nor merged attention: reported, not timed
    assert {r["status"] for r in rows["cudnn"]} == {"unsupported"}
    assert all(r["reason"] and "forward" not in r for r in rows["cudnn"])

    config = tiny.get_config()
    config.model.encoder.num_layers = 1
    config.model.decoder.num_layers = 1
    step = train_step_accel.run(config, batch=1, encoder_length=16, decoder_length=8, steps=1,
                                warmup=0, peak_tflops=0.5)
    json.dumps(step)
    cfg = train_step.model_config(config, keep_dtype=True)
    assert step["attention_impl"] == "xla" and step["model"]["dtype"] == "float32"
    assert step["model_flops_per_step"] == train_flops(cfg, 16, 8)
    assert step["tokens_per_s"] == pytest.approx(24 / step["step_s_median"], rel=1e-3)
    assert step["peak_flops_per_s"] == 0.5e12 and step["peak_origin"] == "config"
    assert step["mfu"] == round(step["model_flops_per_s"] / 0.5e12, 4)
    assert step["device_peak_memory_gib"] is None and step["xla_buffers_mib"]["total"] > 0

    table = gpu_table.tables([result, step])
    lines = table.splitlines()
    assert "| merged_global | 40 | cudnn |  |  |  |  | unsupported: cudnn takes one" in table
    assert sum(line.startswith("| encoder_local | 40 | xla | ") for line in lines) == 1
    assert any(line.startswith("| xla | 16/8 | ") for line in lines)
