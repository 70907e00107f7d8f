"""RLOO advantages on the tiny task (Ahmadian et al. 2024, arXiv:2402.14740): each completion's baseline
is the mean reward of the other samples of its prompt.

    polmjax grpo experiments/grpo/tiny_rloo.py
"""

import dataclasses
import os

from polmjax.config import load_experiment


def config():
    exp = load_experiment(os.path.join(os.path.dirname(__file__), "tiny.py"))  # the GRPO baseline
    return dataclasses.replace(exp, advantage="rloo", train=dataclasses.replace(exp.train, run_dir="runs/grpo_tiny_rloo"))
