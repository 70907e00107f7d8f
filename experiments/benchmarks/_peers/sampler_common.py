"""What every peer of `sampler_throughput.py` shares: its arguments, timing and the result files.

Stdlib and numpy only (each peer imports this from its own venv); timing and the machine-load record come
from `peer_common`, as in the SFT benchmark.
"""

from __future__ import annotations

import argparse

import numpy as np
import peer_common as common


def parse_args(modes):
    """modes: this peer's code paths; "greedy" (n = 1, temperature 0) and "sampled" (--samples completions
    of every prompt at temperature 1, no top-k/top-p) are the work every framework does alike."""
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=modes, required=True)
    p.add_argument("--samples", type=int, default=1, help="--mode sampled: completions per prompt")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--prompts", required=True, help=".npy int32 [B, P] prompt token ids (no padding)")
    p.add_argument("--new-tokens", type=int, required=True, help="tokens generated per row (no end token stops it)")
    p.add_argument("--calls", type=int, required=True, help="timed generate calls")
    p.add_argument("--warmup", type=int, required=True, help="untimed calls first (compilation)")
    p.add_argument("--out", required=True, help="result .json; the tokens go beside it as .npy")
    return p.parse_args()


def time_calls(generate, args):
    """Call `generate()` (which returns int tokens [rows, new_tokens] on the host) warmup + calls times.

    Returns (the first call's tokens, Clock.steps of the timed calls).
    """
    first, steps = common.time_steps(generate, args.warmup, args.calls)
    return np.asarray(first), steps


def write(args, tokens_RN, steps, **result):
    """The result .json (call seconds, others' CPU share, ...) and the tokens as .npy beside it."""
    tokens_path = args.out.replace(".json", "_tokens.npy")
    np.save(tokens_path, np.asarray(tokens_RN, np.int32))
    result["tokens"] = tokens_path
    common.write(args, steps, **result)


guarded = common.guarded
versions = common.versions
