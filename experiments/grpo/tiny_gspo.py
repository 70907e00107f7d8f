"""GSPO on the tiny task (Zheng et al. 2025, arXiv:2507.18071): one importance ratio per sequence (the
geometric mean of the token ratios), clipped with the paper's tight range (3e-4, 4e-4). It only differs
from GRPO off-policy, so this variant takes two mini-batches per rollout.

    polmjax grpo experiments/grpo/tiny_gspo.py
"""

import dataclasses
import os

from polmjax.config import load_experiment


def config():
    exp = load_experiment(os.path.join(os.path.dirname(__file__), "tiny.py"))  # the GRPO baseline
    return dataclasses.replace(exp, loss="gspo", epsilon_low=3e-4, epsilon_high=4e-4, mini_batches=2,
                               train=dataclasses.replace(exp.train, run_dir="runs/grpo_tiny_gspo"))
