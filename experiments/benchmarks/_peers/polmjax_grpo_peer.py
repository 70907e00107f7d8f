"""polmjax peer of `grpo_step.py`: `polmjax.train.run.run(exp, grpo.ALGORITHM)`, the production GRPO run.

The experiment is a `GRPOExperiment` on the shared HF directory (model and tokenizer) and the prompts file:
`prompts_per_step x generations` completions a step (train.global_batch), train.seq_len = prompt + completion
tokens, temperature 1 with no truncation, `ignore_eos=True` (every completion runs to max_completion_len), the
benchmark's reward in-process (`isolate=False`), GRPO advantages scaled per group, the clipped loss averaged as
seq_mean_token_mean, beta 0 (no reference), one update a step (on-policy: no old-log-prob forward), AdamW
(constant lr, weight decay 0, global-norm clipping 1.0) on a one-device mesh. No evaluation, checkpoints or
export inside the timed steps (save_every beyond the run; the final save comes after the last interval).

The run is the one `polmjax grpo` does; the only addition is a wrapper around `Algorithm.rollout` that marks a
clock at the start of each `Rollout.step` (one interval = one step plus the loop's work until the next one,
as the trainer rows of TRL and tunix are timed; one extra step closes the last interval) and keeps the step's
own metrics: `time/generate` (the sampler, to tokens on the host), `time/score`, `time/train`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpo_common as common  # noqa: E402


def main():
    args = common.parse_args(["run"])
    import jax

    from polmjax.data import DataConfig
    from polmjax.train import grpo
    from polmjax.train import run as run_lib
    from polmjax.train.config import MeshConfig, ModelSource, TrainConfig
    from polmjax.train.optim import OptimConfig

    total = args.warmup + args.steps + 1  # + 1: the last timed interval ends at the start of this step
    exp = grpo.GRPOExperiment(
        model=ModelSource(path=args.hf_dir),
        data=DataConfig(path=args.prompts, format="prompt"),
        train=TrainConfig(run_dir=tempfile.mkdtemp(prefix="polmjax_grpo_"), steps=total,
                          global_batch=args.prompts_per_step * args.generations,
                          seq_len=args.prompt_len + args.completion_len, log_every=1, save_every=10 * total, keep=1,
                          export_hf=False, tensorboard=False),
        optim=OptimConfig(name="adamw", lr=args.lr, schedule="constant", warmup_steps=0, weight_decay=0.0,
                          clip_norm=1.0),
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),
        rewards=(grpo.Reward("grpo_common:reward", isolate=False),),
        num_generations=args.generations, max_completion_len=args.completion_len, temperature=1.0,
        ignore_eos=True, advantage="grpo", scale_rewards="group", loss="clipped", epsilon_low=0.2,
        epsilon_high=0.2, aggregation="seq_mean_token_mean", beta=0.0)

    clock, step_metrics = common.Clock(), []

    def timed_rollout(*a, **kw):
        rollout = grpo.rollout(*a, **kw)
        step = rollout.step

        def timed_step(state, prompts):
            clock.mark()
            state, metrics = step(state, prompts)
            step_metrics.append(metrics)
            return state, metrics

        rollout.step = timed_step
        return rollout

    run_lib.run(exp, dataclasses.replace(grpo.ALGORITHM, rollout=timed_rollout))
    steps = clock.steps(args.warmup)
    timed = step_metrics[args.warmup:args.warmup + len(steps)]
    lengths = {m["completion_length/mean"] for m in step_metrics}
    if lengths != {float(args.completion_len)}:
        raise RuntimeError(f"completion lengths {sorted(lengths)}, expected every one {args.completion_len}")
    notes = [f"{jax.devices()[0].platform}, {jax.device_count()} device(s); {len(clock.marks)} steps run (the last "
             f"one only closes the last timed interval); prompts padded by the sampler to "
             f"bucket({args.prompt_len}) = {_bucket(args.prompt_len)} tokens; median of the steps' own time/step "
             f"{_median([m['time/step'] for m in timed]):.3f}s, time/score {_median([m['time/score'] for m in timed]):.4f}s, "
             f"time/train (the jitted update) {_median([m['time/train'] for m in timed]):.3f}s"]
    common.write(args, steps, generate_s=[m["time/generate"] for m in timed], framework="polmjax",
                 path="polmjax.train.run.run(exp, grpo.ALGORITHM)", notes=notes,
                 first_reward=step_metrics[0]["reward"],
                 versions={"polmjax": "checkout", **common.versions("jax", "jaxlib", "flax", "optax")})


def _bucket(n):
    from polmjax.rl.sampler import bucket

    return bucket(n)


def _median(xs):
    import statistics

    return statistics.median(xs) if xs else float("nan")


if __name__ == "__main__":
    common.guarded(main)
