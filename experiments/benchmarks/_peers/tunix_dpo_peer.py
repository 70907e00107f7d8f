"""tunix peer of `dpo_throughput.py`: `tunix.sft.dpo.dpo_trainer.DPOTrainer` on tunix's own Llama 3 model.

Policy and reference are loaded separately from the shared HF directory (`tunix_peer.load_model`, as the SFT
benchmark loads them), so the reference is a frozen copy of the initial weights. Full-parameter training, optax
AdamW behind global-norm clipping at 1.0, no mesh (one CPU device), no checkpoints, no metrics backends, no
progress bar. The batch is a pre-tokenised `TrainingInput` (no padding, masks all ones).

A tunix DPO step is two jitted programs: `DPOTrainer._prepare_inputs` runs the reference forward
(`compute_logps`, its own nnx.jit) on the host side of the loop, then the trainer's train step runs the policy.
--mode step: `train_step(trainer._prepare_inputs(batch))` in a plain loop (both programs, as `train()` runs them).
--mode trainer: `DPOTrainer.train()`, step times from `TrainingHooks.on_train_step_start` (one interval = one
  step's input preparation, dispatch and the wait for the previous step; one extra step closes the last one).
tunix compiles its step twice when there is no mesh (the optimizer state changes layout after the first call),
so --warmup must be >= 2.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dpo_common as common  # noqa: E402
import peer_common  # noqa: E402
from tunix_peer import _compiled_train_step, load_model  # noqa: E402


def main():
    args = common.parse_args(["step", "trainer"])
    import jax
    import jax.numpy as jnp
    import optax
    from tunix.sft import hooks
    from tunix.sft.dpo import dpo_trainer

    prompt_NP, chosen_NR, rejected_NR = common.load_pairs(args)
    model, notes = load_model(args.hf_dir)
    ref_model, _ = load_model(args.hf_dir)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(args.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
    total = args.warmup + args.steps
    config = dpo_trainer.DPOTrainingConfig(eval_every_n_steps=10**9, max_steps=None, pbar_description=None,
                                           algorithm="dpo", beta=args.beta)
    trainer = dpo_trainer.DPOTrainer(model, ref_model, optimizer, config)
    ones = lambda x: jnp.ones(x.shape, jnp.int32)  # noqa: E731 - no padding anywhere
    example = dpo_trainer.TrainingInput(
        prompt_ids=jnp.asarray(prompt_NP), prompt_mask=ones(prompt_NP), chosen_ids=jnp.asarray(chosen_NR),
        chosen_mask=ones(chosen_NR), rejected_ids=jnp.asarray(rejected_NR), rejected_mask=ones(rejected_NR))
    prepared = trainer._prepare_inputs(example)
    loss, aux = dpo_trainer.dpo_loss_fn(model, prepared, beta=args.beta)
    first = common.first_metrics(loss, aux["log_probs/chosen"], aux["log_probs/rejected"])
    cost = {}
    try:
        cost["policy train step"] = peer_common.cost_report(_compiled_train_step(trainer, prepared))
        cost["reference forward"] = peer_common.cost_report(_compiled_ref_logps(ref_model, prepared))
    except Exception as e:  # noqa: BLE001 - a note, never a failure
        notes.append(f"no cost analysis: {peer_common.one_line(e)}")

    if args.mode == "step":
        train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)

        def step():
            return jax.block_until_ready(train_step(trainer._prepare_inputs(example)))

        _, steps = common.time_steps(step, args.warmup, args.steps)
        path = "_prepare_inputs + jitted train step, loop"
    else:
        class Timer(hooks.TrainingHooks):
            """Marks each step's start: step i lasts from its start to step i+1's."""

            def __init__(self):
                self.clock = peer_common.Clock()

            def on_train_start(self, ctx):
                pass

            def on_train_end(self, ctx):
                pass

            def on_train_step_start(self, ctx):
                self.clock.mark()

            def on_train_step_end(self, ctx, train_step, train_loss):
                pass

            def on_eval_step_start(self, ctx):
                pass

            def on_eval_step_end(self, ctx, eval_loss):
                pass

        timer = Timer()
        trainer.with_training_hooks(timer)
        trainer.train([example] * (total + 1))
        steps = timer.clock.steps(args.warmup)
        path = "DPOTrainer.train() + TrainingHooks"
        notes.append(f"{len(timer.clock.marks)} steps run; the last one only closes the last timed interval")
    common.write(args, steps, framework="tunix", path=path, **first, cost=cost, notes=notes,
                 versions=common.versions("google-tunix", "jax", "jaxlib", "flax", "optax"))


def _compiled_ref_logps(ref_model, prepared):
    """tunix's reference forward (`dpo_trainer.compute_logps`) as one pure jitted function, compiled."""
    import jax
    from flax import nnx
    from tunix.sft.dpo import dpo_trainer

    graph, state = nnx.split(ref_model)

    def pure(state, ex):
        return dpo_trainer.compute_logps(nnx.merge(graph, state), ex.input_ids, ex.positions, ex.attention_mask,
                                         ex.logits_to_keep, ex.completion_mask)

    return jax.jit(pure).lower(state, prepared).compile()


if __name__ == "__main__":
    common.guarded(main)
