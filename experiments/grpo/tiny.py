"""Tiny GRPO on CPU: the tiny SFT model gets better at toy tasks it half-knows, from a verifiable reward alone.

Start from the model the tiny SFT experiment exports (run it first: `polmjax sft experiments/sft/tiny.py`);
the prompts are 4,000 offline toy tasks (add two numbers, reverse letters, sort digits) with their exact
answer, 5% held out. The reward is 1 for the exact answer, else 0 (`exact_match_reward`). Every step
samples 8 completions for each of 8 prompts from the current policy, in this process.

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
        train=TrainConfig(run_dir="runs/grpo_tiny", steps=60, global_batch=64, seq_len=64, log_every=5,
                          eval_every=20, eval_batches=4, save_every=20, keep=2),  # 4 x 8 held-out prompts
        optim=OptimConfig(name="adamw", lr=2e-4, schedule="constant", warmup_steps=0, weight_decay=0.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        rewards=(Reward("polmjax.rl.rewards:exact_match_reward", isolate=False),),
        num_generations=8,
        max_completion_len=16,
        temperature=1.0,
    )
