"""Compute kernels: attention and target-token log-probs, each with a pure-jnp reference."""

from polmjax.kernels.attention import attention
from polmjax.kernels.logprobs import token_logprobs

__all__ = ["attention", "token_logprobs"]
