"""transformers peer of `sampler_throughput.py`: `model.generate` (torch, CPU) on the shared HF directory.

Greedy (do_sample=False), fp32, sdpa attention, transformers' default dynamic KV cache, torch's default thread
count; no end token (eos_token_id=None: every row generates --new-tokens tokens).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sampler_common as common  # noqa: E402


def main():
    args = common.parse_args()
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    prompts_BP = np.load(args.prompts)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    ids = torch.from_numpy(prompts_BP).long()
    mask = torch.ones_like(ids)
    P = ids.shape[1]

    def call():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        return out[:, P:].numpy()

    tokens, steps = common.time_calls(call, args)
    common.write(args, tokens, steps, framework="transformers", path="model.generate (torch CPU, greedy)",
                 versions=common.versions("torch", "transformers"),
                 notes=[f"torch threads {torch.get_num_threads()}, attn_implementation="
                        f"{model.config._attn_implementation}"])


if __name__ == "__main__":
    common.guarded(main)
