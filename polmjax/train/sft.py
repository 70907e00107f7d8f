"""Supervised fine-tuning: the pure step, and the run that wires model, data, optimizer and loop.

`sft_step(state, frozen, batch, ...)` is a module-level pure function: jit it once at the call site with
in/out shardings and `donate_argnums=0`; a test can call it un-jitted on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from polmjax.kernels import token_logprobs
from polmjax.losses import sft_loss, token_weights
from polmjax.models.config import ModelConfig
from polmjax.models.decoder import forward_hidden, unembed_matrix
from polmjax.train.state import TrainState, combine_params

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")


def sft_step(
    state: TrainState,
    frozen: dict,
    batch: dict,
    *,
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule | None = None,
    reduction: str = "token",
    grad_accum: int = 1,
    mesh=None,
    rules=None,
) -> tuple[TrainState, dict]:
    """One optimizer update on a global batch of [B, T] arrays (see `polmjax.data` for the keys).

    The batch is split into `grad_accum` micro-batches scanned in sequence; loss weights are normalised
    over the whole batch first, so the update equals that of one big batch. Gradients accumulate in
    float32. Returns the new state and scalar metrics (loss, grad_norm, tokens, learning_rate).
    """
    weights_BT = token_weights(batch["loss_mask"], batch["segment_ids"], reduction)
    B = weights_BT.shape[0]
    if B % grad_accum:
        raise ValueError(f"global batch {B} is not divisible by grad_accum={grad_accum}")
    micro = {k: _micro(batch[k], grad_accum) for k in ("input_ids", "targets", "positions", "segment_ids")}
    micro["weights"] = _micro(weights_BT, grad_accum)
    key = state.step_key()

    def loss_fn(params, mb, index):
        rng = jax.random.fold_in(key, index) if model_cfg.lora and model_cfg.lora.dropout else None
        return micro_batch_loss(model_cfg, combine_params(params, frozen), mb, mesh=mesh, rules=rules,
                                dropout_rng=rng)

    grad_fn = jax.value_and_grad(loss_fn)

    def accumulate(carry, xs):
        loss_sum, grad_sum = carry
        mb, index = xs
        loss, grads = grad_fn(state.params, mb, index)
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
        return (loss_sum + loss, grad_sum), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                    (micro, jnp.arange(grad_accum)))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "tokens": batch["loss_mask"].astype(jnp.float32).sum(),
    }
    if schedule is not None:
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    return TrainState(state.step + 1, params, opt_state, state.rng), metrics


def micro_batch_loss(model_cfg: ModelConfig, params: dict, mb: dict, *, mesh=None, rules=None,
                     dropout_rng=None) -> jax.Array:
    """sum_t w_t * (-log p(target_t)) over one micro-batch, from hidden states through `token_logprobs`."""
    hidden_BTD, _ = forward_hidden(model_cfg, params, mb["input_ids"], mb["positions"], mb["segment_ids"],
                                   mesh=mesh, rules=rules, dropout_rng=dropout_rng)
    B, T, D = hidden_BTD.shape
    lp_N = token_logprobs(hidden_BTD.reshape(B * T, D), unembed_matrix(model_cfg, params),
                          mb["targets"].reshape(B * T), softcap=model_cfg.final_softcap,
                          impl=model_cfg.logprob_impl)
    return sft_loss(lp_N.reshape(B, T), mb["weights"]).sum()


def _micro(x, n):
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])


def jit_sft_step(state_shardings, frozen_shardings, batch_sharding, **static):
    """`sft_step` jitted once with explicit shardings and the state donated."""
    batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
    return jax.jit(
        functools.partial(sft_step, **static),
        in_shardings=(state_shardings, frozen_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
