"""CISPO on the tiny task (MiniMax-M1, arXiv:2506.13585): the importance weight is clipped and detached,
so every token keeps a gradient; ε_high = 4 is TRL's default cap of 5 on the weight; token-mean loss.
Two mini-batches per rollout, so the weights differ from 1.

    polmjax grpo experiments/grpo/tiny_cispo.py
"""

import dataclasses
import os

from polmjax.config import load_experiment


def config():
    exp = load_experiment(os.path.join(os.path.dirname(__file__), "tiny.py"))  # the GRPO baseline
    return dataclasses.replace(exp, loss="cispo", epsilon_high=4.0, aggregation="token_mean", mini_batches=2,
                               train=dataclasses.replace(exp.train, run_dir="runs/grpo_tiny_cispo"))
