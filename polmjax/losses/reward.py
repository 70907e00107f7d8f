"""Reward-model losses: pure functions over the scalar rewards [B] of chosen and rejected completions.

Each returns per-pair losses [B] float32; the caller reduces (a mean over the global batch of pairs).
TRL's RewardTrainer loss is the batch mean of `bradley_terry` plus that of `center_rewards` when
`center_rewards_coefficient` is set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bradley_terry(chosen_rewards, rejected_rewards, margin=None):
    """Bradley-Terry pairwise loss (Ouyang et al. 2022, arXiv:2203.02155), with an optional per-pair
    margin m (Touvron et al. 2023, Llama 2, arXiv:2307.09288):

        L = −log σ(r_c − r_r − m)
    """
    diff = jnp.asarray(chosen_rewards, jnp.float32) - jnp.asarray(rejected_rewards, jnp.float32)
    if margin is not None:
        diff = diff - jnp.asarray(margin, jnp.float32)
    return -jax.nn.log_sigmoid(diff)


def center_rewards(chosen_rewards, rejected_rewards, coefficient):
    """Auxiliary loss towards mean-zero rewards (Eisenstein et al. 2023, arXiv:2312.09244, Eq. 2):

        L = c · (r_c + r_r)²

    Its batch mean is TRL's `center_rewards_coefficient · mean((r_c + r_r)²)`: a mean over pairs of
    the squared pair sum (reward_trainer.py:794-795), not over the 2B rewards.
    """
    total = jnp.asarray(chosen_rewards, jnp.float32) + jnp.asarray(rejected_rewards, jnp.float32)
    return coefficient * total**2
