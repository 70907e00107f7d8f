"""polmjax peer of `sft_throughput.py`: `jit_sft_step` on a one-device mesh, as `polmjax.train.sft.run` builds it.

The model is loaded back with `from_pretrained` from the shared HF directory (the weights TRL and tunix load).
--mode step: time the step (and note XLA's cost analysis).
--mode compare (for `sft_step_compare.py`): the same timing, plus the compiled CPU program's cost and memory
  analysis (HLO text into --dump-dir), and with --target the same step compiled ahead of time for one chip of
  that TPU slice twice: as polmjax runs it there (attention and log-probs in the Pallas TPU kernels) and with
  impl="xla" (plain XLA attention and chunked log-probs, as tunix).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peer_common as common  # noqa: E402


def main():
    args = common.parse_args(["step", "compare"])
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
    compiled = step_fn.lower(holder["state"], {}, batch).compile()
    notes = [f"attention_impl={cfg.attention_impl}, logprob_impl={cfg.logprob_impl} "
             f"on {jax.devices()[0].platform}, {jax.device_count()} device(s)"]
    extra = {}
    if args.mode == "compare":
        common.dump_hlo(args, "polmjax_cpu", compiled)
        extra["cpu"] = common.cost_report(compiled)
        if args.target:
            try:
                extra["tpu"] = {impl: _tpu_report(cfg, optimizer, schedule, B, T, args, impl)
                                for impl in ("auto", "xla")}
            except Exception as e:  # noqa: BLE001 - reported in the table; the CPU numbers still stand
                extra["tpu_error"] = common.one_line(e)
    else:
        notes.append(common.xla_cost(compiled))
    common.write(args, framework="polmjax", path="jit_sft_step (1-device mesh)", steps=steps,
                 first_loss=float(first["loss"]),
                 versions={"polmjax": "checkout", **common.versions("jax", "jaxlib", "flax", "optax", "libtpu")},
                 notes=notes, **extra)


def _tpu_report(cfg, optimizer, schedule, B, T, args, impl):
    """Cost and memory of the same step compiled for one chip of args.target (abstract arrays, no data):
    impl="auto" is what polmjax runs there (Pallas TPU kernels), "xla" the plain-XLA attention and log-probs."""
    import jax
    import jax.numpy as jnp

    from polmjax import mesh as mesh_lib
    from polmjax import models
    from polmjax.train.sft import BATCH_KEYS, jit_sft_step
    from polmjax.train.state import init_state, state_shardings_for

    mesh = mesh_lib.make_mesh(1, 1, 1, devices=common.tpu_devices(args.target)[:1])
    cfg = cfg.replace(attention_impl=impl, logprob_impl=impl)

    def abstract(tree, shardings):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)

    params = abstract(jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0))),
                      models.param_shardings(cfg, mesh))
    state_sh = state_shardings_for(params, optimizer, mesh)
    state = abstract(jax.eval_shape(lambda p: init_state(p, optimizer, 0), params), state_sh)
    batch_sh = mesh_lib.named_sharding(mesh, ("act_batch", "act_len"), (B, T))
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.float32 if k == "loss_mask" else jnp.int32, sharding=batch_sh)
             for k in BATCH_KEYS}
    step = jit_sft_step(state_sh, {}, batch_sh, model_cfg=cfg, optimizer=optimizer, schedule=schedule, mesh=mesh)
    compiled = step.lower(state, {}, batch).compile()
    common.dump_hlo(args, f"polmjax_{args.target.replace(':', '_')}_{impl}", compiled)
    return common.cost_report(compiled)


if __name__ == "__main__":
    common.guarded(main)
