"""Training with a vision tower: what `model.vision.trainable` freezes gets no update, no
optimizer state and no activations kept for a backward pass; the rest trains as before."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from t5g2 import sharding
from t5g2.model.config import VisionConfig
from t5g2.model.params import path_key
from t5g2.train.checkpoint import Checkpointer, flatten
from t5g2.train.config import TrainConfig
from t5g2.train.optimizer import make_optimizer
from t5g2.train.state import (abstract_train_state, init_train_state, model_graphdef,
                              split_trainable, state_shardings, with_params)
from t5g2.train.step import loss_function, make_train_step, trainable_loss_function
from tests.reference import tiny_config

VISION = VisionConfig(**base.TINY_VISION)
BOI, IMAGE, EOI, NEWLINES = 502, 501, 500, 108  # ids in the tiny vocabulary (EOI, image: tiny.py)
TRAIN = TrainConfig(batch_size=4, encoder_length=24, decoder_length=6, steps=10,
                    learning_rate=1e-2, warmup_steps=0, weight_decay=0.1)
IMAGES_PER_ROW = (2, 1, 0, 0)  # rows 2 and 3 are text only
MAX_IMAGES = 2

# What each setting leaves frozen, written out here rather than taken from the code under test.
FROZEN_PREFIXES = {"none": ("vision/",), "projector": ("vision/tower/",), "all": ()}


def _config(trainable: str, **vision):
    return tiny_config(num_layers=1, boi_token_id=BOI,
                       vision=dataclasses.replace(VISION, trainable=trainable, **vision))


def _is_frozen(name: str, trainable: str) -> bool:
    return name.startswith(FROZEN_PREFIXES[trainable])


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Rows with 2, 1, 0, 0 images: each image laid out as "\\n\\n", BOI, 4 placeholders, EOI,
    "\\n\\n" after a text token, the rest of the row text."""
    rng = np.random.default_rng(seed)
    b, size = TRAIN.batch_size, VISION.image_size
    one_image = [NEWLINES, BOI] + [IMAGE] * VISION.tokens_per_image + [EOI, NEWLINES]
    tokens = rng.integers(3, 480, (b, TRAIN.encoder_length))
    images = np.zeros((b, MAX_IMAGES, size, size, 3), np.float32)
    for row, count in enumerate(IMAGES_PER_ROW):
        tokens[row, 1:1 + count * len(one_image)] = one_image * count
        images[row, :count] = rng.uniform(-1, 1, (count, size, size, 3))
    return {"encoder_input_tokens": tokens.astype(np.int32),
            "encoder_images": images,
            "decoder_input_tokens": rng.integers(3, 480, (b, TRAIN.decoder_length), np.int32),
            "decoder_target_tokens": rng.integers(3, 480, (b, TRAIN.decoder_length), np.int32),
            "decoder_loss_weights": np.ones((b, TRAIN.decoder_length), np.float32)}


def _flat(tree) -> dict[str, np.ndarray]:
    return {path_key(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _mesh():
    return sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])


@pytest.fixture(scope="module")
def params():
    """Initial parameters (the same for every `trainable`), with a random projection: its zero
    initialisation would leave the tower and the projector's norm without a gradient."""
    cfg = _config("all")
    tx, _ = make_optimizer(TRAIN)
    key = jax.random.key(1)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: (jax.random.normal(key, x.shape, x.dtype) * 0.2
                      if path_key(p) == "vision/projector/projection" else x),
        init_train_state(cfg, tx, _mesh(), seed=0).params)


def _train_step(cfg, params, train_cfg=TRAIN):
    """(state around a copy of `params`, the jitted train step) for `cfg`."""
    mesh = _mesh()
    tx, schedule = make_optimizer(train_cfg)
    shardings = state_shardings(cfg, tx, mesh)
    state = with_params(jax.tree.map(jnp.copy, params), cfg, tx, shardings)  # the step donates
    return state, make_train_step(cfg, train_cfg, tx, schedule, mesh, shardings)


def _optimizer_bytes(opt_state) -> tuple[int, int, int]:
    """Bytes of the optimizer state's arrays: (those kept for vision parameters, for the other
    parameters, its scalars: the update counts)."""
    vision = other = scalars = 0
    for path, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        name, size = path_key(path), x.size * x.dtype.itemsize  # arrays or ShapeDtypeStructs
        if x.ndim == 0:
            scalars += size
        elif "/vision/" in f"/{name}/":
            vision += size
        else:
            other += size
    return vision, other, scalars


def _check_step(trainable, before, state, metrics):
    """Frozen parameters bit-identical, every other one changed, and Adam's two moments kept
    for exactly the trainable ones."""
    after = _flat(state.params)
    frozen = {k for k in before if _is_frozen(k, trainable)}
    assert float(metrics["nonfinite"]) == 0.0
    assert sorted(after) == sorted(before)
    assert [k for k in frozen if after[k].tobytes() != before[k].tobytes()] == []
    assert [k for k in before if k not in frozen and np.array_equal(after[k], before[k])] == []
    vision_bytes, other_bytes, scalar_bytes = _optimizer_bytes(state.opt_state)
    assert vision_bytes == 2 * sum(v.nbytes for k, v in before.items()
                                   if k.startswith("vision/") and k not in frozen)
    assert other_bytes == 2 * sum(v.nbytes for k, v in before.items()
                                  if not k.startswith("vision/"))
    assert scalar_bytes <= 16


@pytest.mark.parametrize("trainable", [
    "none", pytest.param("all", marks=pytest.mark.slow)])  # "projector" runs by default below
def test_a_step_updates_exactly_the_trainable_parameters(params, trainable):
    """On a batch of rows with and without images: "none" leaves the whole vision part
    bit-identical and keeps no optimizer state for it; "all" trains the tower too."""
    cfg = _config(trainable)
    state, step = _train_step(cfg, params)
    before = _flat(state.params)
    assert any(k.startswith("vision/tower/") for k in before)
    state, metrics = step(state, sharding.global_batch_from_host(_batch(), _mesh()))
    _check_step(trainable, before, state, metrics)
    if trainable == "none":
        assert _optimizer_bytes(state.opt_state)[0] == 0


def test_projector_training_with_accumulation_a_skipped_step_and_a_checkpoint(params, tmp_path):
    """trainable="projector": the gradient of the trainable part is the full-parameter gradient
    restricted to it (the reference: jax.grad with respect to every parameter, zero for the
    tower); two accumulated micro-batches report its norm; the tower stays bit-identical while
    the projector trains; a step made nonfinite by a NaN image is skipped whole; the state, its
    optimizer state without the tower, saves and restores exactly."""
    cfg = _config("projector")
    batch = _batch()
    part, frozen = split_trainable(params, cfg)

    @jax.jit
    def both_gradients(params, part, frozen, batch):
        full = jax.grad(lambda p: loss_function(cfg, 0.0)(p, batch)[0])(params)
        trained = jax.grad(lambda t: trainable_loss_function(cfg, 0.0)(t, frozen, batch)[0])(part)
        return full, trained

    full, trained = map(_flat, both_gradients(params, part, frozen, batch))
    assert sorted(trained) == sorted(k for k in full if not _is_frozen(k, "projector"))
    assert sorted(_flat(frozen)) == sorted(k for k in full if _is_frozen(k, "projector"))
    for k, g in trained.items():
        np.testing.assert_allclose(g, full[k], rtol=1e-4, atol=1e-6 * np.abs(full[k]).max(),
                                   err_msg=k)
    assert all(np.any(trained[k]) for k in trained if k.startswith("vision/projector/"))
    assert not any(np.any(full[k]) for k in _flat(frozen))

    train_cfg = dataclasses.replace(TRAIN, grad_accum_steps=2, on_nonfinite="skip")
    state, step = _train_step(cfg, params, train_cfg)
    before = _flat(state.params)
    state, metrics = step(state, sharding.global_batch_from_host(batch, _mesh()))
    _check_step("projector", before, state, metrics)
    weight = batch["decoder_loss_weights"].sum()
    reference_norm = np.sqrt(sum(np.sum((g / weight) ** 2) for g in trained.values()))
    np.testing.assert_allclose(float(metrics["grad_norm"]), reference_norm, rtol=1e-5)

    given, opt_given = _flat(state.params), _flat(state.opt_state)
    bad = dict(batch, encoder_images=batch["encoder_images"].copy())
    bad["encoder_images"][1, 0, 0, 0, 0] = np.nan
    state, metrics = step(state, sharding.global_batch_from_host(bad, _mesh()))
    assert float(metrics["nonfinite"]) == 1.0
    for old, new in ((given, _flat(state.params)), (opt_given, _flat(state.opt_state))):
        assert [k for k in old if old[k].tobytes() != new[k].tobytes()] == []

    checkpointer = Checkpointer(str(tmp_path), async_save=False)
    checkpointer.save(1, state, {"position": 1}, {"model": {}})
    tx, _ = make_optimizer(train_cfg)
    restored = checkpointer.restore(1, abstract_train_state(cfg, tx),
                                    state_shardings(cfg, tx, _mesh())).state
    checkpointer.close()
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for old, new in ((given, _flat(restored.params)), (opt_given, _flat(restored.opt_state))):
        assert [k for k in old if old[k].tobytes() != new[k].tobytes()] == []


def _residual_bytes(cfg) -> int:
    """Bytes that reverse-mode differentiation of the train step's loss keeps for the backward
    pass (the residuals held by `jax.vjp`'s backward function), computed abstractly."""
    part, frozen = split_trainable(model_graphdef(cfg)[1], cfg)
    loss = trainable_loss_function(cfg, 0.0)

    def residuals(part, frozen, batch):
        return jax.tree.leaves(jax.vjp(lambda t: loss(t, frozen, batch)[0], part)[1])

    kept = jax.eval_shape(residuals, part, frozen, _batch())
    return sum(x.size * x.dtype.itemsize for x in kept)


def test_no_activations_are_kept_for_a_frozen_towers_backward():
    """A frozen tower's depth does not change what the backward pass keeps; a trainable one's
    does, by at least one [images, patches, width] activation per added layer."""
    images = TRAIN.batch_size * MAX_IMAGES
    per_layer = images * VISION.patches_per_side ** 2 * VISION.d_model * 4  # float32
    kept = {(trainable, layers): _residual_bytes(_config(trainable, num_layers=layers))
            for trainable in ("none", "projector", "all") for layers in (1, 3)}
    assert kept["none", 1] == kept["none", 3]
    assert kept["projector", 1] == kept["projector", 3]
    assert kept["all", 3] - kept["all", 1] >= 2 * per_layer
    assert max(kept["none", 1], kept["projector", 1]) < kept["all", 1]


def test_a_text_only_models_optimizer_state_is_unchanged():
    """No vision: the optimizer state is the one of all the parameters (optax's own
    `tx.init(params)`), under the same checkpoint names and with the same shardings."""
    cfg = tiny_config(num_layers=1)
    tx, _ = make_optimizer(TRAIN)
    _, params = model_graphdef(cfg)
    trainable, frozen = split_trainable(params, cfg)
    assert jax.tree.leaves(frozen) == []
    assert jax.tree.structure(trainable) == jax.tree.structure(params)
    reference = jax.eval_shape(tx.init, params)
    opt_state = abstract_train_state(cfg, tx).opt_state
    assert jax.tree.structure(opt_state) == jax.tree.structure(reference)
    assert ({k: (v.shape, v.dtype) for k, v in flatten(opt_state).items()}
            == {k: (v.shape, v.dtype) for k, v in flatten(reference).items()})
    shardings = state_shardings(cfg, tx, _mesh()).opt_state
    assert (flatten(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)).keys()
            == flatten(reference).keys())


def test_a_trainable_tower_decays_its_matrices_only(params):
    """Weight decay (a zero gradient isolates it, parameters of ones show it) moves the tower's
    and the projector's kernels and position table, never their biases or norms."""
    tx, _ = make_optimizer(dataclasses.replace(TRAIN, grad_clip_norm=0.0))
    ones = jax.tree.map(jnp.ones_like, params)
    updates = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0])(
        ones)
    decayed = {k for k, u in _flat(updates).items() if k.startswith("vision/") and np.any(u)}
    layer = "vision/tower/layers/periods/layers/0/"
    assert decayed == {"vision/projector/projection", "vision/tower/patch_kernel",
                       "vision/tower/position", *(layer + name for name in (
                           "attn/q", "attn/k", "attn/v", "attn/o", "mlp/fc1", "mlp/fc2"))}
