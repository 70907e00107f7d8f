"""DAPO on the tiny task (Yu et al. 2025, arXiv:2503.14476): clip-higher (ε_low 0.2, ε_high 0.28),
token-mean aggregation, dynamic sampling (groups whose completions all score the same are dropped and
more prompts drawn until the batch is full), no loss on truncated completions, and the soft over-length
punishment as a second reward.

    polmjax grpo experiments/grpo/tiny_dapo.py
"""

import dataclasses
import os

from polmjax.config import load_experiment
from polmjax.train.grpo import Reward


def config():
    exp = load_experiment(os.path.join(os.path.dirname(__file__), "tiny.py"))  # the GRPO baseline
    overlong = Reward("polmjax.rl.rewards:overlong_reward", isolate=False,
                      kwargs={"max_len": exp.max_completion_len, "buffer": 4})
    return dataclasses.replace(exp, epsilon_low=0.2, epsilon_high=0.28, aggregation="token_mean",
                               dynamic_sampling=True, max_sampling_rounds=3, mask_truncated=True,
                               rewards=exp.rewards + (overlong,),
                               train=dataclasses.replace(exp.train, run_dir="runs/grpo_tiny_dapo"))
