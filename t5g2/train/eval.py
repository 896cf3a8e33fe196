"""Held-out evaluation: mean loss per target token and token accuracy for each denoiser of the
UL2 mixture, during training (every `eval.every` steps and at the end) and for a saved checkpoint
(`python -m launch.eval`).

Held-out documents are the last `eval.holdout_documents` documents of data.ul2's source, which
training then never reads (`training_documents`), or the files `eval.source_paths` (read with
data.ul2's kind and field). Each denoiser gets `eval.batches` global batches of its own: the UL2
pipeline from its start with the run's seed, vocabulary and lengths, that one denoiser as the
whole mixture, in one data shard (so the batches do not depend on the process count). They are
made once and kept on the host, so every evaluation sees the same tokens; one jitted forward
pass under the training mesh and shardings gives per-batch sums (loss, correct tokens, target
tokens) that are added on the host in batch order. The figures are therefore a function of the
parameters alone, and `launch.eval` on a checkpoint reproduces the ones logged at its step.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5g2 import sharding
from t5g2.chunks import split_sequence
from t5g2.configlib import ConfigError, build, to_dict
from t5g2.model import ModelConfig
from t5g2.train.config import TrainConfig
from t5g2.train.loss import cross_entropy
from t5g2.train.state import model_graphdef
from t5g2.train.step import MODEL_INPUTS

log = logging.getLogger(__name__)

HostBatch = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The `eval` config section (configs/base.py says what each field does)."""

    every: int = 0
    batches: int = 2
    holdout_documents: int = 0
    source_paths: tuple[str, ...] = ()
    samples: int = 0

    @classmethod
    def from_config(cls, config: Any) -> "EvalConfig":
        """From a whole run config (ConfigDict or the JSON a checkpoint records); a config
        without an `eval` section (an older run's) has evaluation off."""
        section = config.get("eval") if hasattr(config, "get") else None
        values = to_dict(section) if section is not None else {}
        if isinstance(values.get("source_paths"), (list, tuple)):
            values["source_paths"] = tuple(values["source_paths"])
        cfg = build(cls, values, "eval")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name, low in (("every", 0), ("batches", 1), ("holdout_documents", 0),
                          ("samples", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"eval.{name}={value!r} must be an integer >= {low}")
        if not isinstance(self.source_paths, tuple) or not all(
                isinstance(p, str) and p for p in self.source_paths):
            raise ConfigError(f"eval.source_paths={self.source_paths!r} must be a tuple of "
                              "paths or globs")
        if self.holdout_documents and self.source_paths:
            raise ConfigError(f"eval.holdout_documents={self.holdout_documents} and "
                              f"eval.source_paths={self.source_paths!r} are both set; hold "
                              "documents out of the training source or read separate files, "
                              "not both")

    @property
    def has_documents(self) -> bool:
        return bool(self.holdout_documents or self.source_paths)


def enabled(config: Any) -> bool:
    """Whether the run evaluates during training: `eval.every` > 0 with the UL2 source. A UL2 run
    needs held-out documents (ConfigError otherwise); the synthetic source has none, so its
    runs do not evaluate (logged)."""
    cfg = EvalConfig.from_config(config)
    if not cfg.every:
        return False
    source = config["data"]["source"]
    if source != "ul2":
        log.info("eval.every=%d is ignored: data.source=%r has no held-out documents", cfg.every,
                 source)
        return False
    if not cfg.has_documents:
        raise ConfigError(f"eval.every={cfg.every} needs held-out documents: set "
                          "eval.holdout_documents=N (the source's last N documents, left out of "
                          "training) or eval.source_paths, or eval.every=0 to turn it off")
    return True


# ------------------------------------------------------------------------------ documents

class DocumentRange(Sequence[str]):
    """documents[start:stop] without reading them: random access, picklable (grain workers)."""

    def __init__(self, documents: Sequence[str], start: int, stop: int):
        self.documents, self.start, self.stop = documents, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = int(index) + (len(self) if int(index) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"document {index} out of range for {len(self)} documents")
        return self.documents[self.start + i]


def split_documents(documents: Sequence[str], holdout: int
                    ) -> tuple[Sequence[str], Sequence[str]]:
    """(training documents, held-out documents): all but the last `holdout`, and those."""
    n = len(documents)
    if holdout >= n:
        raise ConfigError(f"eval.holdout_documents={holdout} leaves no training documents: the "
                          f"source has {n}; hold out fewer")
    return DocumentRange(documents, 0, n - holdout), DocumentRange(documents, n - holdout, n)


def training_documents(config: Any, pipeline_cfg) -> Sequence[str]:
    """The documents the training pipeline reads: the source's, less the held-out ones."""
    from t5g2.data.pipeline import open_configured_documents

    documents = open_configured_documents(pipeline_cfg)
    cfg = EvalConfig.from_config(config)
    if cfg.holdout_documents:
        documents, _ = split_documents(documents, cfg.holdout_documents)
    return documents


def heldout_documents(config: Any, pipeline_cfg) -> Sequence[str]:
    from t5g2.data.pipeline import open_configured_documents

    cfg = EvalConfig.from_config(config)
    if cfg.source_paths:
        return open_configured_documents(
            dataclasses.replace(pipeline_cfg, source_paths=cfg.source_paths))
    if not cfg.holdout_documents:
        raise ConfigError("the run holds no documents out for evaluation (eval.holdout_documents"
                          "=0 and no eval.source_paths)")
    return split_documents(open_configured_documents(pipeline_cfg), cfg.holdout_documents)[1]


def heldout_batches(config: Any, train_cfg: TrainConfig) -> dict[str, list[dict[str, np.ndarray]]]:
    """denoiser name -> its `eval.batches` host batches (this process's rows), always the same."""
    from t5g2.data.denoisers import Mixture, mixture_from_config
    from t5g2.data.pipeline import Ul2Source, open_vocabulary
    from t5g2.train.loop import pipeline_config

    pipeline_cfg = pipeline_config(config, train_cfg)
    mixture = mixture_from_config(pipeline_cfg.mixture)
    vocab = open_vocabulary(pipeline_cfg, mixture)  # the training vocabulary: every mode token
    documents = heldout_documents(config, pipeline_cfg)
    one_shard = dataclasses.replace(pipeline_cfg, shards=1, num_workers=0)
    count = EvalConfig.from_config(config).batches
    batches = {}
    for denoiser in mixture.denoisers:
        source = Ul2Source(one_shard, documents=documents, vocab=vocab,
                           mixture=Mixture((denoiser,), (1.0,)))
        try:
            batches[denoiser.name] = [next(source) for _ in range(count)]
        finally:
            source.close()
    return batches


# ---------------------------------------------------------------------------- the computation

def token_sums(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array,
               targets: jax.Array, weights: jax.Array, chunk: int = 0) -> dict[str, jax.Array]:
    """Weighted sums over target tokens of cross-entropy, of correct argmax predictions and of
    the weights, computing logits `chunk` positions at a time (0: all at once)."""
    def sums(args):
        h, t, w = args
        logits = logits_fn(h)
        ce = cross_entropy(logits, t, w)
        correct = jnp.sum((jnp.argmax(logits, axis=-1) == t) * w.astype(jnp.float32))
        return jnp.stack([ce.cross_entropy, correct, ce.weight])

    if chunk and hidden.shape[1] > chunk:
        per_chunk = jax.lax.map(sums, tuple(split_sequence(x, chunk)
                                            for x in (hidden, targets, weights)))
        totals = jnp.sum(per_chunk, axis=0)
    else:
        totals = sums((hidden, targets, weights))
    return {"cross_entropy": totals[0], "correct": totals[1], "weight": totals[2]}


def make_eval_step(model_cfg: ModelConfig, mesh: Mesh, param_shardings: nnx.State,
                   loss_chunk: int = 0,
                   rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES):
    """A jitted (params, batch) -> token_sums of the model on the batch (no gradient)."""
    graphdef, _ = model_graphdef(model_cfg)

    def step(params: nnx.State, batch):
        with sharding.use_mesh(mesh, rules):
            model = nnx.merge(graphdef, params)
            hidden = model.hidden_states(batch["encoder_input_tokens"],
                                         batch["decoder_input_tokens"],
                                         **{k: batch[k] for k in MODEL_INPUTS if k in batch})
            return token_sums(model.logits, hidden, batch["decoder_target_tokens"],
                              batch["decoder_loss_weights"], loss_chunk)

    return jax.jit(step, in_shardings=(param_shardings, sharding.batch_sharding(mesh, rules)),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))


class Evaluator:
    """params -> {"eval/<denoiser>/loss", "eval/<denoiser>/accuracy", ..., "eval/loss",
    "eval/accuracy"}: means per target token over each denoiser's batches, and over all of them
    (every target token weighs the same)."""

    def __init__(self, batches: Mapping[str, Sequence[HostBatch]], step_fn, mesh: Mesh):
        self.batches, self.step_fn, self.mesh = batches, step_fn, mesh

    def __call__(self, params: nnx.State) -> dict[str, float]:
        out, total = {}, np.zeros(3)
        for name, batches in self.batches.items():
            sums = np.zeros(3)
            for batch in batches:
                result = jax.device_get(self.step_fn(
                    params, sharding.global_batch_from_host(dict(batch), self.mesh)))
                sums += [float(result[k]) for k in ("cross_entropy", "correct", "weight")]
            out.update(_means(f"eval/{name}", sums))
            total += sums
        out.update(_means("eval", total))
        return out


def _means(prefix: str, sums: np.ndarray) -> dict[str, float]:
    weight = max(float(sums[2]), 1.0)
    return {f"{prefix}/loss": float(sums[0]) / weight,
            f"{prefix}/accuracy": float(sums[1]) / weight}


def make_evaluator(config: Any, model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh,
                   param_shardings: nnx.State) -> Evaluator:
    """The run's evaluator (its held-out batches made now) on the training mesh."""
    batches = heldout_batches(config, train_cfg)
    return Evaluator(batches, make_eval_step(model_cfg, mesh, param_shardings,
                                             train_cfg.loss_chunk), mesh)


def due(step: int, every: int, last_step: int) -> bool:
    """Whether the loop evaluates after `step`: every `every` steps and after the last."""
    return bool(every) and (step % every == 0 or step == last_step)


# ------------------------------------------------------------------------------ checkpoints

@dataclasses.dataclass
class CheckpointEval:
    step: int
    metrics: dict[str, float]


def evaluate_checkpoint(workdir: str, step: int | None = None) -> CheckpointEval:
    """The held-out figures of step `step` (default: the latest) of a run, computed as the run
    computes them: its recorded config, its mesh and shardings, its held-out batches."""
    import ml_collections

    from t5g2.train.checkpoint import Checkpointer, CheckpointError
    from t5g2.train.state import TrainState

    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        steps = checkpointer.steps()
        if not steps:
            raise CheckpointError(f"{checkpointer.directory} holds no complete checkpoint: "
                                  "nothing to evaluate")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"step {step} is not in {checkpointer.directory}: {steps}")
        config = ml_collections.ConfigDict(checkpointer.saved_config(step))
        if config["data"]["source"] != "ul2":
            raise ConfigError(f"{workdir} trained on data.source={config['data']['source']!r}, "
                              "which has no held-out documents; only UL2 runs evaluate")
        model_cfg = ModelConfig.from_config_dict(config["model"])
        train_cfg = TrainConfig.from_config_dict(config["train"])
        mesh = sharding.make_mesh(config["mesh"])
        graphdef, abstract_params = model_graphdef(model_cfg)
        param_shardings = sharding.param_shardings(abstract_params, mesh)
        evaluator = make_evaluator(config, model_cfg, train_cfg, mesh, param_shardings)
        params = checkpointer.restore(
            step, TrainState(step=None, params=abstract_params, opt_state=None),
            TrainState(step=NamedSharding(mesh, PartitionSpec()), params=param_shardings,
                       opt_state=None),
            items=("params",), with_data=False).state.params
    finally:
        checkpointer.close()
    return CheckpointEval(step, evaluator(params))
