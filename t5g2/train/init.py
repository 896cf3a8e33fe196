"""Where a fresh run starts: random parameters, an adapted Gemma 3, or a T5Gemma 2 checkpoint;
and, for a model with a vision tower, where the tower starts.

The config file stays the single source of truth: a checkpoint's architecture must equal the
configured one (every difference is an error naming the field and both values), while the run's
own choices (dtypes, remat, and for an adaptation the vocabulary, tying, cross-attention and each
stack's RoPE) come from the config (`t5g2.model.checkpoint_fields` lists them); an adaptation
logs which RoPE settings differ from the source's. Parameters are placed sharded as they load:
each device receives only its slice of the host array, so this works unchanged across processes.

The vision tower (`model.vision`) starts from the text source when that holds one (a T5Gemma 2,
or a multimodal Gemma 3 such as 4B), or from `init.vision_from`, which wins when given: a
T5Gemma 2, a multimodal Gemma 3 or a bare `SiglipVisionModel` save. Gemma 3 270M and 1B are
text-only, so their adaptations name one. The checkpoint's tower must be the configured one
(`vision.trainable` aside: what trains is the run's choice). The projector comes along when the
checkpoint has one into this model's text width; otherwise (a bare SigLIP, or Gemma 3 4B's
2560-wide projector for a 640-wide model) it starts from its initialisation, a zero projection as
in the reference, and must train: `vision.trainable="none"` is refused then, since a frozen zero
projection turns every image into zeros. A run with a tower whose checkpoint holds none and that
names no `init.vision_from` is refused too (a random frozen tower turns images into noise); only
a run from scratch (no init.* at all) starts the tower random, on purpose (smoke tests, compile
checks, a tower trained with `trainable="all"`), with a warning when the tower is frozen. A
text-only run skips a source's tower and counts it in the log.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from t5g2.configlib import ConfigError, build, to_dict
from t5g2.convert import checkpoint_files, gemma3, hf_t5gemma2, siglip
from t5g2.convert.checkpoint_files import CheckpointError
from t5g2.convert.hf_config import TensorSource
from t5g2.model import ModelConfig, checkpoint_fields
from t5g2.model.params import flat_params, path_key
from t5g2.model.vision import Projector
from t5g2.train.state import TrainState, init_train_state, model_graphdef, with_params

log = logging.getLogger(__name__)

# Fields a converted checkpoint does not decide: how this run computes and stores parameters.
RUN_FIELDS = checkpoint_fields.COMPUTE_FIELDS + checkpoint_fields.STORAGE_FIELDS


# The checkpoints a tower loads from (config.json model_type), for messages.
VISION_SOURCES = ("a T5Gemma 2 ('t5gemma2'), a multimodal Gemma 3 ('gemma3') or a SigLIP vision "
                  "model ('siglip_vision_model')")


def init_config(config: ml_collections.ConfigDict):
    """The run's validated `init` section (t5g2.run_config.InitConfig)."""
    from t5g2.run_config import InitConfig

    init = build(InitConfig, to_dict(config.init), "init")
    init.validate()  # at most one text source
    return init


def chosen_init(config: ml_collections.ConfigDict) -> tuple[str, str] | None:
    """("from_gemma3" | "from_t5gemma2", path) as configured, None for random; both is an error."""
    init = init_config(config)
    chosen = [(k, getattr(init, k)) for k in ("from_gemma3", "from_t5gemma2") if getattr(init, k)]
    return chosen[0] if chosen else None


def initial_train_state(config: ml_collections.ConfigDict, model_cfg: ModelConfig,
                        tx: optax.GradientTransformation, mesh: Mesh,
                        shardings: TrainState) -> tuple[TrainState, str]:
    """The state a fresh run starts from and a one-line description of its origin, e.g.
    'random initialisation (seed 0)' or 'Gemma 3 checkpoint /x (adapted: 123 tensors)', followed
    by where the vision tower comes from when `init.vision_from` gives it."""
    vision_from = init_config(config).vision_from
    if vision_from and model_cfg.vision is None:
        raise ConfigError(f"init.vision_from={vision_from!r} is set but model.vision is None (a "
                          "text-only model): set model.vision (configs.base.vision()) or drop "
                          "init.vision_from")
    vision, vision_origin = {}, None  # before the text: a bad tower fails fast
    if vision_from:
        vision, vision_origin = load_vision_tower(vision_from, model_cfg, config.seed)
    chosen = chosen_init(config)
    if chosen is None:
        state = init_train_state(model_cfg, tx, mesh, config.seed)
        origin = (f"random initialisation (seed {config.seed}): no init.from_gemma3 / "
                  "init.from_t5gemma2 given")
        if model_cfg.vision is None:
            return state, origin
        if vision_from is None:
            if model_cfg.vision.trainable != "all":
                log.warning("the vision tower is random and frozen (model.vision.trainable=%r): "
                            "its image tokens say nothing about the images; set "
                            "init.vision_from to start it from a pretrained tower",
                            model_cfg.vision.trainable)
            return state, f"{origin}; the vision tower random too (no init.vision_from)"
        # AdamW's initial state (zero moments, step 0) does not depend on the parameter values.
        params = replace_params(state.params, vision, shardings.params)
        return state.replace(params=params), f"{origin}; {vision_origin}"
    kind, path = chosen
    if kind == "from_gemma3":
        flat, count = _load(path, "Gemma 3", model_cfg,
                            RUN_FIELDS + checkpoint_fields.ADAPTATION_FIELDS,
                            gemma3.config_from_gemma3, gemma3.adapt_state_dict,
                            rope_from_config=True, tower_elsewhere=bool(vision_from))
        origin = f"Gemma 3 checkpoint {path} (adapted: {count} tensors)"
    else:
        flat, count = _load(path, "T5Gemma 2", model_cfg, RUN_FIELDS,
                            hf_t5gemma2.config_from_hf, hf_t5gemma2.from_hf_state_dict,
                            tower_elsewhere=bool(vision_from))
        origin = f"T5Gemma 2 checkpoint {path} ({count} tensors)"
    if vision_from:
        flat.update(vision)
        origin = f"{origin}; {vision_origin}"
    return (with_params(place_params(flat, model_cfg, shardings.params), model_cfg, tx,
                        shardings), origin)


def _load(path: str, kind: str, model_cfg: ModelConfig, run_fields: tuple[str, ...],
          config_from: Callable[..., ModelConfig],
          convert: Callable[[Mapping[str, Any], ModelConfig], dict[str, np.ndarray]],
          rope_from_config: bool = False,
          tower_elsewhere: bool = False) -> tuple[dict[str, np.ndarray], int]:
    """(t5g2 flat params, tensors read) of the checkpoint at `path`, after checking that its
    architecture with this run's `run_fields` (and RoPE if `rope_from_config`) is `model_cfg`.
    Its vision tower is converted when the model has one that comes from here (not
    `tower_elsewhere`, i.e. init.vision_from), and otherwise skipped and counted."""
    hf_config = checkpoint_files.read_config(path)
    try:
        theirs = config_from(hf_config, **{f: getattr(model_cfg, f) for f in run_fields})
    except ConfigError as e:
        raise ConfigError(f"{path}/config.json: {e}") from e
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}/config.json: not a {kind} config ({e!r})") from e
    source = f"the {kind} checkpoint {path}"
    text_cfg, ignore = model_cfg, checkpoint_fields.TRAINING_FIELDS
    if model_cfg.vision is None or tower_elsewhere:
        text_cfg, ignore = dataclasses.replace(model_cfg, vision=None), ("vision",)
    elif theirs.vision is None:
        raise ConfigError(f"model.vision is set but {source} has no vision tower: set "
                          f"init.vision_from to a checkpoint that has one ({VISION_SOURCES}), "
                          "or model.vision=None for a text-only model")
    check_architecture(model_cfg, theirs, source, rope_from_config, ignore)
    state_dict = checkpoint_files.read_state_dict(path)
    try:
        return convert(state_dict, text_cfg), len(state_dict)
    except ConfigError:
        raise
    except (KeyError, ValueError) as e:  # a missing, unexpected or misshapen tensor
        raise CheckpointError(f"{path}: {e.args[0] if e.args else e}") from e


def load_vision_tower(path: str, model_cfg: ModelConfig,
                      seed: int = 0) -> tuple[dict[str, np.ndarray], str]:
    """(t5g2's `vision/...` flat params, a description of their origin) from the checkpoint at
    `path` (init.vision_from): its tower, and its projector when that maps into this model's
    text width, else the projector's initialisation (which must then train)."""
    vision, text_dim = model_cfg.vision, model_cfg.encoder.d_model
    config = checkpoint_files.read_config(path)
    model_type = config.get("model_type")
    try:
        if model_type == "t5gemma2":
            kind, theirs = "T5Gemma 2", hf_t5gemma2.config_from_hf(config).vision
            tower, projector, rename = hf_t5gemma2.TOWER, hf_t5gemma2.PROJECTOR, str
        elif model_type in gemma3.MODEL_TYPES:
            kind, theirs = "Gemma 3", gemma3.vision_config(config)
            tower, projector, rename = gemma3.TOWER, gemma3.PROJECTOR, gemma3.text_key
        elif model_type == "siglip_vision_model":  # no projector: its tokens per image are ours
            kind = "SigLIP vision"
            theirs = siglip.vision_from_hf(config, vision.tokens_per_image, "config")
            tower, projector, rename = "", None, str
        else:
            raise ConfigError(f"model_type={model_type!r}: a vision tower loads from "
                              f"{VISION_SOURCES} checkpoint")
    except ConfigError as e:
        raise ConfigError(f"init.vision_from: {path}/config.json: {e}") from e
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}/config.json: not a {model_type} config ({e!r})") from e
    source = f"the {kind} checkpoint {path} (init.vision_from)"
    if theirs is None:
        raise ConfigError(f"{source} has no vision tower (a text-only model): set "
                          f"init.vision_from to {VISION_SOURCES} checkpoint")
    differ = checkpoint_fields.differences(vision, theirs, ignore=("trainable",))
    if differ:
        raise ConfigError("; ".join(f"model.vision.{name}={a!r} but {source} has {b!r}"
                                    for name, a, b in differ)
                          + ": set model.vision to the checkpoint's tower")

    tensors = {rename(k): v for k, v in checkpoint_files.read_state_dict(path).items()}
    tower = siglip.tower_prefix(TensorSource(tensors, kind), tower)
    kept = {k: v for k, v in tensors.items() if k.startswith(tower)
            and not k.startswith(f"{tower}head.")}  # SigLIP's pooling head: unused
    projection = tensors.get(f"{projector}mm_input_projection_weight") if projector else None
    if projection is not None and projection.shape == (vision.d_model, text_dim):
        kept.update({k: v for k, v in tensors.items() if k.startswith(projector)})
        projector_origin = "with its projector"
    else:
        why = ("it has no projector" if projection is None else
               f"its projector maps into width {projection.shape[-1]}, this model's text "
               f"width is {text_dim}")
        if vision.trainable == "none":
            raise ConfigError(f"model.vision.trainable='none' but {source} gives no projector "
                              f"({why}): the projector would start from its initialisation, "
                              "a zero projection, and frozen turn every image into zeros; set "
                              "model.vision.trainable='projector' (or 'all')")
        projector, projector_origin = None, f"the projector from its init ({why})"
    taken = TensorSource(kept, f"{kind} (init.vision_from)")
    try:
        flat = siglip.take_vision(taken, vision, tower, projector)
        taken.check_all_taken()
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {e.args[0] if e.args else e}") from e
    if projector is None:
        initial = flat_params(Projector(vision, text_dim, param_dtype=np.float32,
                                        rngs=nnx.Rngs(seed)))
        flat.update({f"vision/projector/{name}": value for name, value in initial.items()})
    log.info("init.vision_from=%s: %d of its %d tensors read (the vision tower%s)", path,
             len(kept), len(tensors), "" if projector is None else " and projector")
    return flat, (f"vision tower from {kind} checkpoint {path} ({len(kept)} tensors), "
                  f"{projector_origin}")


def check_architecture(ours: ModelConfig, theirs: ModelConfig, source: str,
                       rope_from_config: bool = False, ignore: tuple[str, ...] = ()) -> None:
    """`theirs` (the architecture of `source`) must equal `ours`, the fields in `ignore` aside;
    with `rope_from_config`, each stack's RoPE is ours whatever theirs is, and one info line
    names each RoPE field that changes (source value -> config value)."""
    rope = checkpoint_fields.ROPE_FIELDS if rope_from_config else ()
    every = checkpoint_fields.differences(ours, theirs, ignore=ignore)
    diffs, changed = [d for d in every if d[0] not in rope], [d for d in every if d[0] in rope]
    if diffs:
        raise ConfigError("; ".join(f"model.{name}={a!r} but {source} has {b!r}"
                                    for name, a, b in diffs)
                          + ": set the config to the checkpoint's values (the config file "
                          "decides the architecture; the checkpoint must match it)")
    if changed:
        log.info("%s: RoPE from the config, not the source (no weight depends on it): %s",
                 source, ", ".join(f"model.{name} {source_value!r} -> {config_value!r}"
                                   for name, config_value, source_value in changed))


def place_params(flat: Mapping[str, np.ndarray], model_cfg: ModelConfig,
                 shardings: nnx.State) -> nnx.State:
    """The model's parameters from host arrays, each device given only its slice (cast to the
    parameter dtype on the way), laid out per `shardings`."""
    _, abstract = model_graphdef(model_cfg)
    model_keys = {path_key(p) for p, _ in nnx.to_flat_state(shardings)}
    if set(flat) != model_keys:
        raise ValueError(f"converted keys differ from the model's: missing "
                         f"{sorted(model_keys - set(flat))[:8]}, unexpected "
                         f"{sorted(set(flat) - model_keys)[:8]}")
    return replace_params(abstract, flat, shardings)


def replace_params(params: nnx.State, flat: Mapping[str, np.ndarray],
                   shardings: nnx.State) -> nnx.State:
    """`params` (arrays or abstract) with each parameter that `flat` names replaced by its host
    array, placed as `place_params` does; the others kept as they are."""
    by_key = {path_key(p): s for p, s in nnx.to_flat_state(shardings)}
    unknown = sorted(set(flat) - set(by_key))
    if unknown:
        raise ValueError(f"the model has no parameters {unknown[:8]}")
    placed = []
    for path, var in nnx.to_flat_state(params):
        key = path_key(path)
        if key not in flat:
            placed.append((path, var))
            continue
        host = flat[key]
        if tuple(host.shape) != tuple(var.shape):
            raise CheckpointError(f"parameter {key}: the checkpoint gives shape "
                                  f"{tuple(host.shape)}, the model has {tuple(var.shape)}")
        array = jax.make_array_from_callback(
            var.shape, by_key[key],
            lambda index, host=host, dtype=var.dtype: np.asarray(host[index], dtype=dtype))
        placed.append((path, var.replace(array)))
    return nnx.from_flat_state(placed)
