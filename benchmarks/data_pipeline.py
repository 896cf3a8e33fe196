"""UL2 input-pipeline throughput: t5g2's grain pipeline against the same span corruption run
through seqio / TensorFlow, on the same text, vocabulary, mixture and lengths, in one run. Prints
one JSON object. From the repository root:

    python -m benchmarks.data_pipeline                      # 16384 / 16384, batch 4
    python -m benchmarks.data_pipeline --workers 2 --encoder_length 2048 --decoder_length 2048

What is measured, per side, after the vocabulary is trained and the corpus generated (not timed)
and after `--warmup` batches (the first batch's latency is reported on its own):
* `--batches` batches of `--batch` rows, wall time and CPU time (this process + its worker
  children, `resource.getrusage`, so TensorFlow's and grain's threads and processes count), in
  two windows: `whole_run` from the source's creation (set-up, graph building and prefetching
  included: the fair comparison) and `steady` after the warm-up (inflated for a pipeline that
  prefetched ahead in the meantime, as tf.data does);
* examples/s (segments of both sides), output positions/s, real tokens/s (encoder + decoder
  positions holding a token, i.e. not padding), fill fractions, raw text tokens/s (t5g2 only:
  the pipeline counts what it consumed);
* real tokens per CPU-second: the per-core rate, fair across the two sides whatever threads
  each uses; `cores_needed` = `--consumer_tokens_per_s` / that rate (default 300K: a TPU v5p host
  at 50% MFU on the 270M-270M model consumes about that many tokens/s), assuming the pipeline
  scales linearly with worker processes, which a 2-core machine cannot verify.
The seqio side: `t5g2.data.seqio_tasks.register_ul2_tasks` over the same corpus written one
document per line, read by `SeqioSource` (seqio.get_dataset + EncDecFeatureConverter(pack=True)).
Both sides call the same numpy denoiser; the pipelines around it differ (tf.data vs grain).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from typing import Any, Callable, Iterator

import numpy as np

from t5g2.data.denoisers import mixture_from_config
from t5g2.data.pipeline import PipelineConfig, Ul2Source, open_vocabulary
from t5g2.data.sources import open_documents


def cpu_seconds() -> float:
    """CPU time of this process and its terminated or waited-for children, all threads."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(batches: Iterator[dict[str, np.ndarray]], warmup: int, count: int,
            consumed: Callable[[], dict[str, int]] | None = None,
            started: tuple[float, float] | None = None) -> dict[str, Any]:
    """Times `count` batches after `warmup`. Two windows: `steady` (after the warm-up; inflated
    when the pipeline had prefetched ahead) and `whole_run` (from `started` = (wall, cpu) at the
    source's creation, every batch including the first: set-up and prefetching included)."""
    wall_start, cpu_start = started or (time.perf_counter(), cpu_seconds())
    first = _count(next(batches))
    first_batch_s = time.perf_counter() - wall_start
    totals = [first] + [_count(next(batches)) for _ in range(warmup)]
    before = consumed() if consumed else None
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    steady = [_count(next(batches)) for _ in range(count)]
    wall, cpu_s = time.perf_counter() - wall0, cpu_seconds() - cpu0
    result = dict(first_batch_s=round(first_batch_s, 3), batches=count,
                  steady=_rates(steady, wall, cpu_s),
                  whole_run=_rates(totals + steady, time.perf_counter() - wall_start,
                                   cpu_seconds() - cpu_start))
    if consumed:
        after = consumed()
        result["steady"]["raw_text_tokens_per_s"] = round((after["tokens"] - before["tokens"]) / wall)
        result["steady"]["documents_per_s"] = round(
            (after["documents"] - before["documents"]) / wall, 2)
    return result


def _count(batch: dict[str, np.ndarray]) -> np.ndarray:
    """(examples, encoder real, decoder real, encoder positions, decoder positions)."""
    enc, dec = batch["encoder_segment_ids"], batch["decoder_segment_ids"]
    examples = sum(len(np.unique(row[row > 0])) for row in dec)
    return np.array([examples, (enc > 0).sum(), (dec > 0).sum(), enc.size, dec.size], np.int64)


def _rates(counts: list[np.ndarray], wall: float, cpu_s: float) -> dict[str, Any]:
    examples, enc_real, dec_real, enc_pos, dec_pos = (int(x) for x in np.sum(counts, axis=0))
    real = enc_real + dec_real
    return dict(batches=len(counts), wall_s=round(wall, 3), cpu_s=round(cpu_s, 3),
                cpu_cores_busy=round(cpu_s / wall, 2),
                examples_per_s=round(examples / wall, 2),
                real_tokens_per_s=round(real / wall),
                positions_per_s=round((enc_pos + dec_pos) / wall),
                real_tokens_per_cpu_s=round(real / cpu_s) if cpu_s > 0 else None,
                encoder_fill=round(enc_real / enc_pos, 4),
                decoder_fill=round(dec_real / dec_pos, 4))


def bench_t5g2(cfg: PipelineConfig, documents, vocab, mixture, warmup: int,
               count: int) -> dict[str, Any]:
    started = (time.perf_counter(), cpu_seconds())
    source = Ul2Source(cfg, documents=documents, vocab=vocab, mixture=mixture,
                       process_index=0, process_count=1)
    try:
        return measure(source, warmup, count, consumed=source.consumed, started=started)
    finally:
        source.close()


def bench_seqio(cfg: PipelineConfig, documents, vocab, mixture, warmup: int,
                count: int) -> dict[str, Any]:
    from t5g2.data.seqio_tasks import SeqioSource, register_ul2_tasks  # imports TensorFlow

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "corpus.txt")
        with open(path, "w", encoding="utf-8") as f:  # one document per line, as seqio reads
            for doc in documents:
                f.write(" ".join(doc.split()) + "\n")
        started = (time.perf_counter(), cpu_seconds())
        name = register_ul2_tasks("bench_ul2", vocab=vocab, text_source=path, mixture=mixture,
                                  inputs_length=cfg.encoder_length,
                                  targets_length=cfg.decoder_length, seed=cfg.seed)
        with SeqioSource(name, inputs_length=cfg.encoder_length,
                         targets_length=cfg.decoder_length, batch_size=cfg.batch_size,
                         seed=cfg.seed) as source:
            return measure(iter(source), warmup, count, started=started)


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("grain", "seqio", "tensorflow", "sentencepiece", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder_length", type=int, default=16_384)
    parser.add_argument("--decoder_length", type=int, default=16_384)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="grain tokenizing processes")
    parser.add_argument("--read_threads", type=int, default=0)
    parser.add_argument("--mixture", default="t5gemma2")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--consumer_tokens_per_s", type=float, default=300_000.0)
    parser.add_argument("--skip_seqio", action="store_true")
    parser.add_argument("--cache_dir", default=None)
    args = parser.parse_args(argv)

    load_start = os.getloadavg()[0]
    cfg = PipelineConfig(encoder_length=args.encoder_length, decoder_length=args.decoder_length,
                         batch_size=args.batch, seed=args.seed, mixture=args.mixture,
                         vocab_size=args.vocab_size, num_workers=args.workers,
                         read_threads=args.read_threads, cache_dir=args.cache_dir)
    cfg.validate()
    mixture = mixture_from_config(cfg.mixture)
    documents = open_documents("embedded", cache_dir=cfg.cache_dir)
    vocab = open_vocabulary(cfg, mixture)  # trained / loaded here, outside the timings

    result: dict[str, Any] = dict(
        encoder_length=cfg.encoder_length, decoder_length=cfg.decoder_length, batch=cfg.batch_size,
        mixture=cfg.mixture, vocab_size=vocab.size, sentinels=int(len(vocab.sentinel_ids)),
        corpus=dict(documents=len(documents)), grain_workers=cfg.num_workers,
        read_threads=cfg.read_threads)
    result["t5g2_grain"] = bench_t5g2(cfg, documents, vocab, mixture, args.warmup, args.batches)
    if not args.skip_seqio:
        result["seqio_tensorflow"] = bench_seqio(cfg, documents, vocab, mixture, args.warmup,
                                                 args.batches)
        result["ratios_t5g2_over_seqio"] = {
            window: {key: round(result["t5g2_grain"][window][key]
                                / result["seqio_tensorflow"][window][key], 3)
                     for key in ("examples_per_s", "real_tokens_per_s", "real_tokens_per_cpu_s")}
            for window in ("whole_run", "steady")}
    per_core = result["t5g2_grain"]["steady"]["real_tokens_per_cpu_s"]
    result["consumer_tokens_per_s"] = args.consumer_tokens_per_s
    result["cores_needed"] = round(args.consumer_tokens_per_s / per_core, 2)
    result["notes"] = (
        "whole_run: from the source's creation to the last batch (set-up, graph building and "
        "prefetching included) -- the fair comparison; steady: after the warm-up batches, "
        "inflated for a pipeline that prefetched ahead meanwhile (tf.data does). Per-CPU-second "
        "rates count every thread and child process of each side; wall rates depend on how "
        "many cores each side used. cores_needed = consumer rate / t5g2's steady real tokens "
        "per CPU-second, assuming linear scaling over grain worker processes.")
    result["environment"] = dict(cpu_count=os.cpu_count(), platform=platform.platform(),
                                 python=platform.python_version(), load_average_start=load_start,
                                 load_average_end=os.getloadavg()[0], **versions())
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
