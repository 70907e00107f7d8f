"""transformers peer of `sampler_throughput.py`: `model.generate` (torch, CPU) on the shared HF directory.

--mode greedy: do_sample=False. --mode sampled: do_sample=True, temperature 1, top_k=0 and top_p=1 (no
truncation), num_return_sequences=--samples (transformers expands each prompt's rows before the prefill, so
every copy is prefilled). fp32, sdpa attention, transformers' default dynamic KV cache, torch's default thread
count; no end token (eos_token_id=None: every row generates --new-tokens tokens).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sampler_common as common  # noqa: E402


def main():
    args = common.parse_args(["greedy", "sampled"])
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    prompts_BP = np.load(args.prompts)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    ids = torch.from_numpy(prompts_BP).long()
    mask = torch.ones_like(ids)
    P = ids.shape[1]
    if args.mode == "greedy":
        sampling = dict(do_sample=False)
    else:
        torch.manual_seed(0)
        sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=args.samples)

    def call():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0, **sampling)
        return out[:, P:].numpy()

    tokens, steps = common.time_calls(call, args)
    how = "greedy" if args.mode == "greedy" else f"num_return_sequences={args.samples}, T=1"
    common.write(args, tokens, steps, framework="transformers", path=f"model.generate (torch CPU, {how})",
                 versions=common.versions("torch", "transformers"),
                 notes=[f"torch threads {torch.get_num_threads()}, attn_implementation="
                        f"{model.config._attn_implementation}"])


if __name__ == "__main__":
    common.guarded(main)
