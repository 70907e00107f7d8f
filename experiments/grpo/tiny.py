"""Tiny GRPO on CPU: the tiny SFT model gets better at toy tasks it half-knows, from a verifiable reward alone.

Start from the model the tiny SFT experiment exports (run it first: `polmjax sft experiments/sft/tiny.py`);
the prompts are 4,000 offline toy tasks (add two numbers, reverse letters, sort digits) with their exact
answer, 5% held out. The reward is 1 for the exact answer, else 0 (`exact_match_reward`). Every step
samples 8 completions for each of 16 prompts from the current policy, in this process.

Measured (2-core Xeon, shared, ~2 s a step): held-out greedy accuracy 0.590 -> 0.565 / 0.585 at steps
50 / 100, accuracy of temperature-1 samples 0.453 -> 0.456 / 0.474, pass@4 0.645 -> 0.630 / 0.630: the
0.9M SFT model's errors are systematic (addition), so there is little for RL to sharpen (see README).

    polmjax grpo experiments/grpo/tiny.py
    polmjax grpo experiments/grpo/tiny.py --set advantage=rloo --set train.run_dir=runs/grpo_tiny_rloo

The variants (Dr. GRPO, DAPO, GSPO, CISPO, REINFORCE++) are the other files of this directory.
"""

from polmjax.data import DataConfig
from polmjax.train.config import MeshConfig, ModelSource, TrainConfig
from polmjax.train.grpo import GRPOExperiment, Reward
from polmjax.train.optim import OptimConfig


def config() -> GRPOExperiment:
    return GRPOExperiment(
        model=ModelSource(path="runs/sft_tiny/export/hf"),
        data=DataConfig(path="toy:rl", eval_fraction=0.05),
        train=TrainConfig(run_dir="runs/grpo_tiny", steps=100, global_batch=128, seq_len=64, log_every=5,
                          eval_every=50, eval_batches=13, save_every=50, keep=2),  # 13 x 16 = all 200 held-out prompts
        optim=OptimConfig(name="adamw", lr=1e-4, schedule="constant", warmup_steps=0, weight_decay=0.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        rewards=(Reward("polmjax.rl.rewards:exact_match_reward", isolate=False),),
        num_generations=8,
        max_completion_len=16,
        temperature=1.0,
    )
