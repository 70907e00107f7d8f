"""polmjax peer of `dpo_throughput.py`: `polmjax.train.dpo.dpo_step` jitted as a DPO run jits it.

One-device mesh; the state donated; the reference a frozen copy of the initial policy (`reference_params`,
as `polmjax dpo` builds it with reference="copy"), passed as frozen["reference"] and not donated. The batch is
the preference pipeline's packed layout: pair n is row n, prompt + chosen as segment 1 and prompt + rejected
as segment 2 (T = 2 (P + R) tokens a row), pairs_per_row(T) slots a row as in a run; chosen and rejected go
through one forward. The result also holds XLA's cost analysis of the compiled step.
--mode step: each step timed to its end (`block_until_ready`), as the SFT benchmark times `jit_sft_step`.
--mode loop: as `polmjax.train.loop` runs it, one step in flight (dispatch step i+1, then wait for step i),
  timed between dispatches like tunix's and TRL's trainer rows.
"""

from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dpo_common as common  # noqa: E402
import peer_common  # noqa: E402


def main():
    args = common.parse_args(["step", "loop"])
    import jax
    import jax.numpy as jnp

    from polmjax import mesh as mesh_lib
    from polmjax import models
    from polmjax.data import pairs_per_row
    from polmjax.train.dpo import BATCH_KEYS, dpo_step, reference_params
    from polmjax.train.optim import OptimConfig, make_optimizer
    from polmjax.train.state import init_state_sharded, state_shardings

    batch = pack_pairs(*common.load_pairs(args))
    B, T = batch["input_ids"].shape
    mesh = mesh_lib.make_mesh(1, 1, 1)
    model = models.from_pretrained(args.hf_dir, dtype=jnp.float32, mesh=mesh)
    cfg = model.config
    optimizer, schedule = make_optimizer(OptimConfig(lr=args.lr, schedule="constant", weight_decay=0.0,
                                                     clip_norm=1.0), args.warmup + args.steps)
    state = init_state_sharded(model.params(), optimizer, 0, mesh)
    del model
    frozen = {"base": {}, "reference": reference_params(state.params, {}, lora=False)}
    batch_sharding = mesh_lib.named_sharding(mesh, ("act_batch", "act_len"), (B, T))
    state_sh = state_shardings(state)
    step_fn = jax.jit(
        functools.partial(dpo_step, model_cfg=cfg, optimizer=optimizer, loss="sigmoid", beta=args.beta,
                          pairs_per_row=pairs_per_row(T), schedule=schedule, mesh=mesh),
        in_shardings=(state_sh, jax.tree.map(lambda x: x.sharding, frozen), {k: batch_sharding for k in BATCH_KEYS}),
        out_shardings=(state_sh, None), donate_argnums=(0,))
    batch = {k: jax.device_put(batch[k], batch_sharding) for k in BATCH_KEYS}
    holder = {"state": state}

    def step():
        holder["state"], metrics = step_fn(holder["state"], frozen, batch)
        jax.block_until_ready((holder["state"], metrics))
        return metrics

    if args.mode == "step":
        first, steps = common.time_steps(step, args.warmup, args.steps)
    else:
        first, steps = _time_loop(lambda: step_fn(holder["state"], frozen, batch), holder, args)
    compiled = step_fn.lower(holder["state"], frozen, batch).compile()
    notes = [f"attention_impl={cfg.attention_impl}, logprob_impl={cfg.logprob_impl} on {jax.devices()[0].platform}, "
             f"{jax.device_count()} device(s); batch {B} rows x {T} tokens (one pair a row, "
             f"pairs_per_row={pairs_per_row(T)} slots)"]
    path = "jit(dpo_step), state donated" if args.mode == "step" else "jit(dpo_step), one step in flight"
    common.write(args, steps, framework="polmjax", path=path,
                 **common.first_metrics(first["loss"], first["logps/chosen"], first["logps/rejected"]),
                 cost={"policy step + reference forward": peer_common.cost_report(compiled)},
                 versions={"polmjax": "checkout", **common.versions("jax", "jaxlib", "flax", "optax")}, notes=notes)


def _time_loop(dispatch, holder, args):
    """As `polmjax.train.loop` runs steps: dispatch step i+1, then wait for step i (one step in flight, so
    the host's work overlaps the device's). Marks at each dispatch, as tunix's and TRL's trainer rows; one
    extra step closes the last timed interval. Returns (the first step's metrics, Clock.steps(warmup))."""
    import jax

    clock, pending, first = peer_common.Clock(), None, None
    for _ in range(args.warmup + args.steps + 1):
        clock.mark()
        holder["state"], metrics = dispatch()
        if pending is not None:
            jax.block_until_ready(pending)
        first = metrics if first is None else first
        pending = metrics
    jax.block_until_ready((holder["state"], pending))
    return first, clock.steps(args.warmup)


def pack_pairs(prompt_NP, chosen_NR, rejected_NR):
    """The preference pipeline's batch for N pairs, one a row: numpy arrays [N, 2 (P + R)] by key."""
    import numpy as np

    N, P = prompt_NP.shape
    R = chosen_NR.shape[1]
    n = P + R
    chosen_seq, rejected_seq = (np.concatenate([prompt_NP, x], 1) for x in (chosen_NR, rejected_NR))
    input_ids = np.concatenate([chosen_seq, rejected_seq], 1).astype(np.int32)
    targets = np.zeros_like(input_ids)
    loss_mask = np.zeros(input_ids.shape, np.float32)
    for s, seq in enumerate((chosen_seq, rejected_seq)):
        targets[:, s * n:s * n + n - 1] = seq[:, 1:]  # next token within the sequence; 0 at its last token
        loss_mask[:, s * n + P - 1:s * n + n - 1] = 1.0  # targets that are response tokens
    positions = np.tile(np.concatenate([np.arange(n), np.arange(n)]), (N, 1)).astype(np.int32)
    segment_ids = np.repeat(np.array([1, 2], np.int32), n)[None].repeat(N, 0)
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask, "positions": positions,
            "segment_ids": segment_ids, "is_chosen": segment_ids == 1}


if __name__ == "__main__":
    common.guarded(main)
