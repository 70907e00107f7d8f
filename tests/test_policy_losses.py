"""Policy-gradient losses, KL estimators, aggregation and rollout correction: hand-derived values, TRL
1.16's GRPO loss code re-derived in torch (grpo_trainer.py line numbers in comments), gradients, and exact
aggregation under micro-batching."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polmjax.losses.policy import (AGGREGATIONS, POLICY_LOSSES, aggregate, aggregation_weights, cispo,
                                   clipped_policy, gspo, kl, rollout_correction)

EPS = dict(epsilon_low=0.2, epsilon_high=0.28)


def _batch(seed, B=6, T=9):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, size=B)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    old = np.log(rng.uniform(0.05, 0.9, size=(B, T))).astype(np.float32)
    logps = (old + rng.normal(scale=0.3, size=(B, T))).astype(np.float32)
    adv = rng.normal(size=B).astype(np.float32)
    return jnp.asarray(logps), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask)


def test_on_policy_ratio_one():
    logps, _, adv, mask = _batch(0)
    logps = jnp.where(mask > 0, logps, -jnp.inf)  # padding may hold anything: it must not reach loss or grad
    for name, fn in POLICY_LOSSES.items():
        kwargs = dict(EPS) if name != "cispo" else {"epsilon_high": 4.0}
        loss, stats = fn(logps, logps, adv, mask, **kwargs)
        for key, s in stats.items():
            assert float(s.sum()) == 0.0, (name, key)
        if name != "cispo":  # CISPO's value is −A·log π (its gradient is −A·∇log π, checked below)
            np.testing.assert_allclose(loss, -adv[:, None] * mask, rtol=1e-6, err_msg=name)
            want = -(adv * mask.sum(1)).sum() / mask.sum()  # token mean of −A
            np.testing.assert_allclose(aggregate(loss, mask, "token_mean"), want, rtol=1e-5)
        grad = jax.jit(jax.grad(lambda lp, fn=fn, kw=kwargs: fn(lp, logps, adv, mask, **kw)[0].sum()))(logps)
        np.testing.assert_allclose(grad, -adv[:, None] * mask, rtol=1e-5, atol=1e-7, err_msg=name)


# one row, tokens with ratios 1.5, 0.5 under A = +1 and A = −1, and 5.0 under A = −1 for the dual clip
RATIOS = jnp.log(jnp.array([[1.5, 0.5, 1.5, 0.5, 5.0]]))


def test_clipped_policy_by_hand():
    old = jnp.zeros((2, 5))
    logps = jnp.concatenate([RATIOS, RATIOS])
    adv = jnp.array([1.0, -1.0])
    mask = jnp.ones((2, 5))
    loss, stats = clipped_policy(logps, old, adv, mask, **EPS)
    # A=+1: −min(ρ, clip(ρ, .8, 1.28)); A=−1: −min(−ρ, −clip(ρ)) = max(ρ, clip(ρ))
    np.testing.assert_allclose(loss[0], [-1.28, -0.5, -1.28, -0.5, -1.28], rtol=1e-6)
    np.testing.assert_allclose(loss[1], [1.5, 0.8, 1.5, 0.8, 5.0], rtol=1e-6)
    np.testing.assert_array_equal(stats["clip_high"], [[1, 0, 1, 0, 1], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(stats["clip_low"], [[0, 0, 0, 0, 0], [0, 1, 0, 1, 0]])
    assert "clip_dual" not in stats

    loss, stats = clipped_policy(logps, old, adv, mask, **EPS, dual_clip=3.0)
    np.testing.assert_allclose(loss[1], [1.5, 0.8, 1.5, 0.8, 3.0], rtol=1e-6)  # −c·A = 3 bounds ρ = 5
    np.testing.assert_allclose(loss[0], [-1.28, -0.5, -1.28, -0.5, -1.28], rtol=1e-6)  # A > 0 untouched
    np.testing.assert_array_equal(stats["clip_dual"], [[0, 0, 0, 0, 0], [0, 0, 0, 0, 1]])

    masked, mstats = clipped_policy(logps, old, adv, mask.at[:, 3:].set(0.0), **EPS)
    np.testing.assert_array_equal(masked[:, 3:], 0.0)
    np.testing.assert_array_equal(mstats["clip_low"][:, 3:], 0.0)


def test_clipped_policy_gradients():
    old = jnp.zeros((2, 5))
    logps = jnp.concatenate([RATIOS, RATIOS])
    adv = jnp.array([1.0, -1.0])
    mask = jnp.ones((2, 5))
    grad = jax.jit(jax.grad(lambda lp: clipped_policy(lp, old, adv, mask, **EPS, dual_clip=3.0)[0].sum()))(logps)
    # ∂(−ρA)/∂log π = −ρA where the unclipped branch is active, 0 where clipped (and under the dual clip)
    np.testing.assert_allclose(grad[0], [0.0, -0.5, 0.0, -0.5, 0.0], atol=1e-7)
    np.testing.assert_allclose(grad[1], [1.5, 0.0, 1.5, 0.0, 0.0], atol=1e-6)
    # descent raises log π where A > 0 and lowers it where A < 0
    assert (grad[0] <= 0).all() and (grad[1] >= 0).all()


def _trl_grpo_loss(torch, logps, old, adv, mask, loss_type, level="token", max_len=None, eps_high=0.28):
    """TRL 1.16 GRPOTrainer._compute_loss, re-derived: grpo_trainer.py:3083-3095 (ratio), 3109-3119
    (clipped loss, cispo), 3153-3174 (aggregation by loss_type)."""
    per_token_logps = torch.tensor(np.asarray(logps), requires_grad=True)
    old = torch.tensor(np.asarray(old))
    advantages = torch.tensor(np.asarray(adv)).unsqueeze(1)
    mask = torch.tensor(np.asarray(mask))
    log_ratio = per_token_logps - old
    if level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * advantages * per_token_logps
    else:
        coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + eps_high)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type in ("dapo", "bnpo", "cispo"):
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    else:  # dr_grpo
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_len)
    loss.backward()
    return loss.item(), per_token_logps.grad.numpy()


def test_matches_trl_grpo_loss_types():
    torch = pytest.importorskip("torch")
    logps, old, adv, mask = _batch(1)
    cases = [("grpo", "seq_mean_token_mean"), ("dapo", "token_mean"), ("dr_grpo", "seq_mean_token_sum_norm")]
    for trl_type, mode in cases:
        want, want_grad = _trl_grpo_loss(torch, logps, old, adv, mask, trl_type, max_len=16)

        def ours(lp, mode=mode):
            return aggregate(clipped_policy(lp, old, adv, mask, **EPS)[0], mask, mode, max_len=16)

        value, grad = jax.jit(jax.value_and_grad(ours))(logps)
        np.testing.assert_allclose(value, want, rtol=1e-5, err_msg=trl_type)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7, err_msg=trl_type)


def test_gspo_matches_trl_sequence_level():
    torch = pytest.importorskip("torch")
    logps, old, adv, mask = _batch(2)
    eps = dict(epsilon_low=0.2, epsilon_high=0.28)
    want, want_grad = _trl_grpo_loss(torch, logps, old, adv, mask, "grpo", level="sequence")

    def ours(lp):
        return aggregate(gspo(lp, old, adv, mask, **eps)[0], mask, "seq_mean_token_mean")

    value, grad = jax.jit(jax.value_and_grad(ours))(logps)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_gspo_by_hand():
    # sequence 0: log-ratios ln 2 and 0 -> s = exp(ln2 / 2) = √2 > 1.28: clipped for A = +1
    # sequence 1: log-ratios 0.1, −0.1 and a padded token -> s = 1: unclipped, loss −A on both tokens
    logps = jnp.array([[math.log(2.0), 0.0, 0.0], [0.1, -0.1, 7.0]])
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    adv = jnp.array([1.0, -2.0])
    loss, stats = gspo(logps, jnp.zeros((2, 3)), adv, mask, **EPS)
    np.testing.assert_allclose(loss, [[-1.28, -1.28, 0.0], [2.0, 2.0, 0.0]], rtol=1e-6)
    np.testing.assert_array_equal(stats["clip_high"], [[1, 1, 0], [0, 0, 0]])
    grad = jax.jit(jax.grad(lambda lp: gspo(lp, jnp.zeros((2, 3)), adv, mask, **EPS)[0].sum()))(logps)
    np.testing.assert_allclose(grad, [[0.0, 0.0, 0.0], [2.0, 2.0, 0.0]], atol=1e-6)  # −sg[s]·A per token


def test_cispo_by_hand_and_trl():
    torch = pytest.importorskip("torch")
    old = jnp.zeros((1, 3))
    logps = jnp.log(jnp.array([[0.5, 4.0, 1.0]]))  # ratios 0.5, 4, 1 (old log-probs 0)
    mask = jnp.ones((1, 3))
    adv = jnp.array([2.0])
    loss, stats = cispo(logps, old, adv, mask, epsilon_high=1.0)  # weight = min(ρ, 2)
    np.testing.assert_allclose(loss, -np.array([[0.5, 2.0, 1.0]]) * 2.0 * np.log([[0.5, 4.0, 1.0]]), rtol=1e-6)
    np.testing.assert_array_equal(stats["clip_high"], [[0, 1, 0]])
    grad = jax.jit(jax.grad(lambda lp: cispo(lp, old, adv, mask, epsilon_high=1.0)[0].sum()))(logps)
    np.testing.assert_allclose(grad, [[-1.0, -4.0, -2.0]], rtol=1e-6)  # −sg[min(ρ, 2)]·A: no gradient via ρ
    loss_low, _ = cispo(logps, old, adv, mask, epsilon_high=1.0, epsilon_low=0.2)  # weight clip(ρ, .8, 2)
    np.testing.assert_allclose(loss_low[0, 0], -0.8 * 2.0 * np.log(0.5), rtol=1e-6)

    logps, old, adv, mask = _batch(3)  # TRL's ε_max = 5.0 is our 1 + epsilon_high
    want, want_grad = _trl_grpo_loss(torch, logps, old, adv, mask, "cispo", eps_high=1.25)
    value, grad = jax.jit(jax.value_and_grad(
        lambda lp: aggregate(cispo(lp, old, adv, mask, epsilon_high=0.25)[0], mask, "token_mean")))(logps)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_kl_estimators():
    logps, ref, _, _ = _batch(4)
    for est in ("k1", "k2", "k3"):
        np.testing.assert_array_equal(kl(logps, logps, est), 0.0)
    assert float(kl(logps, ref, "k3").min()) >= 0.0
    lp, rf = jnp.zeros((1, 1)), jnp.full((1, 1), math.log(2.0))  # δ = ref − logp = ln 2
    np.testing.assert_allclose(kl(lp, rf, "k1"), [[-math.log(2.0)]], rtol=1e-6)
    np.testing.assert_allclose(kl(lp, rf, "k2"), [[0.5 * math.log(2.0) ** 2]], rtol=1e-6)
    np.testing.assert_allclose(kl(lp, rf, "k3"), [[2.0 - math.log(2.0) - 1.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="estimator"):
        kl(lp, rf, "k4")


def test_aggregation_weights_by_hand():
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # the last row is empty
    np.testing.assert_allclose(aggregation_weights(mask, "token_mean"), mask / 3)
    np.testing.assert_allclose(aggregation_weights(mask, "seq_mean_token_mean"),
                               [[0.25, 0.25, 0], [0.5, 0, 0], [0, 0, 0]])  # two non-empty rows
    np.testing.assert_allclose(aggregation_weights(mask, "seq_mean_token_sum"), mask / 3)
    np.testing.assert_allclose(aggregation_weights(mask, "seq_mean_token_sum_norm", max_len=4), mask / 12)
    loss = jnp.array([[1.0, 2.0, 5.0], [4.0, 6.0, 7.0], [8.0, 9.0, 3.0]])  # masked entries must not count
    assert float(aggregate(loss, mask, "token_mean")) == pytest.approx(7 / 3)
    assert float(aggregate(loss, mask, "seq_mean_token_mean")) == pytest.approx((1.5 + 4.0) / 2)
    assert float(aggregate(loss, mask, "seq_mean_token_sum")) == pytest.approx(7 / 3)
    assert float(aggregate(loss, mask, "seq_mean_token_sum_norm", max_len=4)) == pytest.approx(7 / 12)
    with pytest.raises(ValueError, match="max_len"):
        aggregation_weights(mask, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="aggregation mode"):
        aggregation_weights(mask, "mean")


def test_aggregation_exact_under_micro_batching():
    logps, old, adv, mask = _batch(5, B=8)
    mask = mask.at[3].set(0.0)  # a fully masked row in the first half
    halves = (slice(0, 4), slice(4, 8))

    for name, fn in POLICY_LOSSES.items():
        kwargs = dict(EPS) if name != "cispo" else {"epsilon_high": 1.0}

        @jax.jit
        def weighted(lp, old, adv, mask, w, fn=fn, kw=kwargs):  # one micro-batch's sum(loss · w) and gradient
            return jax.value_and_grad(lambda lp: (fn(lp, old, adv, mask, **kw)[0] * w).sum())(lp)

        for mode in AGGREGATIONS:
            w = aggregation_weights(mask, mode, max_len=12)  # on the global batch, then split
            v_full, g_full = weighted(logps, old, adv, mask, w)
            parts = [weighted(logps[h], old[h], adv[h], mask[h], w[h]) for h in halves]
            np.testing.assert_allclose(sum(v for v, _ in parts), v_full, rtol=1e-6, err_msg=(name, mode))
            np.testing.assert_allclose(jnp.concatenate([g for _, g in parts]), g_full, rtol=1e-5, atol=1e-8,
                                       err_msg=(name, mode))
    # per-half token means averaged are not the global token mean (why the weights exist)
    loss, _ = clipped_policy(logps, old, adv, mask, **EPS)
    means = [aggregate(loss[h], mask[h], "token_mean") for h in halves]
    assert abs(float(sum(means) / 2 - aggregate(loss, mask, "token_mean"))) > 1e-3
    # clip fractions reduce the same way: sums of stats times token-mean weights
    _, stats = clipped_policy(logps, old, adv, mask, **EPS)
    frac = (stats["clip_high"] * aggregation_weights(mask, "token_mean")).sum()
    valid = np.asarray(mask) > 0
    ratio = np.exp(np.asarray(logps - old))
    want = ((ratio > 1.28) & (np.asarray(adv)[:, None] > 0))[valid].mean()
    np.testing.assert_allclose(frac, want, rtol=1e-6)


def test_rollout_correction_by_hand():
    sampler = jnp.zeros((1, 4))
    trainer = jnp.log(jnp.array([[3.0, 0.5, 1.2, 9.0]]))  # ratios π_trainer / π_sampler; the last is padding
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    k3 = np.mean([r - 1 - math.log(r) for r in (3.0, 0.5, 1.2)])

    w, m = rollout_correction(trainer, sampler, mask, mode="tis", cap=2.0)
    np.testing.assert_allclose(w, [[2.0, 0.5, 1.2, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(m["k3_kl"], k3, rtol=1e-5)
    np.testing.assert_allclose(m["ratio_max"], 3.0, rtol=1e-6)
    np.testing.assert_allclose(m["ratio_min"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(m["truncated_fraction"], 1 / 3, rtol=1e-6)
    assert float(m["masked_fraction"]) == 0.0

    w, m = rollout_correction(trainer, sampler, mask, mode="mask", low=0.4, high=2.5)  # IcePop
    np.testing.assert_allclose(w, [[0.0, 0.5, 1.2, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(m["masked_fraction"], 1 / 3, rtol=1e-6)
    w, _ = rollout_correction(trainer, sampler, mask, mode="reject", low=0.4, high=2.5)  # verl rollout_rs
    np.testing.assert_allclose(w, [[0.0, 1.0, 1.0, 0.0]])

    seq = 3.0 * 0.5 * 1.2  # product over the valid tokens
    w, m = rollout_correction(trainer, sampler, mask, level="sequence", mode="tis", cap=2.0)
    np.testing.assert_allclose(w, [[1.8, 1.8, 1.8, 0.0]], rtol=1e-5)
    np.testing.assert_allclose(m["ratio_max"], seq, rtol=1e-5)
    w, _ = rollout_correction(trainer, sampler, mask, level="geometric", mode="reject", low=0.9, high=1.1)
    np.testing.assert_allclose(w, [[0.0, 0.0, 0.0, 0.0]])  # geometric mean 1.8^(1/3) = 1.216 > 1.1
    w, _ = rollout_correction(trainer, sampler, mask, level="geometric", mode="mask", high=1.3)
    np.testing.assert_allclose(w, [[seq ** (1 / 3)] * 3 + [0.0]], rtol=1e-5)


def test_rollout_correction_equal_logps_and_no_gradient():
    logps, _, _, mask = _batch(6)
    w, m = rollout_correction(logps, logps, mask, mode="tis", cap=2.0)
    np.testing.assert_array_equal(w, mask)
    assert float(m["k3_kl"]) == 0.0 and float(m["ratio_max"]) == 1.0 and float(m["weight_mean"]) == 1.0
    grad = jax.grad(lambda t: rollout_correction(t, logps, mask, mode="mask", low=0.5, high=2.0)[0].sum())(logps + 0.1)
    np.testing.assert_array_equal(grad, 0.0)
    with pytest.raises(ValueError, match="low and/or high"):
        rollout_correction(logps, logps, mask, mode="mask")
    with pytest.raises(ValueError, match="level"):
        rollout_correction(logps, logps, mask, level="row")


def test_jit():
    logps, old, adv, mask = _batch(7)
    f = jax.jit(lambda lp: clipped_policy(lp, old, adv, mask, **EPS, dual_clip=3.0))
    np.testing.assert_allclose(f(logps)[0], clipped_policy(logps, old, adv, mask, **EPS, dual_clip=3.0)[0],
                               rtol=1e-6)
    g = jax.jit(lambda t: rollout_correction(t, old, mask, level="sequence", mode="tis", cap=2.0))
    assert g(logps)[0].shape == mask.shape
