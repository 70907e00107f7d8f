"""Dr. GRPO on the tiny task (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783):
no std scaling of the advantage and a constant normaliser (sum / (B x max_completion_len)) instead of
per-sequence token means, which removes GRPO's length and difficulty biases.

    polmjax grpo experiments/grpo/tiny_dr_grpo.py
"""

import dataclasses
import os

from polmjax.config import load_experiment


def config():
    exp = load_experiment(os.path.join(os.path.dirname(__file__), "tiny.py"))  # the GRPO baseline
    return dataclasses.replace(exp, scale_rewards="none", aggregation="seq_mean_token_sum_norm",
                               train=dataclasses.replace(exp.train, run_dir="runs/grpo_tiny_dr_grpo"))
