"""`attention`: one entry point for every attention computation in polmjax."""

from polmjax.kernels.attention.flash import BlockSizes
from polmjax.kernels.attention.ops import IMPLS, attention, attention_sharded

__all__ = ["IMPLS", "BlockSizes", "attention", "attention_sharded"]
