"""`attention`: one entry point for every attention computation in polmjax."""

from polmjax.kernels.attention.ops import IMPLS, attention

__all__ = ["attention", "IMPLS"]
