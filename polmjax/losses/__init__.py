"""Losses: small pure functions over log-probs, masks and rewards; they return per-example [B] float32."""

from polmjax.losses.sft import sft_loss, token_weights

__all__ = ["sft_loss", "token_weights"]
