"""polmjax peer of `sft_throughput.py`: `jit_sft_step` on a one-device mesh, as `polmjax.train.sft.run` builds it.

The model is loaded back with `from_pretrained` from the shared HF directory (the weights TRL and tunix load).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peer_common as common  # noqa: E402


def main():
    args = common.parse_args(["step"])
    import jax
    import jax.numpy as jnp
    import numpy as np

    from polmjax import mesh as mesh_lib
    from polmjax import models
    from polmjax.train.optim import OptimConfig, make_optimizer
    from polmjax.train.sft import BATCH_KEYS, jit_sft_step
    from polmjax.train.state import init_state_sharded, state_shardings

    tokens_BT, loss_mask_BT = common.load_batch(args)
    B, T = tokens_BT.shape
    batch = {
        "input_ids": tokens_BT,
        "targets": np.concatenate([tokens_BT[:, 1:], np.zeros((B, 1), np.int32)], 1),
        "loss_mask": np.concatenate([loss_mask_BT[:, 1:], np.zeros((B, 1), np.float32)], 1),
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
        "segment_ids": np.ones((B, T), np.int32),
    }
    mesh = mesh_lib.make_mesh(1, 1, 1)
    model = models.from_pretrained(args.hf_dir, dtype=jnp.float32, mesh=mesh)
    cfg = model.config
    optimizer, schedule = make_optimizer(OptimConfig(lr=args.lr, schedule="constant", weight_decay=0.0,
                                                     clip_norm=1.0), args.warmup + args.steps)
    state = init_state_sharded(model.params(), optimizer, 0, mesh)
    del model
    batch_sharding = mesh_lib.named_sharding(mesh, ("act_batch", "act_len"), (B, T))
    step_fn = jit_sft_step(state_shardings(state), {}, batch_sharding, model_cfg=cfg, optimizer=optimizer,
                           schedule=schedule, mesh=mesh)
    batch = {k: jax.device_put(batch[k], batch_sharding) for k in BATCH_KEYS}
    holder = {"state": state}

    def step():
        holder["state"], metrics = step_fn(holder["state"], {}, batch)
        jax.block_until_ready((holder["state"], metrics))
        return metrics

    first, steps = common.time_steps(step, args.warmup, args.steps)
    cost = common.xla_cost(step_fn.lower(holder["state"], {}, batch).compile())
    common.write(args, framework="polmjax", path="jit_sft_step (1-device mesh)", steps=steps,
                 first_loss=float(first["loss"]),
                 versions={"polmjax": "checkout", **common.versions("jax", "jaxlib", "flax", "optax")},
                 notes=[f"attention_impl={cfg.attention_impl}, logprob_impl={cfg.logprob_impl} "
                        f"on {jax.devices()[0].platform}, {jax.device_count()} device(s)", cost])


if __name__ == "__main__":
    common.guarded(main)
