"""Decoder models (Flax NNX) with exact Hugging Face interop.

Shape legend used across polmjax: B batch, T query length, S key length, D model width, H query heads,
G kv heads, K head dim, F MLP width, V vocabulary, L layers, N flattened tokens.
"""

from polmjax.models.config import ConfigError, ModelConfig, RopeConfig, from_hf_config, to_hf_config
from polmjax.models.decoder import (
    Decoder,
    KVCache,
    create,
    forward_hidden,
    init_params,
    logits_from_hidden,
    param_shardings,
    param_specs,
    target_logprobs,
    unembed_matrix,
)
from polmjax.models.hf import from_pretrained, save_pretrained
from polmjax.models.safetensors_io import CheckpointError

__all__ = [
    "CheckpointError", "ConfigError", "Decoder", "KVCache", "ModelConfig", "RopeConfig", "create",
    "forward_hidden", "from_hf_config", "from_pretrained", "init_params", "logits_from_hidden",
    "param_shardings", "param_specs", "save_pretrained", "target_logprobs", "to_hf_config", "unembed_matrix",
]
