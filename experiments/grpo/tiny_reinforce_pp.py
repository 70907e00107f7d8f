"""REINFORCE++ (baseline variant) on the tiny task (Hu et al. 2025, arXiv:2501.03262): group-mean
baseline, then whitening over the whole batch, with a k2 KL penalty in the loss (beta 0.01) to the
initial model.

    polmjax grpo experiments/grpo/tiny_reinforce_pp.py
"""

import dataclasses
import os

from polmjax.config import load_experiment


def config():
    exp = load_experiment(os.path.join(os.path.dirname(__file__), "tiny.py"))  # the GRPO baseline
    return dataclasses.replace(exp, advantage="reinforce_pp", beta=0.01, kl_estimator="k2",
                               train=dataclasses.replace(exp.train, run_dir="runs/grpo_tiny_reinforce_pp"))
