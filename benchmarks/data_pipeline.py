"""UL2 input-pipeline throughput: t5g2's grain pipeline against two baselines, on the same text,
vocabulary and lengths, in one process; or (`--index`) the first-batch time on a generated
~1 GB JSONL corpus with the document index cold and cached. Prints one JSON object (and `main`
returns it). From the repository root:

    nice -n -15 python -m benchmarks.data_pipeline               # 16384 / 16384, batch 4
    nice -n -15 python -m benchmarks.data_pipeline --workers 2 --batches 10
    python -m benchmarks.data_pipeline --skip_seqio --encoder_length 2048 --decoder_length 2048
    python -m benchmarks.data_pipeline --index                   # 1 GiB in /tmp, deleted after

The sides:
* t5g2: `Ul2Source` (grain: documents -> sentencepiece -> `DenoisedChunks` -> first-fit packing
  -> batches) over the embedded corpus, with `--workers` tokenizing processes and
  `--read_threads`;
* seqio: `register_ul2_tasks` over the same corpus written to a text file, one document per line
  (its line breaks replaced by spaces, the only change to the text), read through
  `seqio.get_dataset` with tf.data's own thread pools.
Both call the same numpy `denoise` (seqio through `tf.numpy_function`) with the same vocabulary
ids; the machinery around it differs.
* t5_span_corruption_tf: the baseline T5 users know, T5's `span_corruption` (noise density 0.15,
  mean span 3, no mode token) in TF ops, after the same reading, tokenizing and chunking as the
  seqio side (`t5_span_corruption_map`; the `t5` package itself is not installed: its
  requirements replace the pinned seqio and tensorflow-datasets). One denoiser rather than the
  mixture: compare its per-CPU-second rates, which tokenizing dominates.

How seqio is read. `SeqioSource` (`--seqio_pack`) packs with seqio's `trim_and_pack_dataset`,
which pads max(encoder_length, decoder_length) examples into one batch and packs them in a
tf.while_loop: at 16384 no batch comes before 16384 examples are denoised (and a [16384, 32768]
int32 padded batch, 2 GiB, is built), then thousands of packed rows come at no cost. A
20-batch window cannot measure that, so by default the seqio side is read unpacked
(`EncDecFeatureConverter(pack=False)`, one example per row: same tasks, same examples), which at
equal lengths loses nothing, since t5g2's packer puts one example per row there too (see
`examples_per_row`); `seqio_packing` in the output gives SeqioSource's first-batch cost as an
estimate. seqio also shuffles examples through a 1000-example buffer per task by default (t5x's
setting: five tasks, 5000 examples denoised before the first batch); that changes when the work
is done, not how much each batch costs, so it is off unless `--seqio_shuffle`. t5g2 shuffles
documents by index, which costs nothing per batch.

Not timed: corpus generation, vocabulary training, writing seqio's text file, importing
TensorFlow/seqio (`import_s`, 0 when already imported). Then, per side:
* `first_batch_s`: from creating the source (seqio: registering the tasks) to the first batch;
* `--warmup` more batches, then `--batches` timed batches: the `steady` window, the headline
  figures. `whole_run` counts every batch from the source's creation (set-up included).
Per window: wall time; batches/s; examples/s (decoder segments); output positions/s (encoder +
decoder, padding included); real tokens/s (positions holding a token); fill fractions; raw text
tokens/s (the text tokens the examples were made from, counted from the batches: real tokens
minus sentinels, mode tokens and the two EOS `denoise` appends; for t5g2 also
`Ul2Source.consumed()`'s counters, as a cross-check); CPU seconds, real tokens and raw text
tokens per CPU-second (the last compares sides whose denoisers differ: text consumed per CPU).
CPU time = this process (`time.process_time()`: every thread, so tf.data's and grain's threads
count) + children already waited for (`os.times()`) + descendants still alive (utime + stime +
cutime + cstime from /proc/<pid>/stat: grain's worker processes; `getrusage(RUSAGE_CHILDREN)`
alone would miss them, since they run until the source is closed). Counting a batch (a few
vectorised numpy reductions) is in both sides' figures.

`cores_needed` = `--consumer_tokens_per_s` (default 300K: a TPU v5p host at 50% MFU on the
270M-270M model consumes on the order of that) / t5g2's steady real tokens per CPU-second,
assuming the pipeline scales linearly over worker processes (a 2-core machine cannot check
that). If the consumer's rate counts padded positions, `cores_needed_if_consumer_counts_positions`
divides by positions per CPU-second instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

import numpy as np

from benchmarks import machine
from t5g2.data.denoisers import Mixture, mixture_from_config
from t5g2.data.pipeline import PipelineConfig, Ul2Source, open_vocabulary
from t5g2.data.sources import open_documents
from t5g2.data.vocab import Vocabulary

DEFAULT_CONSUMER_TOKENS_PER_S = 300_000.0


# --------------------------------------------------------------------------- CPU time

def _live_descendants_cpu_s(root: int) -> float:
    """utime + stime + cutime + cstime of every live descendant of `root` (Linux /proc; 0
    elsewhere). A child's reaped children are in its cutime/cstime, so the sum stays whole."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return 0.0
    parent, ticks = {}, {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:  # exited meanwhile
            continue
        fields = data[data.rindex(b")") + 2:].split()  # fields[0] is field 3 (state)
        pid = int(name)
        parent[pid] = int(fields[1])
        ticks[pid] = sum(int(x) for x in fields[11:15])  # fields 14-17
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        total += ticks[pid]
        todo.extend(children.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> dict[str, float]:
    """CPU seconds so far: this process (all threads) and its children (reaped or alive)."""
    times = os.times()
    own = time.process_time()
    children = (times.children_user + times.children_system
                + _live_descendants_cpu_s(os.getpid()))
    return dict(own=own, children=children, total=own + children)


# --------------------------------------------------------------------------- counting

COUNT_FIELDS = ("batches", "rows", "examples", "encoder_real", "decoder_real",
                "encoder_positions", "decoder_positions", "raw_text_tokens")


class BatchCounter:
    """Per-batch counts (COUNT_FIELDS) from the batch contract.

    Raw text tokens of an example = its real tokens - its sentinels - its mode token - the EOS
    `denoise` appends to the inputs and to the targets (EOS inside the raw text, the document
    separators, are raw tokens and stay counted).
    """

    def __init__(self, vocab: Vocabulary, mixture: Mixture):
        self.sentinels = np.asarray(vocab.sentinel_ids, np.int32)
        self.modes = np.asarray(sorted({vocab.mode_id(d.mode_token) for d in mixture.denoisers
                                        if d.mode_token is not None}), np.int32)

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        enc, dec = batch["encoder_input_tokens"], batch["decoder_target_tokens"]
        enc_real, dec_real = batch["encoder_segment_ids"] > 0, batch["decoder_segment_ids"] > 0
        examples = int(np.count_nonzero((batch["decoder_positions"] == 0) & dec_real))
        sentinels = (np.count_nonzero(np.isin(enc, self.sentinels) & enc_real)
                     + np.count_nonzero(np.isin(dec, self.sentinels) & dec_real))
        modes = np.count_nonzero(np.isin(enc, self.modes) & enc_real
                                 & (batch["encoder_positions"] == 0))
        n_enc, n_dec = int(enc_real.sum()), int(dec_real.sum())
        raw = n_enc + n_dec - sentinels - modes - 2 * examples
        return np.array([1, enc.shape[0], examples, n_enc, n_dec, enc.size, dec.size, raw],
                        np.int64)


def _rates(counts: np.ndarray, wall: float, cpu0: dict[str, float],
           cpu1: dict[str, float]) -> dict[str, Any]:
    c = dict(zip(COUNT_FIELDS, (int(x) for x in counts)))
    cpu_s = cpu1["total"] - cpu0["total"]
    real = c["encoder_real"] + c["decoder_real"]
    positions = c["encoder_positions"] + c["decoder_positions"]

    def per(x, t):
        return round(x / t, 2) if t > 0 else None

    return dict(
        batches=c["batches"], examples=c["examples"], wall_s=round(wall, 3),
        batches_per_s=per(c["batches"], wall), examples_per_s=per(c["examples"], wall),
        positions_per_s=round(positions / wall), real_tokens_per_s=round(real / wall),
        raw_text_tokens_per_s=round(c["raw_text_tokens"] / wall),
        raw_text_tokens_per_cpu_s=round(c["raw_text_tokens"] / cpu_s) if cpu_s > 0 else None,
        cpu_s=round(cpu_s, 3), cpu_s_own_process=round(cpu1["own"] - cpu0["own"], 3),
        cpu_s_child_processes=round(cpu1["children"] - cpu0["children"], 3),
        cpu_cores_busy=per(cpu_s, wall),
        examples_per_cpu_s=per(c["examples"], cpu_s),
        real_tokens_per_cpu_s=round(real / cpu_s) if cpu_s > 0 else None,
        positions_per_cpu_s=round(positions / cpu_s) if cpu_s > 0 else None,
        encoder_fill=round(c["encoder_real"] / c["encoder_positions"], 4),
        decoder_fill=round(c["decoder_real"] / c["decoder_positions"], 4),
        examples_per_row=round(c["examples"] / c["rows"], 3))


def measure(batches: Iterator[dict[str, np.ndarray]], count_batch: BatchCounter, warmup: int,
            count: int, started: tuple[float, dict[str, float]],
            consumed: Callable[[], dict[str, int]] | None = None) -> dict[str, Any]:
    """The first batch, `warmup` batches, then `count` timed ones (the `steady` window);
    `whole_run` spans everything from `started` = (perf_counter, cpu_seconds()) at the source's
    creation. `consumed`: the source's own counters of documents/tokens read."""
    wall_start, cpu_start = started
    first = next(batches)
    first_batch_s = time.perf_counter() - wall_start
    totals = count_batch(first)
    for _ in range(warmup):
        totals += count_batch(next(batches))
    before = consumed() if consumed else None
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    steady = np.zeros(len(COUNT_FIELDS), np.int64)
    for _ in range(count):
        steady += count_batch(next(batches))
    wall1 = time.perf_counter()
    cpu1 = cpu_seconds()
    result = dict(first_batch_s=round(first_batch_s, 3), warmup_batches=warmup,
                  steady=_rates(steady, wall1 - wall0, cpu0, cpu1),
                  whole_run=_rates(totals + steady, wall1 - wall_start, cpu_start, cpu1))
    if consumed:
        after = consumed()
        for window, start, wall in (("steady", before, wall1 - wall0),
                                    ("whole_run", dict(tokens=0, documents=0), wall1 - wall_start)):
            result[window]["consumed_raw_tokens_per_s"] = round(
                (after["tokens"] - start["tokens"]) / wall)
            result[window]["consumed_documents_per_s"] = round(
                (after["documents"] - start["documents"]) / wall, 2)
    return result


# --------------------------------------------------------------------------- the two sides

def bench_t5g2(cfg: PipelineConfig, documents, vocab: Vocabulary, mixture: Mixture,
               warmup: int, count: int) -> dict[str, Any]:
    started = (time.perf_counter(), cpu_seconds())
    source = Ul2Source(cfg, documents=documents, vocab=vocab, mixture=mixture,
                       process_index=0, process_count=1)
    try:
        result = measure(source, BatchCounter(vocab, mixture), warmup, count, started,
                         consumed=source.consumed)
    finally:
        source.close()
    result.update(workers=cfg.num_workers, read_threads=cfg.read_threads)
    return result


def write_text_lines(documents, path: str) -> dict[str, int]:
    """One document per line (line breaks inside a document become spaces)."""
    n = chars = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in documents:
            line = doc.replace("\r", " ").replace("\n", " ")
            f.write(line + "\n")
            n += 1
            chars += len(line)
    return dict(documents=n, characters=chars)


class UnpackedSeqioBatches:
    """seqio.get_dataset with EncDecFeatureConverter(pack=False): one example per row, padded,
    in the batch contract (segment id 1 on real positions, positions 0.., as `pad_example`)."""

    def __init__(self, name: str, *, inputs_length: int, targets_length: int, batch_size: int,
                 seed: int, shuffle: bool, start_id: int):
        import seqio

        from t5g2.data.seqio_tasks import SPLIT

        ds = seqio.get_dataset(
            name, task_feature_lengths={"inputs": inputs_length, "targets": targets_length},
            feature_converter=seqio.EncDecFeatureConverter(pack=False), dataset_split=SPLIT,
            shuffle=shuffle, num_epochs=None, seed=seed, batch_size=batch_size, verbose=False)
        self._iterator = ds.as_numpy_iterator()
        self._start_id = start_id

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        from t5g2.data.seqio_tasks import to_contract

        batch = dict(next(self._iterator))
        for side, key in (("encoder", "encoder_input_tokens"),
                          ("decoder", "decoder_target_tokens")):
            real = batch[key] != 0  # pad id 0: sentencepiece never emits it for text
            batch[f"{side}_segment_ids"] = real.astype(np.int32)
            batch[f"{side}_positions"] = np.where(
                real, np.arange(real.shape[1], dtype=np.int32), 0).astype(np.int32)
        return to_contract(batch, start_id=self._start_id)

    def close(self) -> None:
        self._iterator = None  # tf.data's threads stop with the iterator


def bench_seqio(cfg: PipelineConfig, documents, vocab: Vocabulary, mixture: Mixture,
                warmup: int, count: int, *, pack: bool = False,
                shuffle: bool = False) -> dict[str, Any]:
    start = time.perf_counter()
    import tensorflow as tf  # timed apart: not the pipeline's work
    from t5g2.data.seqio_tasks import SeqioSource, register_ul2_tasks
    import_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "corpus.txt")
        written = write_text_lines(documents, path)
        started = (time.perf_counter(), cpu_seconds())
        name = register_ul2_tasks("t5g2_bench_ul2", vocab=vocab, text_source=path,
                                  mixture=mixture, inputs_length=cfg.encoder_length,
                                  targets_length=cfg.decoder_length, seed=cfg.seed)
        lengths = dict(inputs_length=cfg.encoder_length, targets_length=cfg.decoder_length,
                       batch_size=cfg.batch_size, seed=cfg.seed, shuffle=shuffle)
        if pack:
            source = SeqioSource(name, start_id=vocab.bos_id, **lengths)
            reader = "SeqioSource (seqio.get_dataset, EncDecFeatureConverter(pack=True))"
        else:
            source = UnpackedSeqioBatches(name, start_id=vocab.bos_id, **lengths)
            reader = ("seqio.get_dataset, EncDecFeatureConverter(pack=False), one example per "
                      "row (SeqioSource's own reader packs: see seqio_packing)")
        try:
            result = measure(iter(source), BatchCounter(vocab, mixture), warmup, count, started)
        finally:
            source.close()
    result.update(reader=reader, pack=pack, shuffle=shuffle, import_s=round(import_s, 2),
                  text_file=written,
                  tf_threads=dict(
                      inter_op=tf.config.threading.get_inter_op_parallelism_threads(),
                      intra_op=tf.config.threading.get_intra_op_parallelism_threads(),
                      note="0 = TensorFlow's default (one per core); tf.data's parallel maps "
                           "and prefetch run on its own pool, sized to the cores"))
    return result


# ------------------------------------------------ baseline 2: T5's span corruption in TF ops

T5_SPAN_CORRUPTION = dict(noise_density=0.15, mean_noise_span_length=3.0)


def t5_span_corruption_map(*, sentinel_ids: np.ndarray, eos_id: int,
                           noise_density: float = 0.15, mean_noise_span_length: float = 3.0):
    """T5's `span_corruption` denoising step (`t5.data.preprocessors`: random_spans_noise_mask,
    noise_span_to_unique_sentinel, nonnoise_span_to_unique_sentinel), written here in TF ops
    from the algorithm, since the `t5` package's requirements replace the pinned seqio and
    tensorflow-datasets. Per chunk of L tokens: round(L * density) noise tokens (clamped to
    [1, L-1]) in round(noise / mean) spans (at least 1), both split into uniformly random
    compositions with stateless shuffles; non-noise first, then alternating. Inputs: noise spans
    replaced by one sentinel each (the k-th span by sentinel_ids[k]); targets: the same with
    noise and non-noise swapped; EOS appended to both (T5's output features add it)."""
    import seqio
    import tensorflow as tf

    sentinels = tf.constant(np.asarray(sentinel_ids, np.int32))

    def shuffle(x, seed):
        return tf.gather(x, tf.argsort(tf.random.stateless_uniform(tf.shape(x), seed)))

    def random_segmentation(num_items, num_segments, seed):
        """Lengths of num_segments non-empty segments summing to num_items, uniformly random."""
        starts = tf.concat([tf.ones([num_segments - 1], tf.int32),
                            tf.zeros([num_items - num_segments], tf.int32)], 0)
        segment_ids = tf.cumsum(tf.pad(shuffle(starts, seed), [[1, 0]]))
        return tf.math.segment_sum(tf.ones_like(segment_ids), segment_ids)

    def noise_mask(length, seeds):
        padded = tf.maximum(length, 2)
        num_noise = tf.cast(tf.round(tf.cast(padded, tf.float32) * noise_density), tf.int32)
        num_noise = tf.clip_by_value(num_noise, 1, padded - 1)
        num_spans = tf.maximum(tf.cast(tf.round(tf.cast(num_noise, tf.float32)
                                                / mean_noise_span_length), tf.int32), 1)
        noise = random_segmentation(num_noise, num_spans, seeds[0])
        nonnoise = random_segmentation(padded - num_noise, num_spans, seeds[1])
        span_starts = tf.cumsum(tf.reshape(tf.stack([nonnoise, noise], 1), [-1]))[:-1]
        starts = tf.math.unsorted_segment_sum(tf.ones_like(span_starts), span_starts, padded)
        return tf.equal(tf.cumsum(starts) % 2, 1)[:length]

    def spans_to_sentinels(tokens, mask):
        previous = tf.pad(mask[:-1], [[1, 0]])
        first = tf.logical_and(mask, tf.logical_not(previous))
        later = tf.logical_and(mask, previous)
        span = tf.maximum(tf.cumsum(tf.cast(first, tf.int32)) - 1, 0)
        tokens = tf.where(first, tf.gather(sentinels, span), tokens)
        return tf.boolean_mask(tokens, tf.logical_not(later))

    @seqio.map_over_dataset(num_seeds=2)
    def span_corruption(x, seeds):
        tokens = x["targets"]
        mask = noise_mask(tf.size(tokens), seeds)
        eos = tf.constant([eos_id], tf.int32)
        return {"inputs": tf.concat([spans_to_sentinels(tokens, mask), eos], 0),
                "targets": tf.concat([spans_to_sentinels(tokens, tf.logical_not(mask)), eos],
                                     0)}

    return span_corruption


def register_t5_span_corruption(name: str, *, vocab: Vocabulary, text_path: str,
                                inputs_length: int, targets_length: int) -> tuple[str, int]:
    """A seqio Task reading, tokenizing and chunking exactly as `register_ul2_tasks` does, then
    T5's span corruption in TF ops; returns (name, raw chunk length: T5's random_spans_helper
    at inputs_length, as t5g2's `raw_length` computes it for this denoiser)."""
    import functools

    import seqio
    import tensorflow as tf

    from t5g2.data import seqio_tasks
    from t5g2.data.denoisers import Denoiser, raw_length, spans_needed

    denoiser = Denoiser("T5", "span", mean_span_length=3.0, noise_density=0.15)
    length = raw_length(denoiser, inputs_length, targets_length)
    vocab.require_sentinels(spans_needed(denoiser, inputs_length, targets_length),
                            f"T5 span corruption at inputs_length={inputs_length}")
    features = {key: seqio.Feature(vocab.seqio_vocabulary(), add_eos=False, dtype=tf.int32)
                for key in ("inputs", "targets")}
    seqio_tasks._unregister(name)
    seqio.TaskRegistry.add(
        name, source=seqio.TextLineDataSource({seqio_tasks.SPLIT: [text_path]}),
        output_features=features,
        preprocessors=[seqio_tasks._text_documents, seqio_tasks._rekey_text_to_targets,
                       functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
                       seqio_tasks._chunks(length, eos_id=vocab.eos_id),
                       t5_span_corruption_map(sentinel_ids=vocab.sentinel_ids,
                                              eos_id=vocab.eos_id)])
    return name, length


def bench_t5_span_corruption(cfg: PipelineConfig, documents, vocab: Vocabulary,
                             warmup: int, count: int) -> dict[str, Any]:
    mixture = mixture_from_config([dict(name="T5", kind="span", mean_span_length=3.0,
                                        noise_density=0.15)])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "corpus.txt")
        written = write_text_lines(documents, path)
        started = (time.perf_counter(), cpu_seconds())
        name, length = register_t5_span_corruption(
            "t5g2_bench_t5_span_corruption", vocab=vocab, text_path=path,
            inputs_length=cfg.encoder_length, targets_length=cfg.decoder_length)
        source = UnpackedSeqioBatches(name, start_id=vocab.bos_id,
                                      inputs_length=cfg.encoder_length,
                                      targets_length=cfg.decoder_length,
                                      batch_size=cfg.batch_size, seed=cfg.seed, shuffle=False)
        try:
            result = measure(iter(source), BatchCounter(vocab, mixture), warmup, count, started)
        finally:
            source.close()
    result.update(
        reader="seqio.get_dataset, EncDecFeatureConverter(pack=False): the seqio side's reading, "
               "tokenizing and chunking, then T5's span_corruption in TF ops",
        denoiser=dict(T5_SPAN_CORRUPTION, raw_length=length, mode_token=None),
        text_file=written)
    return result


def seqio_packing(cfg: PipelineConfig, unpacked: dict[str, Any] | None) -> dict[str, Any]:
    """What seqio's packing (seqio.utils.trim_and_pack_dataset, used by SeqioSource) costs
    before its first batch: it pads max(lengths) examples into one batch and packs them."""
    group = max(cfg.encoder_length, cfg.decoder_length)
    out = dict(
        examples_before_first_batch=group,
        padded_batch_bytes=group * (cfg.encoder_length + cfg.decoder_length) * 4,
        note=("trim_and_pack_dataset runs padded_batch(max(feature lengths)) and packs each such "
              "group with a tf.while_loop: SeqioSource gives no batch before "
              f"{group} examples are denoised and padded into one "
              f"[{group}, length] int32 array per feature, then serves the packed rows from "
              "that group in a burst. A steady window shorter than a group measures only the "
              "burst, so the throughput comparison reads seqio unpacked, which at these "
              "lengths loses nothing: t5g2's packer puts one example per row too"))
    if unpacked:
        rate = unpacked["steady"]["examples_per_s"]
        if rate:
            out["first_batch_s_estimate"] = round(group / rate, 1)
            out["first_batch_estimate_note"] = (
                "examples_before_first_batch / the unpacked seqio steady examples_per_s, set-up "
                "not included: a rough estimate (the padding and the packing loop add work; "
                "tf.data may run the fill on more cores than the steady window). Measured "
                "with --seqio_pack on this machine: 8.7 s at 1024 and 13.8 s at 2048 against "
                "estimates of 6.2 s and 15.2 s")
    return out


# ------------------------------------------------------- --index: cold and warm first batch

def write_jsonl_corpus(directory: str, documents, *, total_bytes: int, shards: int) -> dict:
    """A deterministic JSONL corpus of about `total_bytes` in `shards` files: the documents
    cycled, each record {"id": n, "text": document n mod len(documents)}."""
    os.makedirs(directory, exist_ok=True)
    texts = [json.dumps(d) for d in documents]
    per_shard = total_bytes // shards
    n = written = 0
    paths = []
    for shard in range(shards):
        path = os.path.join(directory, f"corpus-{shard:05d}-of-{shards:05d}.jsonl")
        size, lines = 0, []
        while size < per_shard:
            line = f'{{"id": {n}, "text": {texts[n % len(texts)]}}}\n'
            lines.append(line)
            size += len(line.encode())
            n += 1
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(lines)
        written += size
        paths.append(path)
    return dict(paths=paths, documents=n, bytes=written, shards=shards)


def _drop_page_cache(paths) -> bool:
    """Ask the kernel to forget the files' cached pages (so "cold" reads the disk); False where
    it cannot (non-Linux)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def first_batch_from(cfg: PipelineConfig, vocab: Vocabulary, mixture: Mixture) -> dict:
    """Open the documents (index from the cache or scanned) and build a Ul2Source; seconds to
    the open documents and to the first batch, from nothing."""
    from t5g2.data.pipeline import open_configured_documents
    start, cpu0 = time.perf_counter(), cpu_seconds()
    documents = open_configured_documents(cfg)
    opened = time.perf_counter() - start
    source = Ul2Source(cfg, documents=documents, vocab=vocab, mixture=mixture,
                       process_index=0, process_count=1)
    try:
        next(source)
        first = time.perf_counter() - start
    finally:
        source.close()
    return dict(open_documents_s=round(opened, 3), first_batch_s=round(first, 3),
                cpu_s=round(cpu_seconds()["total"] - cpu0["total"], 3),
                documents=len(documents), skipped=documents.skipped)


def run_index(args: argparse.Namespace) -> dict[str, Any]:
    """First-batch time on a generated JSONL corpus: cold (no cached index; scanned in this
    process and by one process per core) and warm (the index cached)."""
    load_start = os.getloadavg()
    cfg = PipelineConfig(encoder_length=args.encoder_length, decoder_length=args.decoder_length,
                         batch_size=args.batch, seed=args.seed, mixture=args.mixture,
                         vocab_size=args.vocab_size, read_threads=args.read_threads,
                         cache_dir=args.cache_dir, source_kind="jsonl", source_field="text")
    mixture = mixture_from_config(cfg.mixture)
    vocab = open_vocabulary(cfg, mixture)  # trained and cached before any timing
    embedded = open_documents("embedded", cache_dir=cfg.cache_dir)
    work = tempfile.mkdtemp(prefix="t5g2-index-bench-", dir=args.index_tmp)
    out: dict[str, Any] = dict(encoder_length=cfg.encoder_length,
                               decoder_length=cfg.decoder_length, batch=cfg.batch_size,
                               mixture=cfg.mixture, cpu_count=os.cpu_count())
    try:
        started = time.perf_counter()
        corpus = write_jsonl_corpus(os.path.join(work, "corpus"), embedded,
                                    total_bytes=int(args.index_corpus_mb * 2**20),
                                    shards=args.index_shards)
        out["corpus"] = dict(kind="jsonl", bytes=corpus["bytes"], shards=corpus["shards"],
                             documents=corpus["documents"],
                             generate_s=round(time.perf_counter() - started, 1))
        paths = (os.path.join(work, "corpus", "*.jsonl"),)
        runs = []
        for name, workers in (("cold_one_process", 0), ("cold_parallel", os.cpu_count())):
            index_dir = os.path.join(work, f"index-{name}")
            dropped = _drop_page_cache(corpus["paths"])
            runs.append((name, dict(
                first_batch_from(dataclasses.replace(cfg, source_paths=paths,
                                                     index_dir=index_dir,
                                                     index_workers=workers), vocab, mixture),
                index_workers=workers, page_cache_dropped=dropped)))
        for name in ("warm", "warm_again"):
            runs.append((name, dict(first_batch_from(dataclasses.replace(
                cfg, source_paths=paths, index_dir=index_dir), vocab, mixture),
                index_cached=True)))
        out.update(runs)
        index_bytes = sum(os.path.getsize(os.path.join(index_dir, f))
                          for f in os.listdir(index_dir))
        out["index"] = dict(bytes=index_bytes, files=len(os.listdir(index_dir)))
        out["warm_over_cold_parallel_first_batch"] = _ratio(out["warm"]["first_batch_s"],
                                                            out["cold_parallel"]["first_batch_s"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["corpus_deleted"] = not os.path.exists(work)
    out["notes"] = (
        "first_batch_s: from opening the documents (the index read from the cache, or every "
        "file scanned: UTF-8 and JSON checked per line) to the pipeline's first batch; "
        "open_documents_s is the opening alone. cold_one_process scans in this process, "
        "cold_parallel in one spawned process per core (index_workers=cpu_count; each starts "
        "a fresh interpreter that imports this benchmark's modules again); warm reads the "
        "cached index (sizes, mtimes and a head/tail hash checked per file). The page cache "
        "is dropped before each cold run (posix_fadvise DONTNEED) so it reads the disk; the "
        "warm runs then read only the index and the few documents the first batch needs.")
    out["environment"] = environment()
    out["environment"].update(load_average_start=[round(x, 2) for x in load_start],
                              load_average_end=[round(x, 2) for x in os.getloadavg()])
    return out


# --------------------------------------------------------------------------- the benchmark

def environment() -> dict[str, Any]:
    return dict(machine.describe(), nice=os.nice(0), versions=machine.package_versions(
        ("grain", "seqio", "tensorflow", "tensorflow-text", "sentencepiece", "numpy")))


NOTES = (
    "Headline figures: the steady window (after the first batch and the warm-up batches). "
    "Wall-clock rates (*_per_s) depend on how many cores a side keeps busy (cpu_cores_busy): "
    "tf.data runs the seqio side's maps on several threads, t5g2 with workers=0 and "
    "read_threads=0 runs on one, so on this shared 2-core machine wall-clock ratios favour "
    "whichever side uses more cores and move with the load average. Per-CPU-second rates "
    "(*_per_cpu_s) count every thread and child process of a side and are the like-for-like "
    "comparison of work per token; they still vary with other load (shared caches, SMT). "
    "whole_run includes set-up (building grain's pipeline or tf.data's graphs, spawning grain "
    "workers) and any prefetch, so it favours whichever side starts faster. "
    "raw_text_tokens_per_s is counted from the batches for both sides; "
    "consumed_raw_tokens_per_s is t5g2's own counter (Ul2Source.consumed(), read from the "
    "restorable state, so it covers exactly the examples already batched: the two agree). "
    "The seqio side reads unpacked by default (see seqio_packing) and unshuffled unless "
    "shuffle is true (its per-task shuffle buffer is filled before the first batch; the work "
    "per batch is the same). cores_needed assumes t5g2 scales linearly over grain worker "
    "processes (one core each, tokenizing being most of the work) with the consuming process "
    "keeping up; this 2-core machine cannot verify that.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_pipeline",
                                description="UL2 input-pipeline throughput: t5g2 (grain) "
                                            "against seqio/TensorFlow; prints one JSON object")
    p.add_argument("--encoder_length", type=int, default=16_384)
    p.add_argument("--decoder_length", type=int, default=16_384)
    p.add_argument("--batch", type=int, default=4, help="rows per batch")
    p.add_argument("--batches", type=int, default=20, help="timed batches (steady window)")
    p.add_argument("--warmup", type=int, default=2, help="batches after the first, untimed")
    p.add_argument("--workers", type=int, default=0, help="grain tokenizing processes")
    p.add_argument("--read_threads", type=int, default=0, help="grain read threads")
    p.add_argument("--mixture", default="t5gemma2", help="a preset name (t5gemma2, ul2)")
    p.add_argument("--vocab_size", type=int, default=4096,
                   help="sentencepiece model trained on the embedded corpus (cached)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--consumer_tokens_per_s", type=float,
                   default=DEFAULT_CONSUMER_TOKENS_PER_S,
                   help="tokens/s the trainer consumes, for cores_needed")
    p.add_argument("--skip_seqio", action="store_true", help="t5g2 side only (no TensorFlow)")
    p.add_argument("--seqio_pack", action="store_true",
                   help="read seqio through SeqioSource (packing: see seqio_packing in the "
                        "output) instead of unpacked")
    p.add_argument("--seqio_shuffle", action="store_true",
                   help="seqio's 1000-example shuffle buffer per task (t5x's default)")
    p.add_argument("--skip_t5", action="store_true",
                   help="leave out the T5 span-corruption (TF ops) baseline")
    p.add_argument("--cache_dir", default=None, help="t5g2 cache (corpus, vocabularies)")
    p.add_argument("--index", action="store_true",
                   help="instead: first-batch time on a generated JSONL corpus, cold (document "
                        "index scanned) and warm (index cached)")
    p.add_argument("--index_corpus_mb", type=float, default=1024,
                   help="--index: corpus size in MiB (generated, deleted afterwards)")
    p.add_argument("--index_shards", type=int, default=16, help="--index: corpus files")
    p.add_argument("--index_tmp", default=None,
                   help="--index: where the corpus is generated (default: the temp dir)")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.batches < 1 or args.warmup < 0:
        raise ValueError(f"--batches={args.batches} must be >= 1 and --warmup={args.warmup} "
                         ">= 0")
    load_start = os.getloadavg()
    cfg = PipelineConfig(encoder_length=args.encoder_length, decoder_length=args.decoder_length,
                         batch_size=args.batch, seed=args.seed, mixture=args.mixture,
                         vocab_size=args.vocab_size, num_workers=args.workers,
                         read_threads=args.read_threads, cache_dir=args.cache_dir)
    cfg.validate()
    mixture = mixture_from_config(cfg.mixture)
    # Corpus generation and vocabulary training happen here, before any timing.
    documents = open_documents("embedded", cache_dir=cfg.cache_dir)
    vocab = open_vocabulary(cfg, mixture)

    out: dict[str, Any] = dict(
        encoder_length=cfg.encoder_length, decoder_length=cfg.decoder_length,
        batch=cfg.batch_size, batches=args.batches, warmup=args.warmup, mixture=cfg.mixture,
        denoisers=[d.name for d in mixture.denoisers], weights=list(mixture.weights),
        vocab=dict(size=vocab.size, sentencepiece_pieces=vocab.sp_size,
                   sentinels=vocab.num_sentinels, model_file=os.path.basename(vocab.model_file)),
        corpus=dict(documents=len(documents)), seed=cfg.seed)
    out["t5g2_grain"] = bench_t5g2(cfg, documents, vocab, mixture, args.warmup, args.batches)
    if not args.skip_seqio:
        out["seqio_tensorflow"] = bench_seqio(cfg, documents, vocab, mixture, args.warmup,
                                              args.batches, pack=args.seqio_pack,
                                              shuffle=args.seqio_shuffle)
        keys = ("examples_per_s", "real_tokens_per_s", "examples_per_cpu_s",
                "real_tokens_per_cpu_s", "raw_text_tokens_per_cpu_s")
        out["ratios_t5g2_over_seqio"] = {
            window: {k: _ratio(out["t5g2_grain"][window][k], out["seqio_tensorflow"][window][k])
                     for k in keys}
            for window in ("steady", "whole_run")}

        out["seqio_packing"] = seqio_packing(
            cfg, None if args.seqio_pack else out["seqio_tensorflow"])
    if not args.skip_seqio and not args.skip_t5:
        out["t5_span_corruption_tf"] = bench_t5_span_corruption(cfg, documents, vocab,
                                                                args.warmup, args.batches)
        out["ratios_t5g2_over_t5_span_corruption"] = {
            window: {k: _ratio(out["t5g2_grain"][window][k],
                               out["t5_span_corruption_tf"][window][k]) for k in keys}
            for window in ("steady", "whole_run")}

    steady = out["t5g2_grain"]["steady"]
    rate = args.consumer_tokens_per_s
    out["consumer_tokens_per_s"] = rate
    out["cores_needed"] = _ratio(rate, steady["real_tokens_per_cpu_s"], 2)
    out["cores_needed_if_consumer_counts_positions"] = _ratio(rate,
                                                              steady["positions_per_cpu_s"], 2)
    if "seqio_tensorflow" in out:
        out["cores_needed_seqio"] = _ratio(
            rate, out["seqio_tensorflow"]["steady"]["real_tokens_per_cpu_s"], 2)
    if "t5_span_corruption_tf" in out:
        out["cores_needed_t5_span_corruption"] = _ratio(
            rate, out["t5_span_corruption_tf"]["steady"]["real_tokens_per_cpu_s"], 2)
    out["cores_needed_assumption"] = (
        "consumer_tokens_per_s / t5g2's steady real (non-padding) tokens per CPU-second in this "
        f"run's configuration (workers={cfg.num_workers}, read_threads={cfg.read_threads}): "
        "the pipeline's CPU work is assumed to spread linearly over grain worker processes, "
        "one core each, with the consuming process keeping up (not verifiable on 2 cores). "
        "More than one core needs workers > 0, whose transfers cost CPU too: use the figure "
        "from a run with --workers > 0 for that")
    out["notes"] = NOTES
    out["environment"] = environment()
    out["environment"].update(load_average_start=[round(x, 2) for x in load_start],
                              load_average_end=[round(x, 2) for x in os.getloadavg()])
    return out


def _ratio(a, b, digits: int = 3):
    if a is None or not b:
        return None
    return round(a / b, digits)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    result = run_index(args) if args.index else run(args)
    print(json.dumps(result, indent=2))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
