"""polmjax peer of `sampler_throughput.py`: its two samplers on the shared HF directory's weights.

--mode generate: `polmjax.generate.generate` (prefill + fixed-length decode loop, one jit), greedy.
--mode greedy:   `polmjax.rl.sampler.sample`, the RL sampler GRPO uses (jitted prefill into a prompt-sized
                 cache, then a jitted while-loop decode), n=1, temperature 0.
--mode sampled:  the same with n=--samples completions per prompt at temperature 1 (one prefill per prompt,
                 its cache rows repeated n times), no top-k/top-p.
The model is loaded back with `from_pretrained` (the weights the peers load); fp32; no end token (every row
generates --new-tokens tokens). The prompts are given unpadded and all of one length, so the RL sampler gets
them as they are (a GRPO run pads prompt batches to `sampler.bucket(longest)` instead).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sampler_common as common  # noqa: E402


def main():
    args = common.parse_args(["generate", "greedy", "sampled"])
    import jax
    import jax.numpy as jnp
    import numpy as np

    from polmjax import models
    from polmjax.generate import generate
    from polmjax.rl import sampler

    prompts_BP = np.load(args.prompts)
    model = models.from_pretrained(args.hf_dir, dtype=jnp.float32)
    cfg, params = model.config, model.params()
    mask_BP = np.ones_like(prompts_BP)
    notes = [f"attention_impl={cfg.attention_impl} on {jax.devices()[0].platform}, scan_layers={cfg.scan_layers}"]

    if args.mode == "generate":
        def call():
            tokens, _ = generate(cfg, params, prompts_BP, mask_BP, max_new_tokens=args.new_tokens, eos_id=-1)
            return jax.device_get(tokens)

        compiled = generate.lower(cfg, params, prompts_BP, mask_BP, max_new_tokens=args.new_tokens,
                                  eos_id=-1).compile()
        notes.append(f"XLA cost analysis of the compiled generate (prefill + one decode step, the loop body counted "
                     f"once): {compiled.cost_analysis()['bytes accessed'] / 1e6:.1f} MB accessed")
        path = "polmjax.generate.generate (jit)"
    else:
        n, temperature = (1, 0.0) if args.mode == "greedy" else (args.samples, 1.0)
        keys = iter(range(10**6))  # a fresh key every call, as a GRPO step draws one

        def call():
            out = sampler.sample(cfg, params, prompts_BP, mask_BP, jax.random.key(next(keys)), n=n,
                                 max_new_tokens=args.new_tokens, eos_ids=(), temperature=temperature)
            tokens, steps = jax.device_get((out.tokens, out.steps))
            if int(steps) != args.new_tokens:
                raise RuntimeError(f"the RL sampler decoded {int(steps)} tokens, expected {args.new_tokens}")
            return tokens

        path = (f"polmjax.rl.sampler.sample (n={n}, " + ("greedy)" if n == 1 and not temperature else "T=1)"))
    tokens, steps = common.time_calls(call, args)
    common.write(args, tokens, steps, framework="polmjax", path=path,
                 versions={"polmjax": "checkout", **common.versions("jax", "jaxlib", "flax")}, notes=notes)


if __name__ == "__main__":
    common.guarded(main)
