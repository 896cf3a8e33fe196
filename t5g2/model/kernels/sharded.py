"""Running a fused attention kernel on each device's shard of the batch and heads.

A Pallas kernel is one opaque call that XLA's partitioner cannot split, so under a mesh it runs
inside `shard_map`: each device attends its own rows and heads, with the same specs the rule
table gives the activations (batch over data/fsdp, heads over tensor). Without an active mesh
the kernel runs as is.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from t5g2 import sharding
from t5g2.model.kernels import Unsupported
from t5g2.model.masks import KVPart

Q_AXES = ("batch", "length", "heads", "head_dim")
KV_AXES = ("batch", "length", "kv_heads", "head_dim")
IDS_AXES = ("batch", "length")


def over_batch_and_heads(fn: Callable[[jax.Array, Sequence[KVPart]], jax.Array], q: jax.Array,
                         parts: Sequence[KVPart]) -> jax.Array:
    """fn(q, parts) -> [B,T,N,H], applied per shard of the active mesh (or directly)."""
    active = sharding.active_mesh()
    if active is None:
        return fn(q, parts)
    mesh, rules = active
    try:
        q_spec = sharding.logical_to_spec(Q_AXES, q.shape, mesh, rules)
        part_specs = [tuple(sharding.logical_to_spec(axes, x.shape, mesh, rules)
                            for axes, x in zip((KV_AXES, KV_AXES), (k, v))) for k, v, _ in parts]
        ids_spec = sharding.logical_to_spec(IDS_AXES, q.shape[:2], mesh, rules)
    except sharding.ShardingError as why:
        raise Unsupported(f"the shapes do not divide the mesh: {why}") from None
    heads_sharded = q_spec[2] is not None
    for k_spec, _ in part_specs:
        if heads_sharded and k_spec[2] is None and parts[0][0].shape[2] > 1:
            raise Unsupported("query heads are sharded but the several kv heads are replicated, "
                              "so a shard's query heads would not find their kv head")
    mask_specs = [jax.tree.map(lambda _: ids_spec, m) for _, _, m in parts]
    in_specs = (q_spec, [[ks, vs, ms] for (ks, vs), ms in zip(part_specs, mask_specs)])
    mapped = jax.shard_map(lambda q_, parts_: fn(q_, [tuple(p) for p in parts_]), mesh=mesh,
                           in_specs=in_specs, out_specs=q_spec, check_vma=False)
    return mapped(q, [list(p) for p in parts])

