"""tunix peer of `grpo_step.py`: `tunix.rl.grpo.grpo_learner.GRPOLearner.train()` on tunix's own Llama 3 model.

The model comes from the shared HF directory (`tunix_peer.load_model`); the tokenizer is the shared HF one
(tunix's `TokenizerAdapter` wraps it). One `RLCluster` on a 1-device ("fsdp", "tp") mesh for every role, so
the actor trainer and the vanilla rollout (tunix's `Sampler`) share one model (no weight sync); no reference
(beta 0), no critic. RolloutConfig: max_tokens_to_generate = the completion length, max_prompt_length = the
prompt length, kv cache of prompt + completion tokens, temperature 1 with top_p 1.0 (tunix's sampling mode;
top_p=None would be greedy) and no top-k, EOS ids = [vocab size] (an id the model never samples: every
completion runs to the full length, as polmjax's ignore_eos). GRPOConfig: num_generations G, num_iterations 1,
beta 0, epsilon 0.2, loss_agg_mode sequence-mean-token-mean, advantages "grpo" (per-group mean and std).
RLTrainingConfig: one mini-batch = the whole batch (one optimizer update a step), optax AdamW (constant lr,
betas 0.9/0.999, eps 1e-8, weight decay 0) behind global-norm clipping at 1.0, no checkpoints, no metrics
backends, no progress bar. The data: one {"prompts": [P strings]} a step; the learner repeats each prompt G
times before sampling.

Timing: `TrainingHooks.on_train_step_start` of the actor trainer marks each step (one interval = the actor
update of step i, then the sampling, scoring and advantages of step i+1, up to its update: one whole step in
steady state; one extra step closes the last interval). `RLCluster.generate` is timed inside the step by a
subclass that only wraps it: the sampling part of the split. tunix compiles its train step twice on one device
(see tunix_peer.py), so --warmup should be >= 2.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpo_common as common  # noqa: E402
from tunix_peer import load_model  # noqa: E402


def main():
    args = common.parse_args(["learner"])
    import jax
    import numpy as np
    import optax
    from transformers import AutoTokenizer
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout
    from tunix.sft import hooks

    prompts = common.load_prompts(args)
    total = args.warmup + args.steps + 1  # + 1: the last timed interval ends at the start of this step
    P, G, L, C = args.prompts_per_step, args.generations, args.prompt_len, args.completion_len
    if len(prompts) < total * P:
        raise ValueError(f"{len(prompts)} prompts for {total} steps of {P}")
    model, notes = load_model(args.hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(args.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
    Role = rl_cluster_lib.Role
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={Role.ACTOR: mesh, Role.REFERENCE: mesh, Role.ROLLOUT: mesh}, rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optimizer, eval_every_n_steps=10**9, max_steps=total, pbar_description=None),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=C, max_prompt_length=L, kv_cache_size=L + C + 1, temperature=1.0, top_p=1.0,
            top_k=None, eos_tokens=[model.config.vocab_size]))

    class TimedRLCluster(rl_cluster_lib.RLCluster):
        """RLCluster with its sampling call timed (nothing else changed)."""

        def __init__(self, *a, **kw):
            self.generate_s, self.lengths = [], []
            super().__init__(*a, **kw)

        def generate(self, *a, **kw):
            t = time.perf_counter()
            out = super().generate(*a, **kw)
            self.generate_s.append(time.perf_counter() - t)
            self.lengths.append(sorted({len(t) for t in out.tokens}))
            return out

    cluster = TimedRLCluster(actor=model, reference=None, tokenizer=tokenizer, cluster_config=cluster_config)
    first_reward = []

    def reward(prompts, completions, **kw):
        out = common.reward(prompts, completions, **kw)
        if not first_reward:
            first_reward.append(float(np.mean(out)))
        return out

    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster, reward_fns=[reward],
        algo_config=grpo_learner.GRPOConfig(num_generations=G, num_iterations=1, beta=0.0, epsilon=0.2,
                                            loss_agg_mode="sequence-mean-token-mean"))

    class Timer(hooks.TrainingHooks):
        """Marks each actor update's start: step i lasts from its update's start to step i+1's."""

        def __init__(self):
            self.clock = common.Clock()

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
    cluster.actor_trainer.with_training_hooks(timer)
    t0 = time.perf_counter()
    # the prompts as one numpy array a batch: the learner repeats every leaf of a batch G times (np.repeat)
    learner.train([{"prompts": np.array(prompts[i * P:(i + 1) * P])} for i in range(total)])
    wall = time.perf_counter() - t0
    steps = timer.clock.steps(args.warmup)
    if len(cluster.generate_s) != total or len(timer.clock.marks) != total:
        raise RuntimeError(f"tunix sampled {len(cluster.generate_s)} times and updated {len(timer.clock.marks)} times "
                           f"in {total} steps, expected once each a step")
    if any(lengths != [C] for lengths in cluster.lengths):
        raise RuntimeError(f"tunix's completion lengths {cluster.lengths}, expected every one {C}")
    # interval i (after the warm-up) holds the sampling of step warmup + i + 1
    generate_s = cluster.generate_s[args.warmup + 1:args.warmup + 1 + len(steps)]
    notes.append(f"{jax.devices()[0].platform}; {len(timer.clock.marks)} steps run (the last one only closes the "
                 f"last timed interval), train() wall {wall:.1f}s; completion lengths {cluster.lengths[0]}")
    common.write(args, steps, generate_s=generate_s, framework="tunix", path="tunix GRPOLearner.train() + hooks",
                 notes=notes, first_reward=first_reward[0] if first_reward else float("nan"),
                 versions=common.versions("google-tunix", "jax", "jaxlib", "flax", "optax"))


if __name__ == "__main__":
    common.guarded(main)
