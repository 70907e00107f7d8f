"""`polmjax.train.step.update`: the one accumulating optimizer update every algorithm uses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from polmjax.train.state import init_state
from polmjax.train.step import update


def _pair_loss(params, mb, rng):
    """A pair loss with weights normalised over the global batch (1 / number of pairs)."""
    score_c = mb["x_chosen"] @ params["w"] + params["frozen_b"]
    score_r = mb["x_rejected"] @ params["w"] + params["frozen_b"]
    per_pair = -jax.nn.log_sigmoid(score_c - score_r)
    noise = jax.random.uniform(rng, ()) * 0.0  # the rng is a key (fold_in of the step key and micro index)
    return (per_pair * mb["weight"]).sum() + noise, {"accuracy": ((score_c > score_r) * mb["weight"]).sum()}


def _batch(n=8, d=4, seed=0):
    rng = np.random.RandomState(seed)
    return {"x_chosen": rng.randn(n, d).astype(np.float32), "x_rejected": rng.randn(n, d).astype(np.float32),
            "weight": np.full((n,), 1.0 / n, np.float32)}


@pytest.mark.parametrize("grad_accum", [2, 4, 8])
def test_accumulation_equals_one_big_batch(grad_accum):
    params = {"w": jnp.asarray(np.random.RandomState(1).randn(4), jnp.float32)}
    opt = optax.adamw(1e-2)
    state = init_state(params, opt, seed=0)
    frozen = {"frozen_b": jnp.float32(0.5)}
    batch = _batch()
    ref_state, ref = update(state, frozen, batch, micro_loss=_pair_loss, optimizer=opt, grad_accum=1)
    got_state, got = update(state, frozen, batch, micro_loss=_pair_loss, optimizer=opt, grad_accum=grad_accum)
    for k in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got_state.params["w"], ref_state.params["w"], rtol=1e-6, atol=1e-7)
    assert int(got_state.step) == 1 and "frozen_b" not in got_state.params
    # the hand-derived loss: mean over pairs of -log sigmoid(w.(xc - xr))
    margin = (batch["x_chosen"] - batch["x_rejected"]) @ np.asarray(params["w"])
    np.testing.assert_allclose(ref["loss"], np.mean(np.log1p(np.exp(-margin))), rtol=1e-6)


def test_bad_batches_are_named():
    params = {"w": jnp.zeros(4)}
    opt = optax.sgd(1.0)
    state = init_state(params, opt, seed=0)
    with pytest.raises(ValueError, match="not divisible by grad_accum=3"):
        update(state, {"frozen_b": 0.0}, _batch(), micro_loss=_pair_loss, optimizer=opt, grad_accum=3)
    bad = dict(_batch(), weight=np.ones(7, np.float32))
    with pytest.raises(ValueError, match=r"disagree on the batch size: \[7, 8\]"):
        update(state, {"frozen_b": 0.0}, bad, micro_loss=_pair_loss, optimizer=opt)
