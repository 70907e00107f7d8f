"""Losses: small pure functions over log-probs, masks and rewards; they return per-example [B] float32."""

from polmjax.losses.preference import KTO_LOSSES, PREFERENCE_LOSSES, combine, implicit_rewards
from polmjax.losses.reward import bradley_terry, center_rewards
from polmjax.losses.sft import sft_loss, token_weights

__all__ = ["KTO_LOSSES", "PREFERENCE_LOSSES", "bradley_terry", "center_rewards", "combine", "implicit_rewards",
           "sft_loss", "token_weights"]

from polmjax.losses.policy import (  # noqa: E402
    AGGREGATIONS,
    POLICY_LOSSES,
    aggregate,
    aggregation_weights,
    cispo,
    clipped_policy,
    gspo,
    kl,
    rollout_correction,
)

__all__ += ["AGGREGATIONS", "POLICY_LOSSES", "aggregate", "aggregation_weights", "cispo", "clipped_policy", "gspo",
            "kl", "rollout_correction"]
