"""GRPO (DeepSeekMath's: clipped ratio, KL 0.04 to the initial policy) of Qwen3-1.7B on GSM8K, for a TPU pod slice.

Each step samples 8 completions of each of 32 grade-school word problems (256 completions of up to 1024
tokens) from the live policy, scores them with `math_reward` (math-verify: the completion's `\\boxed{}`
answer against GSM8K's final number) and takes one clipped policy-gradient update on them (on-policy:
μ = 1, one mini-batch; DeepSeekMath arXiv:2402.03300 and TRL's GRPOTrainer: lr 1e-6, ε 0.2, β 0.04 with
the k3 estimator, per-sequence token means). bf16 compute with fp32 master weights, FSDP over every chip,
scan over layers with remat; the reference is a frozen copy of the initial policy, sharded like it.
2% of the prompts are held out: greedy accuracy and pass@4 every 50 steps.

The system prompt asks for the final number in `\\boxed{}`, which math-verify reads first; there is no
format reward (`format_reward` is DeepSeek-R1's `<think>`/`<answer>` template, and `math_reward` would read
the first number of the reasoning in an `<answer>` tag, not the answer). Qwen3 thinks in `<think>` first
(the chat template's default): long thoughts run into max_completion_len and score 0.

    # the prompts (from the hub when online, or a local copy of openai/gsm8k's train split):
    python experiments/grpo/prepare_gsm8k.py --out data/gsm8k/train.jsonl
    python experiments/grpo/prepare_gsm8k.py --source /data/gsm8k/main/train-00000-of-00001.parquet \\
        --out data/gsm8k/train.jsonl
    # on the slice (one host: polmjax grpo runs in one process for now):
    polmjax grpo experiments/grpo/qwen3_1p7b_gsm8k.py --set train.run_dir=/mnt/shared/runs/qwen3-1p7b-gsm8k
    # will it fit (config.json only, no weights): the update, the sampler and the reference's forward
    python tpu/aot_compile.py experiments/grpo/qwen3_1p7b_gsm8k.py --target v5p:2x2x1 --set model.path=DIR

Memory fit, compiled ahead of time from a CPU host (`tpu/aot_compile.py`; a directory holding only the
model's config.json is enough), GiB per chip. The update holds the state (fp32 params + Adam) and the
reference; the sampler (32 prompts of 512 tokens, 8 x 1024 new tokens: a 256 x 1536-slot bf16 KV cache)
and the reference's forward over the whole rollout run while both stay resident; peak = the largest:

    target     grad_accum  update: args + temp = total  sampler peak (decode temp)  ref forward  peak / HBM  compile
    v5p:2x2x1   4          4.81 + 40.18 = 44.99         17.94 (12.69)               8.95         45.0 / 95   188 + 237 s
    v5e:2x4    16          2.41 +  8.74 = 11.15          9.92 (7.29)                7.21         11.1 / 16   526 + 117 s

(v5e: `--set train.grad_accum=16`; compile times: update + rollout programs, on a loaded 2-core host.)
"""

from polmjax.data import DataConfig
from polmjax.train.config import MeshConfig, ModelSource, TrainConfig
from polmjax.train.grpo import GRPOExperiment, Reward
from polmjax.train.optim import OptimConfig


def config() -> GRPOExperiment:
    return GRPOExperiment(
        model=ModelSource(path="Qwen/Qwen3-1.7B", dtype="float32", compute_dtype="bfloat16",
                          remat="dots_no_batch", scan_layers=True),
        data=DataConfig(path="data/gsm8k/train.jsonl", format="prompt", eval_fraction=0.02),
        # 32 prompts x 8 completions; a row holds a prompt (<= 512 tokens) and its completion (<= 1024)
        train=TrainConfig(run_dir="runs/qwen3_1p7b_gsm8k_grpo", steps=200, global_batch=256, seq_len=1536,
                          grad_accum=4, log_every=1, eval_every=50, eval_batches=4, save_every=25, keep=3),
        optim=OptimConfig(name="adamw", lr=1e-6, schedule="constant", warmup_steps=10, weight_decay=0.0,
                          clip_norm=1.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        rewards=(Reward("polmjax.rl.rewards:math_reward"),),
        num_generations=8,
        max_completion_len=1024,
        temperature=1.0,
        loss="clipped",
        epsilon_low=0.2,
        epsilon_high=0.2,
        aggregation="seq_mean_token_mean",
        beta=0.04,
        kl_estimator="k3",
        reference="copy",
        eval_samples=4,
        verifier_workers=8,
    )
