"""One optimizer update for every algorithm: scanned micro-batches, float32 gradient accumulation, apply.

    state, metrics = update(state, frozen, batch, micro_loss=..., optimizer=..., grad_accum=4)

`micro_loss(params, micro_batch, rng) -> (loss_sum, metric_sums)` is the algorithm: SFT, reward
modelling, DPO... It returns *sums* over its micro-batch whose total over the micro-batches is the
global-batch value (a metric whose name ends in "_max" is a maximum instead, e.g. RL's largest
importance ratio). The contract that keeps accumulation exact: normalise before splitting, i.e. the
algorithm puts per-token or per-pair weights that sum to 1 over the whole global batch into `batch`
(`losses.token_weights`; 1/number of pairs for pair losses), so the update with grad_accum=k equals
the one with grad_accum=1 up to float summation order. The batch schema is the algorithm's: every
leaf of `batch` has the global batch as its leading axis and is split along it.

A pure module-level function: jit it once at the call site with in/out shardings and the state donated
(`jit_update`); a test calls it un-jitted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from polmjax.train.state import TrainState, combine_params

MAX_SUFFIX = "_max"  # a metric named "..._max" is the maximum over the micro-batches, not their sum
MicroLoss = Callable[[dict, dict, jax.Array], tuple[jax.Array, dict]]


def update(state: TrainState, frozen: dict, batch: dict, *, micro_loss: MicroLoss,
           optimizer: optax.GradientTransformation, grad_accum: int = 1,
           schedule: optax.Schedule | None = None) -> tuple[TrainState, dict]:
    """Apply one optimizer update for the global `batch`; returns (new state, scalar metrics).

    Metrics: `loss` and the micro-losses' metric sums over the global batch, `grad_norm`, and
    `learning_rate` when a schedule is given. `frozen` (LoRA base, reference model) gets no gradient.
    """
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"update: batch leaves disagree on the batch size: {sorted(sizes)}")
    (B,) = sizes
    if B % grad_accum:
        raise ValueError(f"update: global batch {B} is not divisible by grad_accum={grad_accum}")
    key = state.step_key()

    def loss_fn(params, mb, index):
        return micro_loss(combine_params(params, frozen), mb, jax.random.fold_in(key, index))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:  # no accumulator buffers: one params-sized read and write fewer per step
        (loss, metrics), grads = grad_fn(state.params, batch, 0)
    else:
        micro = jax.tree.map(lambda x: x.reshape(grad_accum, B // grad_accum, *x.shape[1:]), batch)

        def accumulate(carry, xs):
            mb, index = xs
            (loss, metrics), grads = grad_fn(state.params, mb, index)
            total_loss, total_metrics, total_grads = carry
            add = lambda a, b: a + b.astype(jnp.float32)  # noqa: E731
            total_metrics = {k: jnp.maximum(v, metrics[k]) if k.endswith(MAX_SUFFIX) else add(v, metrics[k])
                             for k, v in total_metrics.items()}
            return (add(total_loss, loss), total_metrics, jax.tree.map(add, total_grads, grads)), None

        shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), 0)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (shapes[0][0], shapes[1]))
        metric_zeros = {k: jnp.full(s.shape, -jnp.inf if k.endswith(MAX_SUFFIX) else 0.0, jnp.float32)
                        for k, s in shapes[0][1].items()}
        zeros = (zeros[0], metric_zeros, zeros[1])
        (loss, metrics, grads), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(grad_accum)))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}
    if schedule is not None:
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    return TrainState(state.step + 1, params, opt_state, state.rng), metrics


def jit_update(state_shardings, frozen_shardings, batch_shardings, **static):
    """`update` jitted once with explicit shardings and the state donated (argument 0)."""
    return jax.jit(
        functools.partial(update, **static),
        in_shardings=(state_shardings, frozen_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
