"""What every peer of `grpo_step.py` shares: its arguments, the prompts, the reward and the result file.

Stdlib and numpy only (each peer imports this from its own venv); timing, the machine-load record and the
result file come from `peer_common`, as in the SFT and DPO benchmarks.

The prompts file (.jsonl) holds one {"prompt": str} a line: strings that the shared tokenizer (saved in the
HF directory) encodes into exactly --prompt-len tokens, BOS included ("<s>" written out, so that polmjax, which
prepends BOS unless the ids start with it, TRL, which adds no special tokens for this tokenizer, and tunix,
which prepends BOS and then removes a doubled one, all see the same ids).
"""

from __future__ import annotations

import argparse
import json

import peer_common as common


def parse_args(modes):
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=modes, required=True)
    p.add_argument("--hf-dir", required=True, help="the model and its tokenizer")
    p.add_argument("--prompts", required=True, help=".jsonl of {'prompt': str}, one a line")
    p.add_argument("--prompts-per-step", type=int, required=True)
    p.add_argument("--generations", type=int, required=True, help="completions per prompt (the group size G)")
    p.add_argument("--prompt-len", type=int, required=True, help="tokens of every prompt (BOS included)")
    p.add_argument("--completion-len", type=int, required=True, help="tokens of every completion (EOS ignored)")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--out", required=True)
    return p.parse_args()


def load_prompts(args) -> list[str]:
    with open(args.prompts) as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def reward(prompts, completions, **_) -> list[float]:
    """The benchmark's reward: the completion text's character codes summed, mod 2. Deterministic, about
    free, independent of the length (every completion has the same one anyway) and different within most
    groups, so the advantages are not all zero. TRL's, tunix's and polmjax's reward signature alike."""
    return [float(sum(map(ord, c)) % 2) for c in completions]


def write(args, steps, *, generate_s, **result):
    """The result file: per-step seconds (`steps` from peer_common.Clock.steps) and the seconds of each timed
    step spent sampling (`generate_s`, one a timed step)."""
    common.write(args, steps, generate_s=list(generate_s), **result)


Clock = common.Clock
guarded = common.guarded
one_line = common.one_line
versions = common.versions
