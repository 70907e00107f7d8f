"""Tiny random Hugging Face models of every supported family, built offline (no downloads)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 97

# name -> (config class, kwargs). Each exercises the numerics its family is known for.
CONFIGS = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, rope_theta=50000.0)),
    "llama3_scaled_tied_bias": ("LlamaConfig", dict(
        num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16))),
    "mistral_window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=5, head_dim=8)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, rope_theta=1000000.0)),
    "qwen2_sliding_layers": ("Qwen2Config", dict(
        num_key_value_heads=4, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=24, rope_theta=1000000.0)),
    "qwen3_yarn_tied": ("Qwen3Config", dict(
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                             original_max_position_embeddings=16))),
    "gemma2": ("Gemma2Config", dict(
        num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=20,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", dict(
        num_key_value_heads=1, head_dim=16, sliding_window=3, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        num_hidden_layers=4,
        rope_parameters={"full_attention": dict(rope_type="linear", rope_theta=1000000.0, factor=8.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=10000.0)})),
}


def hf_config(name: str, **overrides):
    cls_name, kwargs = CONFIGS[name]
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    base.update(kwargs)
    base.update(overrides)
    return getattr(transformers, cls_name)(**base)


def build_hf_model(name: str, seed: int = 0, **overrides):
    """A random fp32 HF causal LM with every parameter (norms included) perturbed away from its init."""
    torch.manual_seed(seed)
    config = hf_config(name, **overrides)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def hf_logits(model, input_ids, attention_mask=None):
    with torch.no_grad():
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        mask = None if attention_mask is None else torch.as_tensor(attention_mask, dtype=torch.long)
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()
