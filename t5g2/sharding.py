"""Device meshes, logical axis rules, and sharding constraints.

One mesh with named axes (`data`, `fsdp`, `tensor`), built from the config for one CPU, an
8-device CPU mesh, a GPU host or a TPU pod (ICI within a slice, DCN across slices or hosts).
Parameters and activations name logical axes (`vocab`, `embed`, `heads`, `batch`...); one rule
table maps those names to mesh axes. No module names a mesh axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Parameters: the tied table is vocab x embed = tensor x fsdp, so it is
# never whole on one device; Megatron-style tensor parallelism over heads and the MLP width.
# Activations: the batch over data and fsdp; logits over vocab along tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    # The vision tower's patch kernel, position table and projector input: small, replicated
    # (its width, heads and MLP shard like the text model's through embed / heads / mlp).
    ("patch", None),
    ("channels", None),
    ("image_patches", None),
    ("vision_embed", None),
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_vocab", "tensor"),
)
# With fewer kv heads than the tensor axis (Gemma 3 270M/1B have one), k/v are replicated.
REPLICATE_IF_INDIVISIBLE = frozenset({"kv_heads"})


class ShardingError(ValueError):
    """The mesh does not fit the devices, the model or the batch; the message has the numbers."""


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[dict[str, int],
                                                                      dict[str, int]]:
    """(ICI shape, DCN shape) per mesh axis; one ICI axis may be -1 ('the rest')."""
    ici = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
    dcn = {a: int(mesh_cfg.get(f"dcn_{a}", 1)) for a in MESH_AXES}
    described = " x ".join(f"{a}={ici[a]}" for a in MESH_AXES)
    for a, n in {**ici, **{f"dcn_{k}": v for k, v in dcn.items()}}.items():
        if n == 0 or n < -1 or (n == -1 and a.startswith("dcn_")):
            raise ShardingError(f"mesh.{a}={n}: sizes are positive (one ICI axis may be -1)")
    num_slices = math.prod(dcn.values())
    if num_devices % num_slices:
        raise ShardingError(f"{num_devices} devices do not split into {num_slices} DCN slices")
    per_slice = num_devices // num_slices
    rest = [a for a in MESH_AXES if ici[a] == -1]
    if len(rest) > 1:
        raise ShardingError(f"mesh {described}: at most one axis may be -1")
    known = math.prod(n for n in ici.values() if n != -1)
    if rest:
        if per_slice % known:
            raise ShardingError(f"mesh {described}: {known} does not divide the {per_slice} "
                                "devices per slice")
        ici[rest[0]] = per_slice // known
    if math.prod(ici.values()) != per_slice:
        raise ShardingError(f"mesh {described} has {math.prod(ici.values())} devices per slice, "
                            f"but there are {per_slice} ({num_devices} devices, {num_slices} "
                            "slices)")
    return ici, dcn


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = mesh_shape(mesh_cfg, len(devices))
    ici_shape = tuple(ici[a] for a in MESH_AXES)
    dcn_shape = tuple(dcn[a] for a in MESH_AXES)
    if math.prod(dcn_shape) > 1:
        # TPU slices are the DCN granules; elsewhere (GPU hosts, CPU processes, whose devices
        # all report slice 0) each process is one.
        slices = {getattr(d, "slice_index", 0) for d in devices}
        by_process = len(slices) == 1
        array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                     process_is_granule=by_process)
    else:
        array = mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
    return Mesh(array, MESH_AXES)


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(names: Sequence[str], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                    where: str = "array") -> PartitionSpec:
    """The PartitionSpec for logical axis `names` of an array of `shape`, checked to divide."""
    table = dict(rules)
    spec = []
    for name, size in zip(names, shape):
        if name not in table:
            raise ShardingError(f"{where}: logical axis {name!r} has no sharding rule")
        axes = table[name]
        n = _axis_size(mesh, axes)
        if size % n:
            if name in REPLICATE_IF_INDIVISIBLE:
                axes = None
            else:
                raise ShardingError(f"{where}: axis {name!r} of size {size} is not divisible by "
                                    f"mesh axes {axes} of size {n}")
        spec.append(axes)
    return PartitionSpec(*spec)


def param_shardings(params: nnx.State, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> nnx.State:
    """A NamedSharding for every parameter, from its logical axis names (a pytree prefix)."""
    def sharding(path, var):
        names = var.get_metadata()["out_sharding"]
        where = "/".join(str(p) for p in path)
        return NamedSharding(mesh, logical_to_spec(names, var.shape, mesh, rules, where))

    return nnx.map_state(sharding, params)


def check_model_fits_mesh(model_cfg, mesh: Mesh) -> None:
    """Heads and MLP widths must split evenly over the tensor axis; say so with the numbers."""
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    parts = {f"model.{side}": getattr(model_cfg, side) for side in ("encoder", "decoder")}
    if model_cfg.vision is not None:
        parts["model.vision"] = model_cfg.vision
    for prefix, s in parts.items():
        for field, value, axis, n in (("num_heads", s.num_heads, "tensor", tensor),
                                      ("ffn_dim", s.ffn_dim, "tensor", tensor),
                                      ("d_model", s.d_model, "fsdp", fsdp)):
            if value % n:
                raise ShardingError(f"{prefix}.{field}={value} is not divisible by "
                                    f"mesh.{axis}={n}")
    if model_cfg.vocab_size % tensor:
        raise ShardingError(f"model.vocab_size={model_cfg.vocab_size} is not divisible by "
                            f"mesh.tensor={tensor}")


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(dict(rules)["batch"], None))


def batch_divisor(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> int:
    """The number of shards of the batch axis: a global batch's size must be a multiple."""
    return _axis_size(mesh, dict(rules)["batch"])


def check_batch_fits_mesh(global_batch: int, mesh: Mesh,
                          rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> None:
    axes = dict(rules)["batch"]
    n = batch_divisor(mesh, rules)
    if global_batch % n:
        raise ShardingError(f"train.batch_size={global_batch} is not divisible by the data axes "
                            f"{axes} of size {n}")


# Activation constraints: the model calls `constrain(x, names)`; it is a no-op unless a mesh and
# rules are active (`use_mesh`), so the same model code runs unsharded in tests.
_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar(
    "t5g2_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Iterator[Mesh]:
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> tuple[Mesh, tuple] | None:
    """The (mesh, rules) `use_mesh` set, or None: part of a compiled function's identity when it
    constrains activations (a trace inside `use_mesh` must not serve outside it)."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str]) -> jax.Array:
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(names, x.shape, mesh, rules, where="activation")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{a}={n}" for a, n in mesh.shape.items()) + f" ({mesh.size} devices)"


def host_local_batch_size(global_batch: int) -> int:
    """Each JAX process feeds only its share of the global batch."""
    n = jax.process_count()
    if global_batch % n:
        raise ShardingError(f"train.batch_size={global_batch} is not divisible by the "
                            f"{n} processes")
    return global_batch // n


def global_batch_from_host(local: Mapping[str, np.ndarray], mesh: Mesh,
                           rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> dict:
    """Assembles each host's slice into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh, rules)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}
