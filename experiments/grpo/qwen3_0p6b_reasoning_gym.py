"""GRPO of Qwen3-0.6B on reasoning-gym's countdown (reach a target number with 3-4 given numbers and + - * /),
for a TPU pod slice.

The prompts are generated offline by reasoning-gym (procedural, unlimited, each with its own verifier);
each row carries the dataset item as `entry`, and `reasoning_gym_reward` scores the content of the
completion's last `<answer>...</answer>` with that task's `score_answer` (1.0 for an expression that uses
the numbers and reaches the target; 0.05 for a valid expression that misses it, 0.01 otherwise). The system prompt is
reasoning-gym's default (think step by step, then `<answer>answer here</answer>`). Each step samples 8
completions of each of 32 problems (256 completions of up to 1024 tokens: Qwen3 thinks in `<think>` first)
and takes one clipped update (on-policy GRPO, no KL term, lr 1e-6). bf16 compute with fp32 master
weights, FSDP over every chip, scan over layers with remat.

    # 20,000 problems plus their verifiers' data (offline):
    python experiments/grpo/prepare_reasoning_gym.py --task countdown --size 20000 \\
        --config '{"min_numbers": 3, "max_numbers": 4}' --out data/reasoning_gym/countdown.jsonl
    # on the slice (one host: polmjax grpo runs in one process for now):
    polmjax grpo experiments/grpo/qwen3_0p6b_reasoning_gym.py --set train.run_dir=/mnt/shared/runs/qwen3-0p6b-countdown
    # another task, or several mixed (e.g. --task knights_knaves,basic_arithmetic): prepare, then
    polmjax grpo experiments/grpo/qwen3_0p6b_reasoning_gym.py --set data.path=data/reasoning_gym/mix.jsonl
    # will it fit (config.json only, no weights): the update and the sampler
    python tpu/aot_compile.py experiments/grpo/qwen3_0p6b_reasoning_gym.py --target v5e:2x4 --set model.path=DIR

Memory fit, compiled ahead of time from a CPU host (`tpu/aot_compile.py`; a directory holding only the
model's config.json is enough), GiB per chip. The update holds the state (fp32 params + Adam); the sampler
(32 prompts of 256 tokens, 8 x 1024 new tokens: a 256 x 1280-slot bf16 KV cache) runs while it stays
resident; peak = the larger:

    target     grad_accum  update: args + temp = total  sampler peak (decode temp)  peak / HBM  compile
    v5e:2x4     4          0.84 + 10.03 = 10.87          6.34 (5.40)                10.9 / 16   464 + 73 s
    v5p:2x2x1   4          1.67 + 19.44 = 21.11         11.74 (9.85)               21.1 / 95   194 + 87 s

(grad_accum 2 on v5e:2x4 does not fit: 16.7 GiB of update temporaries. Compile times: update + rollout
programs, on a loaded 2-core host.)
"""

from polmjax.data import DataConfig
from polmjax.train.config import MeshConfig, ModelSource, TrainConfig
from polmjax.train.grpo import GRPOExperiment, Reward
from polmjax.train.optim import OptimConfig


def config() -> GRPOExperiment:
    return GRPOExperiment(
        model=ModelSource(path="Qwen/Qwen3-0.6B", dtype="float32", compute_dtype="bfloat16",
                          remat="dots_no_batch", scan_layers=True),
        data=DataConfig(path="data/reasoning_gym/countdown.jsonl", format="prompt", eval_fraction=0.01),
        # 32 prompts x 8 completions; a row holds a prompt (<= 256 tokens) and its completion (<= 1024)
        train=TrainConfig(run_dir="runs/qwen3_0p6b_countdown_grpo", steps=300, global_batch=256, seq_len=1280,
                          grad_accum=4, log_every=1, eval_every=50, eval_batches=4, save_every=25, keep=3),
        optim=OptimConfig(name="adamw", lr=1e-6, schedule="constant", warmup_steps=10, weight_decay=0.0,
                          clip_norm=1.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        # a fresh verifier worker imports reasoning_gym on its first call (a few seconds)
        rewards=(Reward("polmjax.rl.rewards:reasoning_gym_reward", timeout_s=30.0),),
        num_generations=8,
        max_completion_len=1024,
        temperature=1.0,
        loss="clipped",
        aggregation="seq_mean_token_mean",
        beta=0.0,
        eval_samples=4,
        verifier_workers=8,
    )
