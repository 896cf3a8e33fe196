"""The training loop: validated config -> mesh -> sharded state (restored from the workdir's
checkpoints, or initialised) -> steps -> metrics, held-out evaluation (t5g2/train/eval.py) and
checkpoints.

Every process runs this same program (JAX multi-controller); each feeds its share of the global
batch, and process 0 writes metrics (TensorBoard, metrics.jsonl, a progress bar or log lines).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import ml_collections
from flax import nnx

from t5g2 import fs, sharding
from t5g2.configlib import ConfigError, build, to_dict
from t5g2.data.synthetic import SyntheticCopySource
from t5g2.model import ModelConfig, kernels
from t5g2.model.flops import batch_train_flops, train_flops
from t5g2.model.params import count_params
from t5g2.run_config import CheckpointConfig, RunConfig
from t5g2.train import eval as evaluation
from t5g2.train.checkpoint import Checkpointer, check_compatible, config_as_json
from t5g2.train.config import SCHEDULE_FIELDS, TrainConfig
from t5g2.train.divergence import NonFiniteGuard
from t5g2.train.metrics import MetricsWriter, StepTimer, sum_over_processes
from t5g2.train.optimizer import learning_rate_schedule, make_optimizer
from t5g2.train.peak import peak_flops_per_device
from t5g2.train.shared_workdir import check_shared_workdir
from t5g2.train.preemption import PreemptionWatch
from t5g2.train.state import (TrainState, abstract_train_state, model_graphdef,
                              state_shardings)
from t5g2.train.step import make_train_step, optimizer_count

log = logging.getLogger(__name__)


SOURCES = ("seqio", "synthetic", "ul2")


def make_source(config: ml_collections.ConfigDict, model_cfg: ModelConfig,
                train_cfg: TrainConfig):
    """The batch source `config.data.source` names, feeding this process its rows.

    "ul2": the UL2 mixture-of-denoisers pipeline (t5g2.data.pipeline) with `config.data.ul2`;
    lengths, global batch and seed come from the train config and `config.seed`, so they are
    set in one place; with `config.data.image_text.paths` set, image-text rows are mixed in
    (t5g2.data.image_text). "seqio": a registered seqio task or mixture (`config.data.seqio`),
    with the same lengths, batch and seed. "synthetic": a copy task for smoke and sharding tests.
    """
    source = config.data.source
    if source == "ul2":
        return _ul2_source(config, model_cfg, train_cfg)
    if source == "seqio":
        return _seqio_source(config, model_cfg, train_cfg)
    if source == "synthetic":
        return SyntheticCopySource(
            global_batch_size=train_cfg.batch_size, encoder_length=train_cfg.encoder_length,
            decoder_length=train_cfg.decoder_length, vocab_size=model_cfg.vocab_size,
            seed=config.seed, process_index=jax.process_index(),
            process_count=jax.process_count(), bos_id=model_cfg.bos_id,
            distinct_batches=config.data.get("distinct_batches", 0))
    raise ConfigError(f"data.source={source!r} is unknown; valid: {', '.join(SOURCES)}")


def pipeline_config(config, train_cfg: TrainConfig):
    """`data.ul2` completed by the lengths, global batch and seed, which are set elsewhere."""
    from t5g2.data.pipeline import PipelineConfig

    from t5g2.run_config import UL2_SET_ELSEWHERE

    settings = dict(config["data"].get("ul2", {}))
    taken = UL2_SET_ELSEWHERE & set(settings)
    if taken:
        raise ConfigError(f"data.ul2.{sorted(taken)[0]} is set by train.* / seed; remove it")
    return PipelineConfig.from_mapping(dict(
        settings, encoder_length=train_cfg.encoder_length,
        decoder_length=train_cfg.decoder_length, batch_size=train_cfg.batch_size,
        seed=config["seed"]))


def _ul2_source(config, model_cfg: ModelConfig, train_cfg: TrainConfig):
    from t5g2.data.pipeline import Ul2Source

    pipeline_cfg = pipeline_config(config, train_cfg)
    documents = evaluation.training_documents(config, pipeline_cfg)
    image_text = config["data"].get("image_text")
    if image_text and image_text.get("paths"):  # image-text rows mixed in (t5g2/data/image_text.py)
        from t5g2.data.image_text import ImageSpec, ImageTextConfig, ImageTextSource

        source = ImageTextSource(pipeline_cfg, ImageTextConfig.from_mapping(image_text),
                                 ImageSpec.from_model(model_cfg), documents=documents)
    else:
        source = Ul2Source(pipeline_cfg, documents=documents)
    check_vocabulary_fits_model(source.vocab, model_cfg)
    return source


def _seqio_source(config, model_cfg: ModelConfig, train_cfg: TrainConfig):
    """`data.seqio.task` through SeqioSource: imports `data.seqio.modules` (which register it),
    checks that the name is registered and that its vocabularies fit the model."""
    import importlib

    settings = RunConfig.from_config(config).data.seqio  # a task is named
    name, modules = settings.task, settings.modules
    try:
        import seqio

        from t5g2.data.seqio_tasks import SeqioSource
    except ImportError as e:
        raise ConfigError(f"data.source='seqio' needs seqio and TensorFlow ({e}): pip install "
                          "-e '.[seqio]' (the package's seqio extra)") from e
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"data.seqio.modules: cannot import {module!r}: {e}") from e
    try:
        task = seqio.get_mixture_or_task(name)
    except ValueError:
        raise ConfigError(f"data.seqio.task={name!r} is not a registered seqio task or mixture"
                          + (f" after importing {list(modules)}" if modules else
                             "; name the module that registers it in data.seqio.modules")
                          ) from None
    for feature in ("inputs", "targets"):
        size = task.output_features[feature].vocabulary.vocab_size
        if size > model_cfg.vocab_size:
            raise ConfigError(f"data.seqio.task={name!r}: its {feature} vocabulary has {size} "
                              f"ids but model.vocab_size={model_cfg.vocab_size}")
    return SeqioSource(name, inputs_length=train_cfg.encoder_length,
                       targets_length=train_cfg.decoder_length,
                       batch_size=sharding.host_local_batch_size(train_cfg.batch_size),
                       seed=config.seed, shard_index=jax.process_index(),
                       shard_count=jax.process_count(), start_id=model_cfg.bos_id)


# The model's special ids the vocabulary also defines: BOS starts every decoder segment, PAD and
# EOS are what an export's config.json tells generation (padding, when to stop).
_SPECIAL_IDS = {"pad_id": "PAD", "eos_id": "EOS", "bos_id": "BOS (the decoder start id)"}


def check_vocabulary_fits_model(vocab, model_cfg: ModelConfig) -> None:
    """Every id the pipeline emits must index the model's table, the model's pad / eos / bos ids
    must be the vocabulary's, and a trained vocabulary's text ids must not collide with the
    model's EOI / image placeholder ids."""
    for name, what in _SPECIAL_IDS.items():
        ours, theirs = getattr(model_cfg, name), getattr(vocab, name)
        if ours != theirs:
            raise ConfigError(f"model.{name}={ours} but the vocabulary's {what} is {theirs}; "
                              f"set --config.model.{name}={theirs}")
    if vocab.size > model_cfg.vocab_size:
        raise ConfigError(f"the vocabulary has {vocab.size} ids (sentencepiece {vocab.sp_size} +"
                          f" {vocab.extra_ids} sentinels) but model.vocab_size="
                          f"{model_cfg.vocab_size}; shrink data.ul2.vocab_size or the "
                          "sentinel count")
    if vocab.extra_ids:  # a generic model: its ids are text; the special ids must lie above
        for name in ("boi_token_id", "eoi_token_id", "image_token_id"):
            value = getattr(model_cfg, name)
            if value is not None and 0 <= value < vocab.size:
                raise ConfigError(f"model.{name}={value} is an ordinary id of the {vocab.size}-id"
                                  " vocabulary; use an id >= the vocabulary size")


@dataclasses.dataclass
class RunResult:
    metrics: dict[str, float]  # the last logged metrics
    step: int  # the last step trained (or restored, when nothing was left to train)
    preempted: bool  # stopped early by SIGTERM, after saving a checkpoint at `step`
    checkpoint: str | None  # the last checkpoint directory written or restored
    samples: list = dataclasses.field(default_factory=list)  # greedy held-out samples at the end


def train(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
    """Trains up to `config.train.steps`, resuming from the workdir's checkpoints if any. The
    whole config is validated first (RunConfig): a bad field stops the run before any work."""
    run_cfg = RunConfig.from_config(config)
    model_cfg, train_cfg = run_cfg.model, run_cfg.train
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_model_fits_mesh(model_cfg, mesh)
    sharding.check_batch_fits_mesh(train_cfg.microbatch_size, mesh)
    log.info(kernels.describe(model_cfg.attention_impl, jax.default_backend()))
    sharding.host_local_batch_size(train_cfg.batch_size)
    check_shared_workdir(workdir, config.shared_workdir_timeout_s)

    tx, schedule = make_optimizer(train_cfg)
    shardings = state_shardings(model_cfg, tx, mesh)
    step_fn = make_train_step(model_cfg, train_cfg, tx, schedule, mesh, shardings)
    source = make_source(config, model_cfg, train_cfg)
    evaluator = (evaluation.make_evaluator(config, model_cfg, train_cfg, mesh, shardings.params)
                 if evaluation.enabled(config) else None)
    checkpointer = make_checkpointer(config, workdir)
    try:
        state, start, origin = start_state(config, model_cfg, tx, mesh, shardings, source,
                                           checkpointer, workdir)
        return _run(config, workdir, model_cfg, train_cfg, mesh, step_fn, source, checkpointer,
                    state, start, origin, evaluator)
    finally:
        if hasattr(source, "close"):
            source.close()
        if checkpointer is not None:
            checkpointer.close()


def make_checkpointer(config, workdir: str) -> Checkpointer | None:
    ckpt = build(CheckpointConfig, to_dict(config.checkpoint), "checkpoint")
    ckpt.validate()
    if not ckpt.enabled:
        return None
    return Checkpointer(workdir, every=ckpt.every, keep=ckpt.keep, keep_period=ckpt.keep_period,
                        async_save=ckpt.async_save)


def start_state(config, model_cfg: ModelConfig, tx, mesh, shardings: TrainState, source,
                checkpointer: Checkpointer | None, workdir: str):
    """(state, step, origin): the workdir's checkpoint when there is one, else the configured
    initialisation. The workdir is checked against this config before anything in it changes:
    its checkpoint, or without one its config.json, must describe the same model."""
    from t5g2.train.init import chosen_init, init_config, initial_train_state

    chosen = chosen_init(config)
    config_json = config_as_json(config)
    restored = None
    if checkpointer is not None:
        restored = checkpointer.resume(
            abstract_train_state(model_cfg, tx), shardings, config=config_json,
            step=config.checkpoint.restore_step, fallback=config.checkpoint.fallback)
    if restored is None:
        previous = fs.join(workdir, "config.json")
        if fs.is_file(previous):  # a run that stopped before its first checkpoint
            check_compatible(json.loads(fs.read_text(previous)), config_json, workdir,
                             "its config.json")
        state, origin = initial_train_state(config, model_cfg, tx, mesh, shardings)
    else:
        _restore_data_position(source, restored, config)
        ignored = ([chosen[0]] if chosen else []) + (
            ["vision_from"] if init_config(config).vision_from else [])
        for name in ignored:
            log.info("init.%s is ignored: resuming from the workdir's checkpoint", name)
        state, origin = restored.state, f"checkpoint {restored.path} (step {restored.step})"
    start = restored.step if restored else 0
    if checkpointer is not None:
        checkpointer.prepare_to_continue(start)
    return state, start, origin


def _restore_data_position(source, restored, config) -> None:
    """Continues the checkpoint's data position. Saved by another number of processes, every
    process's saved position goes to `restore_position`: the sources' global batches do not
    depend on the process count, so the run continues with exactly the batches it would have
    had (launch/README.md: "Resuming on another number of hosts")."""
    saved, now = restored.config.get("data", {}).get("source"), config.data.source
    if saved != now:
        raise ConfigError(f"{restored.path} was saved by a run reading data.source={saved!r}, "
                          f"this one reads {now!r}: its data position does not apply")
    if hasattr(source, "set_state"):
        try:
            if restored.all_data is None:
                source.set_state(restored.data)
            elif not hasattr(source, "restore_position"):
                raise ConfigError(f"{restored.path} was saved by {restored.data_process_count} "
                                  f"processes, this run has {jax.process_count()}: "
                                  f"data.source={now!r} resumes on the same number only")
            else:
                log.info("%s was saved by %d processes, this run has %d: continuing its data "
                         "position on %d", restored.path, restored.data_process_count,
                         jax.process_count(), jax.process_count())
                source.restore_position(restored.all_data)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"{restored.path}: the saved data position does not fit this "
                              f"run's pipeline: {e}") from e


def _run(config, workdir, model_cfg, train_cfg, mesh, step_fn, source, checkpointer, state,
         start, origin, evaluator=None) -> RunResult:
    peak, peak_origin = peak_flops_per_device(config.peak_flops_per_device)
    # MFU counts the model FLOPs of the real tokens (batch_train_flops, per step and process);
    # this, every position counted as a token, is only for mfu_padded.
    padded_flops = train_cfg.batch_size * train_flops(model_cfg, train_cfg.encoder_length,
                                                      train_cfg.decoder_length)
    step_tokens = train_cfg.batch_size * (train_cfg.encoder_length + train_cfg.decoder_length)
    if jax.process_index() == 0:
        fs.makedirs(workdir)
        fs.write_text(fs.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
        log.info("%s: %s parameters on mesh %s; peak %.3g FLOP/s per device (%s)", config.name,
                 f"{count_params(model_cfg):,}", sharding.describe(mesh), peak, peak_origin)
        log.info("starting at step %d from %s", start, origin)
    saved_json = config_as_json(config)
    data_state = getattr(source, "get_state", lambda: None)
    last_checkpoint = checkpointer.step_path(start) if checkpointer and start else None
    if start >= train_cfg.steps:
        log.info("step %d >= train.steps=%d: nothing to train (raise --config.train.steps to "
                 "continue)", start, train_cfg.steps)
        return RunResult({}, start, False, last_checkpoint)
    if checkpointer is not None and start:
        warn_if_schedule_changed(checkpointer.saved_config(start).get("train", {}), train_cfg,
                                 int(jax.device_get(optimizer_count(state.opt_state, state.step))),
                                 last_checkpoint)

    timer = StepTimer(tokens_per_step=step_tokens, padded_flops_per_step=padded_flops,
                      peak_flops_per_s=peak * mesh.size,
                      sum_across_processes=sum_over_processes if jax.process_count() > 1 else None)
    metrics: dict[str, float] = {}
    step, preempted = start, False
    guard = NonFiniteGuard(train_cfg.on_nonfinite, train_cfg.max_skipped)
    eval_every = evaluation.EvalConfig.from_config(config).every if evaluator else 0
    evaluated: dict[int, dict[str, float]] = {}  # step -> its held-out figures, reported with it
    with MetricsWriter(workdir, process_index=jax.process_index(),
                       total_steps=train_cfg.steps, initial_step=start) as writer, \
            PreemptionWatch() as preemption:

        def finish(done: int, step_metrics, host_batch) -> dict[str, float]:
            """Waits for step `done`'s metrics, ends a diverged run, reports the step when due.
            All processes call it for every step, in order, with the same (replicated) values."""
            nonlocal metrics
            values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            diverged = guard.observe(done, values)
            timer.add_flops(batch_train_flops(model_cfg, host_batch))  # the next step runs
            final = done == train_cfg.steps or (preempted and done == step) or diverged
            held_out = evaluated.pop(done, None)
            if done % train_cfg.log_every == 0 or final or done == start + 1 or held_out:
                metrics = {k: v for k, v in values.items() if k not in _CONTROL_METRICS}
                metrics.update(held_out or {})
                metrics.update(guard.report())
                metrics.update(timer.measure(done))
                metrics.update(batch_fill(host_batch))
                writer.write(done, metrics)
            if diverged:
                if checkpointer is not None:
                    checkpointer.wait()  # the last good checkpoint, complete on disk
                raise guard.error(diverged, last_checkpoint)
            return values

        # One step stays queued on the device: step k's metrics are fetched once step k+1 is
        # dispatched, so the device has work while Python waits, and Python is never more than
        # a step ahead of it. A signal or a non-finite step is acted on within a step or two,
        # whatever log_every is, and every step's metrics are checked.
        pending = None  # (step, its metrics on the device, its host batch)
        while step < train_cfg.steps and not preempted:
            host_batch = next(source)
            rows = len(next(iter(host_batch.values())))
            batch = sharding.global_batch_from_host(
                {**host_batch, **preemption.request_column(rows)}, mesh)
            state, step_metrics = step_fn(state, batch)
            step += 1
            if evaluation.due(step, eval_every, train_cfg.steps):  # before the next step donates
                jax.block_until_ready(step_metrics)  # the step's own time stays in the window
                with timer.excluded():
                    evaluated[step] = evaluator(state.params)
            if step == start + 1:  # throughput windows start after the first (compiling) step
                jax.block_until_ready(step_metrics)
                timer.start(step)
            on_demand = pending is not None and finish(*pending).get("checkpoint_requested")
            pending = (step, step_metrics, host_batch)
            preempted = preemption.should_stop(step)
            last = step == train_cfg.steps or preempted
            if checkpointer is not None and (last or on_demand or checkpointer.should_save(step)):
                finish(*pending)  # a state is saved only once its step is known to be finite
                pending = None
                checkpointer.save(step, state, data_state(), saved_json)
                last_checkpoint = checkpointer.step_path(step)
        if pending is not None:
            finish(*pending)
        if checkpointer is not None:  # still under the watch: a second SIGTERM can't cut it
            checkpointer.wait()
    if preempted:
        log.warning("stopped at step %d on a termination request; checkpoint %s. Run the same "
                    "command to resume.", step, last_checkpoint)
        return RunResult(metrics, step, preempted, last_checkpoint)
    return RunResult(metrics, step, preempted, last_checkpoint,
                     final_samples(config, model_cfg, mesh, state.params, evaluator))


def final_samples(config, model_cfg: ModelConfig, mesh, params, evaluator) -> list:
    """Greedy samples of the held-out inputs (`eval.samples` per denoiser) by the final model.
    Single-process runs only: with several processes, `python -m launch.generate` on the
    checkpoint shows the same."""
    count = evaluation.EvalConfig.from_config(config).samples if evaluator else 0
    if not count:
        return []
    if jax.process_count() > 1:
        log.info("eval.samples: skipped on a %d-process run; run python -m launch.generate on "
                 "the last checkpoint", jax.process_count())
        return []
    from t5g2.train.export import run_vocabulary
    from t5g2.train.samples import greedy_samples

    graphdef, _ = model_graphdef(model_cfg)
    with sharding.use_mesh(mesh):
        return greedy_samples(nnx.merge(graphdef, params), run_vocabulary(config),
                              evaluator.batches, count)


# Step metrics the loop acts on rather than reports.
_CONTROL_METRICS = ("nonfinite", "checkpoint_requested")


def warn_if_schedule_changed(saved_train: dict[str, Any], train_cfg: TrainConfig, count: int,
                             checkpoint: str) -> None:
    """Logs (process 0) which learning-rate schedule fields differ from the checkpoint's, and the
    learning rate of the next update under both schedules: resuming with e.g. another
    train.steps silently moves the cosine decay."""
    changed = {f: (saved_train[f], getattr(train_cfg, f)) for f in SCHEDULE_FIELDS
               if f in saved_train and saved_train[f] != getattr(train_cfg, f)}
    if not changed or jax.process_index() != 0:
        return
    saved = dataclasses.replace(train_cfg, **{f: old for f, (old, _) in changed.items()})
    now, before = (float(learning_rate_schedule(cfg)(count)) for cfg in (train_cfg, saved))
    log.warning("the learning-rate schedule differs from the one %s was trained with: %s; the "
                "next update (schedule step %d) uses learning rate %.4g, %.4g under the "
                "checkpoint's schedule", checkpoint,
                ", ".join(f"train.{f} {old} -> {new}" for f, (old, new) in changed.items()),
                count, now, before)


def batch_fill(batch: dict[str, Any]) -> dict[str, float]:
    """Fractions of this host's encoder / decoder positions holding tokens (not padding):
    tokens/s and mfu_padded count every position, mfu only the real tokens."""
    return {f"{side}_fill": float((batch[f"{side}_segment_ids"] > 0).mean())
            for side in ("encoder", "decoder")}


def summary(metrics: dict[str, Any]) -> str:
    return json.dumps({k: round(v, 6) for k, v in metrics.items()})
