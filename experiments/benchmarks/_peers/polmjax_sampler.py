"""polmjax peer of `sampler_throughput.py`: `polmjax.generate.generate` (prefill + KV-cache decode loop, one jit).

The model is loaded back with `from_pretrained` from the shared HF directory (the weights the peers load).
Greedy, fp32, no end token (every row generates --new-tokens tokens).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sampler_common as common  # noqa: E402


def main():
    args = common.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from polmjax import models
    from polmjax.generate import generate

    prompts_BP = np.load(args.prompts)
    model = models.from_pretrained(args.hf_dir, dtype=jnp.float32)
    cfg, params = model.config, model.params()
    mask_BP = np.ones_like(prompts_BP)

    def call():
        tokens, _ = generate(cfg, params, prompts_BP, mask_BP, max_new_tokens=args.new_tokens, eos_id=-1)
        return jax.device_get(tokens)

    tokens, steps = common.time_calls(call, args)
    compiled = generate.lower(cfg, params, prompts_BP, mask_BP, max_new_tokens=args.new_tokens, eos_id=-1).compile()
    cost = compiled.cost_analysis()
    common.write(args, tokens, steps, framework="polmjax", path="polmjax.generate.generate (jit)",
                 versions={"polmjax": "checkout", **common.versions("jax", "jaxlib", "flax")},
                 notes=[f"attention_impl={cfg.attention_impl} on {jax.devices()[0].platform}, scan_layers="
                        f"{cfg.scan_layers}; XLA cost analysis of the compiled generate (prefill + one decode "
                        f"step, the loop body counted once): {cost['bytes accessed'] / 1e6:.1f} MB accessed"])


if __name__ == "__main__":
    common.guarded(main)
