"""`token_logprobs`: fused target-token log-probs (and entropy) that never form [tokens, vocab] logits."""

from polmjax.kernels.logprobs.ops import IMPLS, BlockSizes, token_logprobs, token_logprobs_sharded
from polmjax.kernels.logprobs.reference import token_logprobs_naive, token_logprobs_reference

__all__ = [
    "BlockSizes",
    "IMPLS",
    "token_logprobs",
    "token_logprobs_naive",
    "token_logprobs_reference",
    "token_logprobs_sharded",
]
