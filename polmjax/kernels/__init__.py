"""Compute kernels: attention and target-token log-probs, each with a pure-jnp reference."""

from polmjax.kernels.attention import attention

__all__ = ["attention"]
