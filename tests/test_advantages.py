"""Advantage estimators: hand-derived values, TRL 1.16's GRPO advantages and verl's REINFORCE++/RLOO."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polmjax.rl import advantages
from polmjax.rl.advantages import ADVANTAGES, grpo, reinforce_pp, rloo

R = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # two groups of 4


def test_grpo_group_by_hand():
    # group 1: mean 1/2, unbiased std sqrt(1/3); group 2: mean 3/4, unbiased std 1/2
    s1, s2 = np.sqrt(1 / 3) + 1e-4, 0.5 + 1e-4
    want = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, 0.25 / s2, 0.25 / s2, 0.25 / s2, -0.75 / s2]
    np.testing.assert_allclose(grpo(R, 4), want, rtol=1e-6)


def test_grpo_batch_and_none_by_hand():
    centred = np.array([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])
    batch_std = np.sqrt((5 * 0.375**2 + 3 * 0.625**2) / 7)  # std of all 8 rewards (mean 5/8), unbiased
    np.testing.assert_allclose(grpo(R, 4, scale="batch"), centred / (batch_std + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(grpo(R, 4, scale="none"), centred, rtol=1e-6)


def test_grpo_matches_trl():
    torch = pytest.importorskip("torch")

    def nanstd(t, dim=None):  # trl/trainer/utils.py:1021-1046 (importing trl costs ~10 s of test time)
        mean = torch.nanmean(t, dim=dim, keepdim=True)
        variance = torch.nanmean((t - mean) ** 2, dim=dim, keepdim=True)
        count = torch.sum(~torch.isnan(t), dim=dim, keepdim=True)
        variance = variance * torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
        return torch.sqrt(variance).squeeze() if dim is None else torch.sqrt(variance).squeeze(dim)

    rewards = np.random.default_rng(0).normal(size=24).astype(np.float32)
    rewards[:6] = 0.5  # a zero-variance group: advantage 0
    G = 6

    def trl_advantages(scale):  # trl/trainer/grpo_trainer.py:2765-2787 (sum_then_normalize)
        r = torch.tensor(rewards)
        mean = torch.nanmean(r.view(-1, G), dim=1).repeat_interleave(G, dim=0)
        if scale in ("group", "none"):
            std = nanstd(r.view(-1, G), dim=1).repeat_interleave(G, dim=0)
        else:
            std = nanstd(r).expand_as(r)
        adv = r - mean
        return (adv if scale == "none" else adv / (std + 1e-4)).numpy()

    for scale in ("group", "batch", "none"):
        np.testing.assert_allclose(grpo(jnp.asarray(rewards), G, scale=scale), trl_advantages(scale),
                                   rtol=1e-5, atol=1e-6, err_msg=scale)
    np.testing.assert_array_equal(grpo(jnp.asarray(rewards), G)[:6], 0.0)


def test_grpo_group_of_one_is_zero():
    np.testing.assert_array_equal(grpo(jnp.array([3.0, -1.0]), 1), [0.0, 0.0])  # TRL: std 0 for one generation


def test_rloo_by_hand():
    want = [2 / 3, -2 / 3, -2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, -1.0]  # r_i minus the mean of the other three
    np.testing.assert_allclose(rloo(R, 4), want, rtol=1e-6)
    r = jnp.asarray(np.random.default_rng(1).normal(size=12), jnp.float32)
    np.testing.assert_allclose(rloo(r, 3), 3 / 2 * grpo(r, 3, scale="none"), rtol=1e-5, atol=1e-6)


def test_reinforce_pp_by_hand():
    # group-centred a = [.5,-.5,-.5,.5,.25,.25,.25,-.75]: mean 0, unbiased var 1.75/7 = 1/4, so A = 2a
    a = np.array([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])
    np.testing.assert_allclose(reinforce_pp(R, 4), 2 * a, rtol=1e-6)


def test_reinforce_pp_matches_verl():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    B, G, T = 12, 4, 7
    rewards = rng.normal(size=B).astype(np.float32)
    lengths = rng.integers(1, T + 1, size=B)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)

    # verl/trainer/ppo/core_algos.py compute_reinforce_plus_plus_baseline_outcome_advantage: scores minus
    # the group mean, tiled over the response, then verl_F.masked_whiten (masked mean, unbiased masked var)
    m = torch.tensor(mask)
    scores = torch.tensor(rewards)
    scores = scores - scores.view(-1, G).mean(dim=1).repeat_interleave(G)
    tiled = scores.unsqueeze(-1).tile([1, T]) * m
    mean = (tiled * m).sum() / m.sum()
    var = ((tiled - mean) ** 2 * m).sum() / m.sum() * (m.sum() / (m.sum() - 1))
    verl = ((tiled - mean) * torch.rsqrt(var + 1e-8) * m).numpy()

    ours = reinforce_pp(jnp.asarray(rewards), G, lengths_B=jnp.asarray(lengths))
    np.testing.assert_allclose(np.asarray(ours)[:, None] * mask, verl, rtol=1e-5, atol=1e-6)


def test_table_jit_and_errors():
    assert set(ADVANTAGES) == {"grpo", "rloo", "reinforce_pp"}
    for name, fn in ADVANTAGES.items():
        jitted = jax.jit(functools.partial(fn, group_size=4))
        np.testing.assert_allclose(jitted(R), fn(R, 4), rtol=1e-6, err_msg=name)
        with pytest.raises(ValueError, match="group_size=3"):
            fn(R, 3)
    with pytest.raises(ValueError, match="scale"):
        grpo(R, 4, scale="std")
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        rloo(R, 1)
    assert advantages.SCALES == ("group", "batch", "none")
