"""The UL2 mixture as seqio Tasks and a Mixture, and a reader of seqio tasks in the batch contract.

For users of seqio/t5x, and to compare against the grain pipeline: the denoising is the same numpy
code (`denoisers.denoise`, run through `tf.numpy_function`) with the same vocabulary ids
(`Vocabulary.seqio_vocabulary()`), so a seqio example and a grain example differ only in which
raw tokens and which random draws they got.

This is the only t5g2 module that imports TensorFlow (and seqio); the grain training path never
imports it.

`register_ul2_tasks` registers one Task per denoiser, `<name_prefix>_<denoiser name>`:
  source (text lines, or a function giving a tf.data.Dataset of {"text"}) -> drop blank texts
  (blank lines separate documents, as in `sources`) -> tokenize -> append EOS to every document
  (the document separator, as in the grain pipeline) -> concatenate and cut into chunks of the
  denoiser's `raw_length` (a finite source's last chunk is shorter; a final chunk of one token
  cannot be denoised and is the only thing left out) -> `denoise` with a per-example seed from
  `seqio.map_over_dataset(num_seeds=1)` -> features "inputs"/"targets" (add_eos=False: denoise
  appends EOS itself);
and a seqio Mixture `<name_prefix>` sampling the tasks with the mixture's weights. Each task reads
the whole source (UL2's appendix code with `shard_ds=False`), so one document can appear under
several denoisers.

`SeqioSource` reads a task or mixture through `seqio.EncDecFeatureConverter(pack=True)` and
yields numpy batches in the batch contract. seqio starts every packed decoder segment with id 0;
the contract's start id is BOS (2), so segment starts are rewritten to `start_id`.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from t5g2.data.denoisers import Denoiser, denoise, mixture_from_config, raw_length, spans_needed
from t5g2.data.vocab import Vocabulary

__all__ = ["register_ul2_tasks", "task_name", "SeqioSource"]

SPLIT = "train"


def task_name(name_prefix: str, denoiser: Denoiser) -> str:
    """Name of the seqio Task registered for one denoiser."""
    return f"{name_prefix}_{denoiser.name}"


def register_ul2_tasks(name_prefix: str, *, vocab: Vocabulary,
                       text_source: str | Sequence[str] | Callable[..., tf.data.Dataset],
                       mixture: Any, inputs_length: int, targets_length: int,
                       seed: int = 0) -> str:
    """Register one seqio Task per denoiser of `mixture` and a Mixture of them; returns its name.

    `text_source`: file pattern(s) of text, one document per line; or a seqio dataset function
    `fn(split, shuffle_files[, seed]) -> tf.data.Dataset` of strings or {"text": string}.
    `mixture`: anything `mixture_from_config` takes. The lengths decide each denoiser's raw chunk
    length; the vocabulary must hold the sentinels they need. Example k's noise is drawn from
    `np.random.default_rng([seed, *seqio's seed for k])`, so it is deterministic when
    `seqio.get_dataset` gets a seed. Registering a name again replaces the earlier registration.
    """
    mixture = mixture_from_config(mixture)
    raw_lengths = [raw_length(d, inputs_length, targets_length) for d in mixture.denoisers]
    vocab.require_sentinels(
        max(spans_needed(d, inputs_length, targets_length) for d in mixture.denoisers),
        f"seqio mixture {name_prefix!r} ({[d.name for d in mixture.denoisers]}) at "
        f"inputs_length={inputs_length}, targets_length={targets_length}")
    seqio_vocab = vocab.seqio_vocabulary()
    features = {key: seqio.Feature(seqio_vocab, add_eos=False, dtype=tf.int32)
                for key in ("inputs", "targets")}
    source = _data_source(text_source)
    names = []
    for denoiser, length in zip(mixture.denoisers, raw_lengths):
        mode_id = vocab.mode_id(denoiser.mode_token) if denoiser.mode_token else None
        name = task_name(name_prefix, denoiser)
        _unregister(name)
        seqio.TaskRegistry.add(
            name, source=source, output_features=features,
            preprocessors=[
                _text_documents,
                _rekey_text_to_targets,
                functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
                _chunks(length, eos_id=vocab.eos_id),
                _denoiser_map(denoiser, seed=seed,
                              sentinel_ids=np.asarray(vocab.sentinel_ids, np.int32),
                              eos_id=vocab.eos_id, mode_id=mode_id),
            ])
        names.append(name)
    _unregister(name_prefix)
    seqio.MixtureRegistry.add(name_prefix, list(zip(names, map(float, mixture.weights))))
    return name_prefix


def _unregister(name: str) -> None:
    seqio.MixtureRegistry.remove(name)
    seqio.TaskRegistry.remove(name)


def _data_source(text_source) -> seqio.DataSource:
    if callable(text_source):
        params = inspect.signature(text_source).parameters
        if not {"split", "shuffle_files"} <= set(params):
            raise TypeError(f"text_source function {text_source!r} must take (split, "
                            "shuffle_files[, seed]) as a seqio dataset function does")
        return seqio.FunctionDataSource(text_source, splits=(SPLIT,))
    patterns = [text_source] if isinstance(text_source, str) else list(text_source)
    missing = [p for p in patterns if not tf.io.gfile.glob(p)]
    if not patterns or missing:
        raise FileNotFoundError(f"text_source: no file matches {missing or patterns!r}")
    return seqio.TextLineDataSource({SPLIT: patterns})


def _text_documents(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """{"text": non-blank string}, from a dataset of strings or of dicts with "text"."""
    spec = dataset.element_spec
    if isinstance(spec, Mapping) and "text" not in spec:
        raise KeyError(f"the text source gives examples with keys {sorted(spec)}, without 'text'")

    def as_text(x):
        return {"text": x["text"] if isinstance(x, Mapping) else x}

    def not_blank(x):
        return tf.strings.length(tf.strings.strip(x["text"])) > 0

    return dataset.map(as_text).filter(not_blank)


def _rekey_text_to_targets(dataset: tf.data.Dataset) -> tf.data.Dataset:
    def rekey(x):
        return {"targets": x["text"]}
    return dataset.map(rekey)


def _chunks(length: int, *, eos_id: int) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    """Documents' tokens, each followed by EOS, concatenated and cut into chunks of `length`."""
    def with_eos(x):
        return tf.concat([x["targets"], [eos_id]], 0)

    def long_enough(tokens):
        return tf.size(tokens) >= 2

    def as_example(tokens):
        return {"targets": tokens}

    def chunks(dataset: tf.data.Dataset) -> tf.data.Dataset:
        return dataset.map(with_eos).rebatch(length).filter(long_enough).map(as_example)
    return chunks


def _denoiser_map(denoiser: Denoiser, *, seed: int, sentinel_ids: np.ndarray, eos_id: int,
                  mode_id: int | None):
    """`denoise` on every chunk; its generator is seeded by `seed` and the example's seqio seed."""
    def run(tokens: np.ndarray, example_seed: np.ndarray):
        words = np.asarray(example_seed, np.int64).view(np.uint64)
        rng = np.random.default_rng([seed, *words.tolist()])
        example = denoise(tokens, denoiser, rng, sentinel_ids=sentinel_ids, eos_id=eos_id,
                          mode_id=mode_id)
        return example["inputs"], example["targets"]

    @seqio.map_over_dataset(num_seeds=1)
    def denoise_example(x, seed):
        inputs, targets = tf.numpy_function(run, [x["targets"], seed], [tf.int32, tf.int32],
                                            stateful=False)
        inputs.set_shape([None])
        targets.set_shape([None])
        return {"inputs": inputs, "targets": targets}

    return denoise_example


class SeqioSource:
    """Numpy batches in the batch contract from a seqio task or mixture (packed, repeated).

    `batch_size` is this shard's batch; `shard_index`/`shard_count` split the data as seqio's
    ShardInfo does. The state is the number of batches read: `set_state` rebuilds the tf.data
    pipeline and skips that many batches, so restoring costs as much input work as producing
    them again (t5x instead checkpoints the tf.data iterator itself).

    `close()` (or leaving a `with` block) stops tf.data's threads; sources still open at
    interpreter exit are closed by an atexit hook, since a live iterator whose threads call
    `tf.numpy_function` can otherwise hang Python's shutdown.
    """

    def __init__(self, mixture_or_task_name: str, *, inputs_length: int, targets_length: int,
                 batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1,
                 start_id: int = 2, shuffle: bool = True):
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index={shard_index} is not in [0, shard_count="
                             f"{shard_count})")
        self.name = mixture_or_task_name
        self._identity = dict(name=mixture_or_task_name, inputs_length=inputs_length,
                              targets_length=targets_length, batch_size=batch_size, seed=seed,
                              shard_index=shard_index, shard_count=shard_count,
                              start_id=start_id, shuffle=shuffle)
        self._start_id = start_id
        self._batches = 0
        self._iterator: Iterator[dict[str, np.ndarray]] | None = None  # opened on first use

    def _open(self, skip: int) -> Iterator[dict[str, np.ndarray]]:
        _OPEN_SOURCES.add(self)
        i = self._identity
        ds = seqio.get_dataset(
            i["name"], task_feature_lengths={"inputs": i["inputs_length"],
                                             "targets": i["targets_length"]},
            feature_converter=seqio.EncDecFeatureConverter(pack=True), dataset_split=SPLIT,
            shuffle=i["shuffle"], num_epochs=None, seed=i["seed"],
            shard_info=seqio.ShardInfo(i["shard_index"], i["shard_count"]),
            batch_size=i["batch_size"], verbose=False)
        return ds.skip(skip).as_numpy_iterator()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._open(skip=self._batches)
        batch = next(self._iterator)
        self._batches += 1
        return to_contract(batch, start_id=self._start_id)

    def get_state(self) -> dict[str, Any]:
        """JSON-able: what this source reads and how many batches it has given."""
        return dict(self._identity, batches=self._batches)

    def set_state(self, state: Mapping[str, Any]) -> None:
        changed = [f"{k}={state.get(k)!r} (now {v!r})" for k, v in self._identity.items()
                   if state.get(k) != v]
        if changed:
            raise ValueError("this seqio source state was saved by a different source: "
                             + "; ".join(changed))
        self._batches = int(state["batches"])
        self._iterator = None  # reopened at the next batch, skipping the batches read

    def close(self) -> None:
        """Drops the tf.data iterator and its threads (a later `next` reopens and skips)."""
        self._iterator = None
        _OPEN_SOURCES.discard(self)

    def __enter__(self) -> "SeqioSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_OPEN_SOURCES: "weakref.WeakSet[SeqioSource]" = weakref.WeakSet()


@atexit.register
def _close_open_sources() -> None:
    for source in list(_OPEN_SOURCES):
        source.close()


def to_contract(batch: Mapping[str, np.ndarray], *, start_id: int) -> dict[str, np.ndarray]:
    """seqio's EncDecFeatureConverter output -> the batch contract (start id, dtypes)."""
    out = {k: np.asarray(v, np.int32) for k, v in batch.items() if k != "decoder_loss_weights"}
    starts = (out["decoder_positions"] == 0) & (out["decoder_segment_ids"] > 0)
    out["decoder_input_tokens"] = np.where(starts, start_id, out["decoder_input_tokens"]
                                           ).astype(np.int32)
    out["decoder_loss_weights"] = np.asarray(batch["decoder_loss_weights"], np.float32)
    return out
