"""Meshes and logical axis rules: the same numbers on every mesh, parameters placed by the rules,
clear errors with the numbers when something does not divide."""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from t5g2 import sharding
from t5g2.sharding import ShardingError
from t5g2.train.config import TrainConfig
from t5g2.train.optimizer import make_optimizer
from t5g2.train.state import init_train_state, state_shardings
from t5g2.train.step import loss_function, make_train_step
from tests.reference import SMALL_STACK, tiny_config

MESHES = [dict(data=1, fsdp=1, tensor=1), dict(data=8, fsdp=1, tensor=1),
          dict(data=1, fsdp=8, tensor=1), dict(data=2, fsdp=2, tensor=2)]
CFG = tiny_config(num_kv_heads=2, **SMALL_STACK)
TRAIN = TrainConfig(batch_size=16, encoder_length=16, decoder_length=8, steps=10,
                    learning_rate=1e-3, warmup_steps=1)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    b, s, t = TRAIN.batch_size, TRAIN.encoder_length, TRAIN.decoder_length
    enc_seg = np.ones((b, s), np.int32)
    enc_seg[::3, -4:] = 0  # some padding
    return dict(encoder_input_tokens=rng.integers(3, 400, (b, s), dtype=np.int32),
                encoder_segment_ids=enc_seg,
                decoder_input_tokens=rng.integers(3, 400, (b, t), dtype=np.int32),
                decoder_target_tokens=rng.integers(3, 400, (b, t), dtype=np.int32),
                decoder_loss_weights=(rng.random((b, t)) > 0.2).astype(np.float32))


def _mesh(shape):
    return sharding.make_mesh(shape, jax.devices()[:int(np.prod(list(shape.values())))])


def _run(shape, steps, optimizer, with_grads=True):
    """(loss, grads) at init (None, None without `with_grads`), then (losses, params) over
    `steps` optimizer steps, on one mesh."""
    mesh = _mesh(shape)
    tx, schedule = optimizer
    shardings = state_shardings(CFG, tx, mesh)
    state = init_train_state(CFG, tx, mesh, seed=0)
    batch = sharding.global_batch_from_host(_batch(), mesh)
    to_np = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]  # noqa: E731
    loss = grads = None
    if with_grads:
        grad_fn = jax.jit(jax.grad(loss_function(CFG, 0.0), has_aux=True))
        with sharding.use_mesh(mesh):
            grads, sums = grad_fn(state.params, batch)
        loss, grads = float(sums.cross_entropy / sums.weight), to_np(grads)
    step = make_train_step(CFG, TRAIN, tx, schedule, mesh, shardings)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return loss, grads, losses, to_np(state.params)


# SGD with momentum: updates are linear in the gradients, so parameters must agree to float32
# precision. (Adam divides by sqrt(v) and turns last-bit differences of near-zero gradients into
# different fractions of a step; the AdamW test below compares losses instead.)
SGD = (optax.sgd(0.1, momentum=0.9), optax.constant_schedule(0.1))


@functools.cache
def _sgd_reference():
    return _run(MESHES[0], 3, SGD)


# The mixed mesh shards all three axes at once; the one-axis meshes (each a compile of its own)
# run with -m slow.
@pytest.mark.parametrize("shape", [
    pytest.param(MESHES[1], id="data8", marks=pytest.mark.slow),
    pytest.param(MESHES[2], id="fsdp8", marks=pytest.mark.slow),
    pytest.param(MESHES[3], id="data2_fsdp2_tensor2"),
])
def test_same_loss_gradients_and_updates_on_every_mesh(shape):
    reference = _sgd_reference()
    loss, grads, losses, params = _run(shape, 3, SGD)
    assert loss == pytest.approx(reference[0], abs=1e-5), shape
    for g, g_ref in zip(grads, reference[1]):
        assert np.abs(g - g_ref).max() <= 1e-5 * np.abs(g_ref).max() + 1e-7, shape
    np.testing.assert_allclose(losses, reference[2], atol=1e-5, err_msg=str(shape))
    for p, p_ref in zip(params, reference[3]):
        np.testing.assert_allclose(p, p_ref, atol=1e-5, err_msg=str(shape))


@pytest.mark.slow  # test_same_loss_gradients_and_updates_on_every_mesh checks one step by default
def test_adamw_training_agrees_across_meshes():
    adamw = make_optimizer(TRAIN)
    reference = _run(MESHES[0], 4, adamw, with_grads=False)[2]
    assert reference[-1] < reference[0]
    np.testing.assert_allclose(_run(MESHES[3], 4, adamw, with_grads=False)[2], reference,
                               atol=1e-4)


def test_parameters_are_placed_by_the_rules():
    mesh = _mesh(dict(data=2, fsdp=2, tensor=2))
    tx, _ = make_optimizer(TRAIN)
    state = init_train_state(CFG, tx, mesh, seed=0)
    params = dict(nnx.to_flat_state(state.params))
    spec = lambda *path: params[path][...].sharding.spec  # noqa: E731
    # The tied table: vocab over tensor, embed over fsdp -- never whole on one device.
    assert spec("embed", "table") == P("tensor", "fsdp")
    assert spec("encoder", "layers", "periods", "layers", 0, "attn", "q") == \
        P(None, "fsdp", "tensor", None)
    assert spec("decoder", "layers", "tail", 0, "attn", "o") == P("tensor", None, "fsdp")
    assert spec("decoder", "layers", "periods", "layers", 1, "mlp", "down") == \
        P(None, "tensor", "fsdp")
    assert spec("encoder", "final_norm", "scale") == P("fsdp")
    table = params[("embed", "table")][...]
    assert {s.data.shape for s in table.addressable_shards} == {(256, 32)}
    for path, var in params.items():  # every parameter: exactly what its logical names say
        expected = sharding.logical_to_spec(var.get_metadata()["out_sharding"], var.shape, mesh)
        assert var[...].sharding.spec == expected, path


def test_kv_heads_fewer_than_tensor_axis_are_replicated():
    cfg = tiny_config(num_kv_heads=1, **SMALL_STACK)
    mesh = _mesh(dict(data=2, fsdp=2, tensor=2))
    tx, _ = make_optimizer(TRAIN)
    shardings = state_shardings(cfg, tx, mesh)
    k = dict(nnx.to_flat_state(shardings.params))[("encoder", "layers", "tail", 0, "attn", "k")]
    assert k.spec == P("fsdp", None, None)


@pytest.mark.parametrize("shape, message", [
    (dict(data=3, fsdp=1, tensor=1), r"mesh data=3 x fsdp=1 x tensor=1 has 3 devices per slice, "
                                     r"but there are 8"),
    (dict(data=-1, fsdp=3, tensor=1), r"3 does not divide the 8 devices per slice"),
    (dict(data=-1, fsdp=-1, tensor=1), r"at most one axis may be -1"),
    (dict(data=-1, fsdp=1, tensor=1, dcn_data=3), r"8 devices do not split into 3 DCN slices"),
])
def test_mesh_that_does_not_fit_the_devices(shape, message):
    with pytest.raises(ShardingError, match=message):
        sharding.make_mesh(shape)


def test_model_and_batch_that_do_not_fit_the_mesh():
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=8))
    with pytest.raises(ShardingError, match=r"model.encoder.num_heads=4 is not divisible by "
                                            r"mesh.tensor=8"):
        sharding.check_model_fits_mesh(CFG, mesh)
    mesh = sharding.make_mesh(dict(data=4, fsdp=2, tensor=1))
    with pytest.raises(ShardingError, match=r"train.batch_size=12 is not divisible by the data "
                                            r"axes \('data', 'fsdp'\) of size 8"):
        sharding.check_batch_fits_mesh(12, mesh)
