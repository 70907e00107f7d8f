"""MATH (Hendrycks et al. 2021) -> the `prompt` JSONL of experiments/grpo/qwen2p5_1p5b_math_dapo.py.

Each source row is `problem` and `solution` (a worked solution with the answer in `\\boxed{}`), plus
`level` and `type`; sources with a bare `answer` column instead (MATH-500, DAPO-Math-17k style) work too.
Each output row is `prompt` (Qwen2.5-Math's instruction to reason step by step and box the answer, then the
problem), `solution` (the source's, or `\\boxed{answer}`) and the source's `level`/`type`/`subject`.
`polmjax.rl.rewards:math_reward` reads the gold from `solution`'s `\\boxed{}` (math-verify: symbolic
equivalence). No bare `answer` column is written: math_reward prefers it, and math-verify does not
parse LaTeX without delimiters (`\\frac{1}{2}` alone).

    python experiments/grpo/prepare_math.py --out data/math/train.jsonl    # hub: DigitalLearningGmbH/MATH-lighteval
    python experiments/grpo/prepare_math.py --source MATH/train.parquet --out data/math/train.jsonl   # a local copy
    python experiments/grpo/prepare_math.py --source HuggingFaceH4/MATH-500 --split test --out data/math/math500.jsonl
"""

from __future__ import annotations

import argparse
import sys

from _prepare import convert_all, messages, read_rows, write_jsonl  # this directory (the script's own)

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
FIELDS = ("level", "type", "subject")


def convert(row: dict) -> dict:
    """One MATH row -> {"prompt": messages, "solution": "... \\boxed{...} ...", level/type/subject}."""
    problem, solution, answer = row["problem"], row.get("solution"), row.get("answer")
    if not (solution and "\\boxed" in solution):
        if answer is None or not str(answer).strip():
            raise ValueError("no \\boxed{} answer in 'solution' and no 'answer' column")
        solution = f"\\boxed{{{str(answer).strip()}}}"
    out = {"prompt": messages(SYSTEM, problem), "solution": solution}
    out.update({k: row[k] for k in FIELDS if row.get(k) is not None})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="DigitalLearningGmbH/MATH-lighteval",
                        help="a hub dataset or a local .jsonl/.parquet file with problem and solution (or answer)")
    parser.add_argument("--name", default=None, help="the hub dataset's config, if it has several")
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, default=None, help="at most this many prompts")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    rows = read_rows(args.source, name=args.name, split=args.split)
    write_jsonl(convert_all(rows, convert, limit=args.limit), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
