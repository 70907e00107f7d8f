"""Advantage estimators for outcome rewards: one scalar reward per completion, one advantage per completion.

The batch holds `group_size` completions of each prompt, consecutive: rows [g·G, (g+1)·G) are the
G samples of prompt g (the sampler's `n` samples per prompt). Every function maps rewards [B] to
advantages [B] float32, is pure jnp (jit-able, static shapes: `group_size` is a Python int), and is
computed once on the global batch, before it is split into micro-batches. `ADVANTAGES` maps a name
to the function; each takes `(rewards_B, group_size, **options)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SCALES = ("group", "batch", "none")


def grpo(rewards_B: jax.Array, group_size: int, *, scale: str = "group", eps: float = 1e-4) -> jax.Array:
    """GRPO's group-relative advantage (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, §4.1.2).

        A_i = (r_i − mean_g(r)) / (std + eps)

    with mean_g over the G completions of the same prompt and std by `scale`:
      - "group": the group's std (GRPO);
      - "batch": the std of all B rewards, the baseline still the group mean (Hu et al. 2025,
        REINFORCE++, arXiv:2501.03262; TRL `scale_rewards="batch"`);
      - "none": no division, A_i = r_i − mean_g(r) (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783).

    Matches TRL 1.16 `GRPOTrainer._generate_and_score_completions` (grpo_trainer.py:2765-2787): std is
    unbiased (Bessel, `trl.trainer.utils.nanstd`), eps = 1e-4 is added to std, and a group of one
    (or a batch of one) has std 0, so its advantage is 0.
    """
    if scale not in SCALES:
        raise ValueError(f"grpo: scale={scale!r}; expected one of {SCALES}")
    r_GN = _groups(rewards_B, group_size, "grpo")
    centred_B = (r_GN - r_GN.mean(axis=1, keepdims=True)).reshape(-1)
    if scale == "none":
        return centred_B
    if scale == "group":
        std_G1 = _std(r_GN, axis=1)[:, None]
        std_B = jnp.broadcast_to(std_G1, r_GN.shape).reshape(-1)
    else:
        std_B = jnp.broadcast_to(_std(r_GN.reshape(-1), axis=0), centred_B.shape)
    return centred_B / (std_B + eps)


def rloo(rewards_B: jax.Array, group_size: int) -> jax.Array:
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024, arXiv:2402.14740).

        A_i = r_i − 1/(G−1) Σ_{j≠i} r_j  =  G/(G−1) · (r_i − mean_g(r))

    The baseline of each completion is the mean reward of the other G−1 samples of its prompt, so it
    is independent of the completion and the estimate unbiased. As verl's
    `compute_rloo_outcome_advantage`; needs G ≥ 2.
    """
    if group_size < 2:
        raise ValueError(f"rloo: group_size must be >= 2 (a leave-one-out baseline needs another sample), got {group_size}")
    r_GN = _groups(rewards_B, group_size, "rloo")
    baseline_GN = (r_GN.sum(axis=1, keepdims=True) - r_GN) / (group_size - 1)
    return (r_GN - baseline_GN).reshape(-1)


def reinforce_pp(rewards_B: jax.Array, group_size: int, *, lengths_B: jax.Array | None = None,
                 eps: float = 1e-8) -> jax.Array:
    """REINFORCE++ with a group baseline (Hu et al. 2025, arXiv:2501.03262, "REINFORCE++-baseline").

        a_i = r_i − mean_g(r)                     (group-mean baseline; 0 for group_size = 1)
        A_i = (a_i − mean_B(a)) / sqrt(var_B(a) + eps)   (whitened over the global batch)

    The batch statistics are those of verl's `compute_reinforce_plus_plus_baseline_outcome_advantage`,
    which broadcasts a_i over the response tokens and applies `masked_whiten`: mean and *unbiased*
    variance over all response tokens, so a completion weighs by its length. Pass `lengths_B` (the
    number of loss tokens of each completion) to get exactly that; without it each completion counts
    once (the paper's per-sample normalisation). With group_size = 1 the baseline is 0 and this is
    verl's plain REINFORCE++ for outcome rewards with γ = 1.
    """
    r_GN = _groups(rewards_B, group_size, "reinforce_pp")
    if group_size > 1:
        r_GN = r_GN - r_GN.mean(axis=1, keepdims=True)
    a_B = r_GN.reshape(-1)
    w_B = jnp.ones_like(a_B) if lengths_B is None else jnp.asarray(lengths_B, jnp.float32).reshape(a_B.shape)
    n = w_B.sum()
    mean = (w_B * a_B).sum() / jnp.maximum(n, 1.0)
    var = (w_B * (a_B - mean) ** 2).sum() / jnp.maximum(n - 1.0, 1.0)
    return (a_B - mean) * jax.lax.rsqrt(var + eps)


ADVANTAGES = {
    "grpo": grpo,
    "rloo": rloo,
    "reinforce_pp": reinforce_pp,
}


def _groups(rewards_B: jax.Array, group_size: int, name: str) -> jax.Array:
    rewards_B = jnp.asarray(rewards_B, jnp.float32)
    if rewards_B.ndim != 1:
        raise ValueError(f"{name}: rewards must be [B], got shape {rewards_B.shape}")
    (B,) = rewards_B.shape
    if group_size < 1 or B % group_size:
        raise ValueError(f"{name}: batch of {B} rewards is not a whole number of groups of group_size={group_size}")
    return rewards_B.reshape(B // group_size, group_size)


def _std(x: jax.Array, axis: int) -> jax.Array:
    """Unbiased standard deviation (torch.std / TRL nanstd); 0 where there is a single sample."""
    n = x.shape[axis]
    if n < 2:
        return jnp.zeros_like(x.sum(axis=axis))
    return jnp.std(x, axis=axis, ddof=1)
