"""What every peer of `dpo_throughput.py` shares: its arguments and the preference pairs.

Stdlib and numpy only (each peer imports this from its own venv); timing, the machine-load record and the
result file come from `peer_common`, as in the SFT benchmark.

The pairs file (.npz) holds int32 `prompt` [N, P], `chosen` [N, R] and `rejected` [N, R]: N pairs of a P-token
prompt and two R-token responses, no padding. Every framework scores the R response tokens of prompt + chosen
and prompt + rejected (the log-prob of each response token given all tokens before it).
"""

from __future__ import annotations

import argparse

import numpy as np
import peer_common as common


def parse_args(modes):
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=modes, required=True)
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--pairs", required=True, help=".npz of int32 prompt [N, P], chosen [N, R], rejected [N, R]")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--beta", type=float, required=True)
    p.add_argument("--out", required=True)
    return p.parse_args()


def load_pairs(args):
    """(prompt_NP, chosen_NR, rejected_NR), int32 numpy arrays."""
    with np.load(args.pairs) as z:
        return z["prompt"], z["chosen"], z["rejected"]


def first_metrics(loss, logps_chosen, logps_rejected) -> dict:
    """The numbers every row reports from its first step (before any update): the loss and the mean summed
    log-probs of the chosen and rejected responses (equal across rows = the same computation)."""
    return {"first_loss": float(loss), "first_logps_chosen": float(logps_chosen),
            "first_logps_rejected": float(logps_rejected)}


guarded = common.guarded
time_steps = common.time_steps
versions = common.versions
write = common.write
