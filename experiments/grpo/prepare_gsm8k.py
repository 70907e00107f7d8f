"""GSM8K (Cobbe et al. 2021) -> the `prompt` JSONL of experiments/grpo/qwen3_1p7b_gsm8k.py.

Each source row is `question` and `answer` (the worked solution, its last line `#### 42`); each output row
is `prompt` (a system prompt asking for the final number in `\\boxed{}`, then the question) and `answer`
(the final number, thousands separators removed), which `polmjax.rl.rewards:math_reward` compares with
the completion's boxed answer.

    python experiments/grpo/prepare_gsm8k.py --out data/gsm8k/train.jsonl                   # hub: openai/gsm8k main
    python experiments/grpo/prepare_gsm8k.py --source train.parquet --out data/gsm8k/train.jsonl   # a local copy
    python experiments/grpo/prepare_gsm8k.py --split test --out data/gsm8k/test.jsonl
"""

from __future__ import annotations

import argparse
import sys

from _prepare import convert_all, messages, read_rows, write_jsonl  # this directory (the script's own)

SYSTEM = ("Solve the math word problem. Reason step by step, then write the final answer, a number alone, "
          "as \\boxed{ANSWER}.")


def convert(row: dict) -> dict:
    """One GSM8K row -> {"prompt": messages, "answer": "42"}."""
    question, solution = row["question"], row["answer"]
    if "####" not in solution:
        raise ValueError(f"answer has no final '#### <number>' line: {solution[-80:]!r}")
    final = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise ValueError("answer: nothing after '####'")
    return {"prompt": messages(SYSTEM, question), "answer": final}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="openai/gsm8k", help="a hub dataset or a local .jsonl/.parquet file")
    parser.add_argument("--name", default="main", help="the hub dataset's config (GSM8K: main or socratic)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, default=None, help="at most this many prompts")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    rows = read_rows(args.source, name=args.name, split=args.split)
    write_jsonl(convert_all(rows, convert, limit=args.limit), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
