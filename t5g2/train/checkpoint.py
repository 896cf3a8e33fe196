"""Orbax checkpoints of a training run, under <workdir>/checkpoints/<step>/.

Each step directory holds four items:
  params, opt_state  the train state's arrays as flat {name: array} dicts. Every process writes
                     its own shards; a restore reads the shards the *target* mesh needs, so a
                     checkpoint saved on one mesh restores onto another without gathering.
  data               one JSON file per process, process_<i>-of-<n>.json: that process's
                     batch-source position. A run on another number of processes reads them all
                     and its batch source continues the global position (`Restored.all_data`).
  meta               JSON: step, the run's config, and a fingerprint of every array.
Saves are asynchronous: the arrays are copied to host memory before `save` returns (the next
step may donate them) and written in the background. Orbax writes into a temporary directory and
renames it when complete (on gs://: writes in place and marks it complete with a commit file), so
a crash during a save leaves the earlier checkpoints intact; the leftover is reported on restart.
The fingerprints (a position-weighted wrapping sum of each array's bits) make a corrupted or
truncated array an error rather than silently wrong weights.
The workdir may be an object-store URL: the directory operations here go through `t5g2.fs`, the
arrays through orbax and tensorstore's own GCS driver, and orbax reads a gs:// bucket's settings
with google-cloud-storage (tests/test_workdir_url.py runs all three against a local GCS server).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding

from t5g2 import fs
from t5g2.configlib import ConfigError
from t5g2.convert.checkpoint_files import CheckpointError  # one error for every checkpoint kind
from t5g2.model import checkpoint_fields
from t5g2.model.params import path_key
from t5g2.train.state import TrainState

log = logging.getLogger(__name__)

FORMAT = "t5g2-checkpoint-1"
CHECKPOINT_DIR = "checkpoints"
ARRAY_ITEMS = ("params", "opt_state")
_TMP_MARK = ".orbax-checkpoint-tmp"
_COMMIT_FILE = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE  # a complete step on gs://
CORRUPT_SUFFIX = ".corrupt"
SUPERSEDED_SUFFIX = ".superseded"


# ----------------------------------------------------------------------------------------------
# Flat names: each array item as {"encoder.layers...": leaf}, the parameters' module paths
# (`t5g2.model.params.path_key`) joined by "." (the names are the format's: FORMAT fixes them).

def _key_name(path) -> str:
    return path_key(path, ".")


def flatten(tree: Any, is_leaf=None) -> dict[str, Any]:
    """{dotted name: leaf}; nnx Variables are named by their module path."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {_key_name(path): leaf for path, leaf in leaves}


def _is_sharding(x) -> bool:
    return isinstance(x, NamedSharding)


def abstract_items(abstract_state: TrainState, shardings: TrainState, items=ARRAY_ITEMS
                   ) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    """The array items as ShapeDtypeStructs carrying the target shardings."""
    abstract = {}
    for item in items:
        shapes = flatten(getattr(abstract_state, item))
        placed = flatten(getattr(shardings, item), is_leaf=_is_sharding)
        abstract[item] = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=placed[k])
                          for k, v in shapes.items()}
    return abstract


def unflatten(template: Any, flat: Mapping[str, Any]) -> Any:
    """`flat` (names from `flatten(template)`) back into the structure of `template`."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(treedef, [flat[_key_name(p)] for p, _ in leaves])


# ----------------------------------------------------------------------------------------------
# Fingerprints.

def _fingerprint(x: jax.Array) -> jax.Array:
    """sum_i bits(x_i) * (2 i + 1) mod 2^32: any changed element changes it (the weights are
    odd, so invertible mod 2^32), and wrapping integer sums are exact in any shard order."""
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride)
        stride = (stride * x.shape[axis]) % 2**32
    return jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _fingerprints(arrays: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: _fingerprint(v) for k, v in arrays.items()}


def start_fingerprints(items: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, jax.Array]:
    """{"item/name": fingerprint}, dispatched without waiting: the values are device arrays."""
    return {f"{item}/{k}": v for item, arrays in items.items()
            for k, v in _fingerprints(dict(arrays)).items()}


def fingerprints(items: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, int]:
    return {k: int(v) for k, v in jax.device_get(start_fingerprints(items)).items()}


class MetaHandler(ocp.JsonCheckpointHandler):
    """orbax's JSON handler, fetching the fingerprints in its background write: a save blocks
    the training loop only for orbax's device-to-host copy, not for the reduction."""

    async def _save_fn(self, x, directory):
        x = dict(x, fingerprints={k: int(v) for k, v in
                                  jax.device_get(x["fingerprints"]).items()})
        await super()._save_fn(x, directory)


# ----------------------------------------------------------------------------------------------
# One JSON file per process (orbax's JSON handler writes on the primary process only).

_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


class ProcessJsonHandler(ocp.JsonCheckpointHandler):
    """Saves each process's own JSON (its data-iterator position) as process_<i>-of-<n>.json.

    Restores {"process_count": n, "states": {i: JSON}}: this process's own file when n is the
    current process count, every file otherwise (a resized run continues from all of them).
    Another process count is no damage; a file missing from the set of n is."""

    @staticmethod
    def _name() -> str:
        return f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    async def _save_fn(self, x, directory):
        (directory / self._name()).write_text(json.dumps(x))

    def restore(self, directory, item=None, args=None):
        names = sorted(p.name for p in directory.iterdir())
        files: dict[int, dict[int, Any]] = {}
        for name in names:
            match = _PROCESS_FILE.fullmatch(name)
            if match:
                files.setdefault(int(match[2]), {})[int(match[1])] = directory / name
        if len(files) != 1:
            raise CheckpointError(f"{directory}: expected process_<i>-of-<n>.json for one n, "
                                  f"found {names}")
        (count, paths), = files.items()
        if set(paths) != set(range(count)):
            raise CheckpointError(f"{directory}: the data positions of {count} processes are "
                                  f"process_0-of-{count}.json ... process_{count - 1}-of-"
                                  f"{count}.json; found "
                                  f"{[name for name in names if _PROCESS_FILE.fullmatch(name)]}")
        wanted = [jax.process_index()] if count == jax.process_count() else range(count)
        return {"process_count": count,
                "states": {i: json.loads(paths[i].read_text()) for i in wanted}}


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    item: Any = None


# ----------------------------------------------------------------------------------------------
# Config compatibility.

# Model fields added after the first t5g2 checkpoints, and what a saved config without one
# described: no vision tower; and a begin-of-image id nothing depended on (an ordinary token of a
# model without a tower), so whatever the run sets now.
_FIELDS_ADDED_LATER = {"vision": lambda now: None, "boi_token_id": lambda now: now}


def model_differences(saved_config: Mapping[str, Any], config: Mapping[str, Any],
                      saved_in: str = "the checkpoint") -> list[str]:
    """Model-config fields that differ from the checkpoint's: all but those that only change
    how the model computes (`checkpoint_fields.COMPUTE_FIELDS`; the module says why)."""
    saved, now = dict(saved_config.get("model", {})), config.get("model", {})
    for field, meant in _FIELDS_ADDED_LATER.items():
        if field not in saved:
            saved[field] = meant(now.get(field))
    return [f"model.{field}={before!r} in {saved_in}, {current!r} now"
            for field, before, current in checkpoint_fields.differences(
                saved, now, ignore=checkpoint_fields.COMPUTE_FIELDS)]


def config_as_json(config) -> dict[str, Any]:
    """A ConfigDict as plain JSON data (what the checkpoint records)."""
    return json.loads(config.to_json_best_effort())


# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Restored:
    step: int
    state: TrainState
    data: Any  # this process's batch-source state; None when data_process_count differs
    config: dict[str, Any]
    path: str
    data_process_count: int | None = None  # how many processes saved the data states
    all_data: list[Any] | None = None  # when that count differs: every one's state, by index


class Checkpointer:
    """Saves and restores a run's checkpoints under <workdir>/checkpoints.

    every: `should_save(step)` when step % every == 0 (the loop also saves its last step and on
    SIGTERM). keep: keep the newest `keep`; keep_period: also keep every keep_period-th step
    (0: none). read_only: for readers (export). Nothing in the workdir changes until the run has
    been checked against it and calls `prepare_to_continue`.
    """

    def __init__(self, workdir: str, *, every: int = 1, keep: int = 1, keep_period: int = 0,
                 async_save: bool = True, read_only: bool = False):
        for name, value, low in (("every", every, 1), ("keep", keep, 1),
                                 ("keep_period", keep_period, 0)):
            if value < low:
                raise ConfigError(f"checkpoint.{name}={value} must be >= {low}")
        self.directory = fs.absolute(fs.join(workdir, CHECKPOINT_DIR))
        if self.directory.startswith("gs://") and not _gcs_client_installed():
            raise CheckpointError(f"checkpoints in {self.directory} need the google-cloud-storage "
                                  "package, which orbax uses for gs:// but does not install: "
                                  "pip install google-cloud-storage")
        if read_only and not fs.is_dir(self.directory):
            raise CheckpointError(f"{workdir}: no {CHECKPOINT_DIR}/ directory (is this the "
                                  "workdir of a training run?)")
        self.interrupted = interrupted_saves(self.directory)
        for path in [] if read_only else self.interrupted:
            log.warning("found %s: a save was interrupted before it completed; it is ignored, "
                        "the earlier checkpoints are intact", path)
        self.every = every
        handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item in ARRAY_ITEMS:
            handlers.add(item, ocp.args.StandardSave, ocp.StandardCheckpointHandler())
            handlers.add(item, ocp.args.StandardRestore, ocp.StandardCheckpointHandler())
        handlers.add("data", ProcessJsonSave, ProcessJsonHandler())
        handlers.add("data", ProcessJsonRestore, ProcessJsonHandler())
        handlers.add("meta", ocp.args.JsonSave, MetaHandler())
        handlers.add("meta", ocp.args.JsonRestore, MetaHandler())
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_period or None,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=False,
            create=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             handler_registry=handlers)

    # -- queries -------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_path(self, step: int) -> str:
        return fs.join(self.directory, str(step))

    def saved_config(self, step: int) -> dict[str, Any]:
        return self._meta(step)["config"]

    def _meta(self, step: int) -> dict[str, Any]:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # noqa: BLE001 - orbax/json raise many types; say which file
            raise CheckpointError(f"checkpoint {self.step_path(step)}: unreadable metadata "
                                  f"({type(e).__name__}: {e})") from e
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {self.step_path(step)}: format "
                                  f"{meta.get('format')!r}, this version reads {FORMAT}")
        return meta

    # -- save ----------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state: TrainState, data_state: Any,
             config: Mapping[str, Any]) -> None:
        """Starts saving `state` as step `step` (asynchronously; `wait` for it)."""
        if step in self.manager.all_steps():
            raise CheckpointError(f"{self.step_path(step)} already exists; a run continues only "
                                  "from its latest checkpoint (see prepare_to_continue)")
        items = {item: flatten(getattr(state, item)) for item in ARRAY_ITEMS}
        meta = dict(format=FORMAT, step=step, config=dict(config), time=time.time(),
                    fingerprints=start_fingerprints(items))
        args = {item: ocp.args.StandardSave(arrays) for item, arrays in items.items()}
        self.manager.save(step, force=True, args=ocp.args.Composite(
            meta=ocp.args.JsonSave(meta), data=ProcessJsonSave(data_state), **args))

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    # -- restore -------------------------------------------------------------------------------
    def restore(self, step: int, abstract_state: TrainState, shardings: TrainState, *,
                config: Mapping[str, Any] | None = None, items=ARRAY_ITEMS,
                with_data: bool = True) -> Restored:
        """Step `step` placed per `shardings` (any mesh) and checked against its fingerprints.

        abstract_state: the train state's structure (`state.abstract_train_state`); items: which
        array items to read (export reads only "params"); config: this run's config, which must
        describe the same model as the checkpoint's. A mismatch (model fields, or arrays this
        config lays out differently) is a ConfigError; an unreadable or altered checkpoint a
        CheckpointError, raised by every process alike.
        """
        meta = self._meta(step)
        if config is not None:
            check_compatible(meta["config"], config, os.path.dirname(self.directory))
        abstract = abstract_items(abstract_state, shardings, items)
        self._check_layout(step, abstract)
        args = {item: ocp.args.StandardRestore(abstract[item]) for item in items}
        if with_data:
            args["data"] = ProcessJsonRestore()
        error = None
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001 - tensorstore/orbax errors for missing/bad files
            # tensorstore appends its whole spec, which says nothing more
            reason = re.split(r" \[tensorstore_spec| See full TensorStore", str(e))[0][:600]
            error = f"{type(e).__name__}: {reason}"
        if not _everywhere(error is None):  # the fingerprints below are collective
            raise CheckpointError(f"checkpoint {self.step_path(step)} is unreadable "
                                  f"({error or 'on another process'})")
        arrays = {item: restored[item] for item in items}
        expected = meta.get("fingerprints", {})
        bad = sorted(k for k, v in fingerprints(arrays).items() if expected.get(k) != v)
        if bad:
            raise CheckpointError(f"checkpoint {self.step_path(step)} is corrupt: {len(bad)} "
                                  f"arrays differ from what was saved, e.g. {bad[:3]}")
        parts = {item: unflatten(getattr(abstract_state, item), arrays[item]) if item in arrays
                 else None for item in ARRAY_ITEMS}
        state = TrainState(step=jax.device_put(jnp.asarray(step, jnp.int32), shardings.step),
                           **parts)
        data = restored["data"] if with_data else {"process_count": None, "states": {}}
        resized = data["process_count"] not in (None, jax.process_count())
        return Restored(step=step, state=state, config=meta["config"], path=self.step_path(step),
                        data=data["states"].get(jax.process_index()) if not resized else None,
                        data_process_count=data["process_count"],
                        all_data=[data["states"][i] for i in sorted(data["states"])]
                        if resized else None)

    def _check_layout(self, step: int, abstract: Mapping[str, Mapping[str, Any]]) -> None:
        """The arrays this config expects must be the saved ones (names, shapes, dtypes)."""
        try:
            saved = self.manager.item_metadata(step)
            saved = {item: {k: (tuple(v.shape), str(v.dtype)) for k, v in saved[item].tree.items()}
                     for item in abstract}
        except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable metadata
            raise CheckpointError(f"checkpoint {self.step_path(step)}: unreadable array "
                                  f"metadata ({type(e).__name__}: {e})") from e
        problems = []
        for item, arrays in abstract.items():
            wanted = {k: (tuple(v.shape), str(v.dtype)) for k, v in arrays.items()}
            missing = sorted(wanted.keys() - saved[item])
            extra = sorted(saved[item] - wanted.keys())
            if missing or extra:
                problems.append(f"{item}: this config has {missing[:3]} the checkpoint lacks, "
                                f"the checkpoint has {extra[:3]} this config lacks")
            problems += [f"{item}/{k}: {saved[item][k]} saved, {wanted[k]} now"
                         for k in sorted(wanted.keys() & saved[item].keys())
                         if wanted[k] != saved[item][k]][:3]
        if problems:
            raise ConfigError(f"{self.step_path(step)} was saved with a different layout (an "
                              "optimizer setting such as train.grad_clip_norm, or "
                              "model.param_dtype / scan_layers changed?): " + "; ".join(problems))

    def resume(self, abstract_state: TrainState, shardings: TrainState, *,
               config: Mapping[str, Any] | None = None, step: int | None = None,
               fallback: bool = False) -> Restored | None:
        """The checkpoint a run continues from: step `step`, else the newest; None when there is
        none. A bad newest checkpoint is an error unless `fallback`, which moves it aside and
        tries the next; when every checkpoint is bad that is an error too."""
        steps = self.steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"checkpoint.restore_step={step}: {self.directory} has "
                                      f"steps {steps or 'none'}")
            return self.restore(step, abstract_state, shardings, config=config)
        for newest in reversed(steps):
            try:
                return self.restore(newest, abstract_state, shardings, config=config)
            except CheckpointError as e:
                earlier = [s for s in steps if s < newest]
                if not fallback:
                    hint = (f"; the newest earlier checkpoint is step {earlier[-1]}: rerun with "
                            "--config.checkpoint.fallback=true to resume from it (the bad one "
                            f"is moved to {newest}{CORRUPT_SUFFIX}), or --config.checkpoint."
                            f"restore_step={earlier[-1]}" if earlier else
                            "; there is no earlier checkpoint")
                    raise CheckpointError(f"{e}{hint}") from e
                log.warning("%s; falling back to an earlier checkpoint", e)
                self._move_aside(newest, CORRUPT_SUFFIX)
        if steps:
            raise CheckpointError(f"no usable checkpoint left in {self.directory}: all "
                                  f"{len(steps)} were moved to <step>{CORRUPT_SUFFIX}; use "
                                  "another --workdir (or remove these) to start afresh")
        return None

    def prepare_to_continue(self, step: int) -> None:
        """Once the run has been checked against the workdir: removes interrupted saves and
        moves checkpoints newer than `step` (a run restored at an earlier step) aside, so the
        continuation saves its own steps and a restart resumes it, not the old line."""
        if jax.process_index() == 0:
            for path in self.interrupted:
                fs.rmtree(path)
        _sync("t5g2-checkpoint-cleanup")
        for newer in [s for s in self.steps() if s > step]:
            log.warning("checkpoint %d is newer than the restored step %d: moving it to %s",
                        newer, step, self.step_path(newer) + SUPERSEDED_SUFFIX)
            self._move_aside(newer, SUPERSEDED_SUFFIX)
        self.interrupted = []

    def _move_aside(self, step: int, suffix: str) -> None:
        if jax.process_index() == 0:
            move_aside(self.step_path(step), suffix)
        _sync(f"t5g2-checkpoint-move-{step}")
        self.manager.reload()


def _everywhere(ok: bool) -> bool:
    """Whether `ok` holds on every process (all processes must call this together)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def interrupted_saves(directory: str) -> list[str]:
    """Step directories an interrupted save left behind: orbax's temporary
    `<step>.orbax-checkpoint-tmp-*`, and on gs://, where orbax writes a step in place and marks it
    complete with a commit file, a `<step>` without that file."""
    if not fs.is_dir(directory):
        return []
    names = fs.listdir(directory)
    found = [name for name in names if _TMP_MARK in name]
    if directory.startswith("gs://"):
        found += [name for name in names if name.isdigit()
                  and not fs.exists(fs.join(fs.join(directory, name), _COMMIT_FILE))]
    return sorted(fs.join(directory, name) for name in found)


def move_aside(step_dir: str, suffix: str) -> str:
    """Renames a step directory to <step><suffix> (<step><suffix>-2, ... when that is taken: the
    earlier evidence stays), where orbax no longer takes it for a step; returns the new path."""
    target, n = step_dir + suffix, 1
    while fs.exists(target):
        n += 1
        target = f"{step_dir}{suffix}-{n}"
    fs.rename(step_dir, target)
    return target


def _gcs_client_installed() -> bool:
    """Whether google-cloud-storage is importable (orbax reads a gs:// bucket's settings with it
    when it lists the checkpoints, yet does not depend on it)."""
    try:
        return importlib.util.find_spec("google.cloud.storage") is not None
    except ImportError:  # not even the google.cloud namespace
        return False


def check_compatible(saved_config: Mapping[str, Any], config: Mapping[str, Any], where: str,
                     saved_in: str = "the checkpoint") -> None:
    """A workdir of a different model is an error naming each differing field."""
    differences = model_differences(saved_config, config, saved_in)
    if differences:
        raise ConfigError(f"{where} holds a run of a different model: " + "; ".join(differences)
                          + f". Use another --workdir or {saved_in}'s config; nothing was "
                          "written.")
