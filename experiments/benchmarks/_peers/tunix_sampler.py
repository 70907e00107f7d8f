"""tunix peer of `sampler_throughput.py`: the vanilla `tunix.generate.sampler.Sampler` on tunix's Llama 3.

The model comes from the shared HF directory through `tunix.models.llama3.params.create_model_from_safe_tensors`.
The Sampler takes strings: a whitespace "tokenizer" over the model's token ids feeds it the same prompts
(encoding and decoding them is part of every call, as it is for a tunix user). fp32, cache of prompt + new
tokens, no end token (an id outside the vocabulary), no padding.
--mode greedy: temperature 0, no top_p (tunix's greedy mode).
--mode sampled: the Sampler has no n-samples-per-prompt option; as tunix's GRPO learner does, every prompt is
  repeated --samples times (each copy prefilled) and sampled at temperature 1 with top_p=1.0 (tunix's top_p
  mode, which skips the sort when top_p is 1 and top_k is unset: plain categorical sampling).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sampler_common as common  # noqa: E402


class IdTokenizer:
    """Token ids written as decimal words: what tunix's TokenizerAdapter needs from a custom tokenizer."""

    def encode(self, text, **kw):
        return [int(t) for t in text.split()]

    def decode(self, ids, **kw):
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return None  # no BOS prepended

    def eos_id(self):
        return -2

    def pad_id(self):
        return -1  # never a token: the prompts are not padded and tunix masks keys equal to the pad id


def main():
    args = common.parse_args(["greedy", "sampled"])
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tunix.generate import sampler as sampler_lib
    from tunix.models.llama3 import model as llama_lib
    from tunix.models.llama3 import params as llama_params

    prompts_BP = np.load(args.prompts)
    B, P = prompts_BP.shape
    with open(os.path.join(args.hf_dir, "config.json")) as f:
        hf = json.load(f)
    rope = hf.get("rope_parameters") or {}
    cfg = llama_lib.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(rope.get("rope_theta", hf.get("rope_theta", 10000))),
        norm_eps=hf["rms_norm_eps"], weight_tying=bool(hf.get("tie_word_embeddings", False)))
    model = llama_params.create_model_from_safe_tensors(args.hf_dir, cfg, mesh=None, dtype=jnp.float32)
    sampler = sampler_lib.Sampler(model, IdTokenizer(), sampler_lib.CacheConfig(
        cache_size=P + args.new_tokens, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim))
    texts = [IdTokenizer().decode(row) for row in prompts_BP]
    if args.mode == "greedy":
        sampling = dict(temperature=0.0)
    else:
        texts = [t for t in texts for _ in range(args.samples)]  # prompt b's copies adjacent, as polmjax's rows
        seeds = iter(range(10**6))  # a fresh seed every call
        sampling = dict(temperature=1.0, top_p=1.0)

    def call():
        kw = sampling if args.mode == "greedy" else dict(sampling, seed=next(seeds))
        out = sampler(texts, max_generation_steps=args.new_tokens, max_prompt_length=P,
                      eos_tokens=[cfg.vocab_size], **kw)
        return np.stack([np.asarray(t) for t in out.tokens])

    tokens, steps = common.time_calls(call, args)
    common.write(args, tokens, steps, framework="tunix", path="tunix.generate.sampler.Sampler (" + (
                     "greedy)" if args.mode == "greedy" else f"prompts x{args.samples}, T=1, top_p=1)"),
                 versions=common.versions("google-tunix", "jax", "jaxlib", "flax"),
                 notes=[f"tunix llama3, weights from the shared HF dir, rope_theta={cfg.rope_theta}, "
                        f"{jax.devices()[0].platform}"])


if __name__ == "__main__":
    common.guarded(main)
