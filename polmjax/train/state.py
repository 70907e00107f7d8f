"""The train state: a plain pytree. Frozen parameters (LoRA base, reference models) live outside it."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from polmjax.models.decoder import flatten, unflatten


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: number of updates applied
    params: dict  # trainable parameters
    opt_state: Any
    rng: jax.Array  # uint32 key data (jax.random.key_data), checkpoint-friendly

    def step_key(self) -> jax.Array:
        """A fresh key for this step: a pure function of the seed and the step."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def init_state(params: dict, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                      jax.random.key_data(jax.random.key(seed)))


def combine_params(trainable: dict, frozen: dict) -> dict:
    """One parameter tree from the trainable part and the frozen part (disjoint leaves)."""
    if not frozen:
        return trainable
    return unflatten({**flatten(frozen), **flatten(trainable)})


def state_shardings(state: TrainState):
    """Shardings of a (placed) state, for jit's in/out_shardings."""
    return jax.tree.map(lambda x: x.sharding, state)


def init_state_sharded(params: dict, optimizer: optax.GradientTransformation, seed: int, mesh) -> TrainState:
    """`init_state` with every optimizer-state leaf placed like the parameter it mirrors.

    Optimizer states (Adam's mu and nu, ...) hold subtrees shaped like the parameters; a leaf whose tree
    path ends with a parameter's path and has its shape gets that parameter's sharding. Anything else
    (counts, factored statistics) is replicated. Without this, zeros_like(param) has no data dependency
    and the compiler is free to replicate the optimizer state: a silent memory blow-up.
    """
    shardings = state_shardings_for(params, optimizer, mesh)
    return jax.jit(lambda p: init_state(p, optimizer, seed), out_shardings=shardings)(params)


def state_shardings_for(params: dict, optimizer: optax.GradientTransformation, mesh) -> TrainState:
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())
    by_path = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        by_path[_keys(path)] = leaf
    abstract = jax.eval_shape(lambda p: init_state(p, optimizer, 0), params)

    def choose(path, leaf):
        keys = _keys(path)
        for n in range(len(keys), 0, -1):
            param = by_path.get(keys[-n:])
            if param is not None and param.shape == leaf.shape:
                return param.sharding
        return replicated

    return jax.tree_util.tree_map_with_path(choose, abstract)


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)
