"""A stack of layers run as scanned periods of the attention pattern plus an unscanned tail.

The periods share one structure, so their parameters carry a leading `layers` axis and run under
one `lax.scan`, keeping compile time flat in depth; layers past the last whole period form a
short tail (e.g. 26 = 4 x 6 + 2). Used by both text stacks and the vision tower.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from t5g2.model.kernels.xla import SAVED_NAMES
from t5g2.sharding import constrain

RESIDUAL = ("batch", "length", "act_embed")  # logical axes of the residual stream


class Period(nnx.Module):
    """One period of the attention pattern (e.g. 5 local layers and 1 global)."""

    def __init__(self, layers: list[nnx.Module]):
        self.layers = nnx.List(layers)


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole period in the backward pass
    # Projections' matmuls and the attention's output and log-sum-exp (not its batched einsums:
    # score-sized), so the backward never recomputes an attention forward.
    "save_dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES)),
}


class LayerStack(nnx.Module):
    """`num_layers` layers: scanned whole periods of the pattern, then an unscanned tail.

    `make_layer(i, rngs)` builds layer i; its structure may depend only on i mod `pattern`.
    """

    def __init__(self, num_layers: int, pattern: int,
                 make_layer: Callable[[int, nnx.Rngs], nnx.Module], *, remat: str,
                 scan: bool = True, rngs: nnx.Rngs):
        num_periods, num_tail = divmod(num_layers, pattern)
        self.remat = remat
        self.scan = scan
        periods = None
        if num_periods:
            @nnx.split_rngs(splits=num_periods)
            @nnx.vmap(in_axes=(0,), out_axes=0,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_period(r: nnx.Rngs) -> Period:
                return Period([make_layer(slot, r) for slot in range(pattern)])

            periods = make_period(rngs)
        self.periods = nnx.data(periods)
        self.tail = nnx.List(
            [make_layer(num_periods * pattern + j, rngs) for j in range(num_tail)])

    def __call__(self, x: jax.Array, ctx: Any) -> jax.Array:
        if self.periods is not None:
            graphdef, state = nnx.split(self.periods)

            def period_step(x, period_state):
                for layer in nnx.merge(graphdef, period_state).layers:
                    x = constrain(layer(x, ctx), RESIDUAL)
                return x, None

            if self.remat != "none":
                period_step = jax.checkpoint(period_step, policy=_REMAT_POLICIES[self.remat])
            if self.scan:
                x, _ = jax.lax.scan(period_step, x, state)
            else:  # unrolled: longer compiles, no stacked-activation copies (faster on CPU)
                for p in range(jax.tree.leaves(state)[0].shape[0]):
                    x, _ = period_step(x, jax.tree.map(lambda a, p=p: a[p], state))
        for layer in self.tail:
            x = constrain(layer(x, ctx), RESIDUAL)
        return x

    def map_layers(self, fn: Callable, carry, per_layer=None):
        """Threads `carry` through fn(layer, carry, item) -> (carry, out) over every layer in
        order (periods under one scan). `per_layer` and the outputs are laid out like the
        layers: {"periods": one entry per slot, stacked over periods, "tail": one per layer}."""
        periods = None
        if self.periods is not None:
            graphdef, state = nnx.split(self.periods)

            def period_step(carry, xs):
                period_state, items = xs
                outs = []
                for j, layer in enumerate(nnx.merge(graphdef, period_state).layers):
                    carry, out = fn(layer, carry, None if items is None else items[j])
                    outs.append(out)
                return carry, tuple(outs)

            items = None if per_layer is None else per_layer["periods"]
            carry, periods = jax.lax.scan(period_step, carry, (state, items))
        tail = []
        for j, layer in enumerate(self.tail):
            carry, out = fn(layer, carry, None if per_layer is None else per_layer["tail"][j])
            tail.append(out)
        return carry, {"periods": periods, "tail": tuple(tail)}
