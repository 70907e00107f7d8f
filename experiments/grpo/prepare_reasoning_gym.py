"""reasoning-gym tasks (procedurally generated, offline) -> the `prompt` JSONL of
experiments/grpo/qwen3_0p6b_reasoning_gym.py.

Each output row is `prompt` (reasoning-gym's default system prompt: think step by step, then the answer
alone in `<answer>...</answer>`; then the item's question) and `entry`, the whole dataset item (question,
answer, metadata with its `source_dataset`), which `polmjax.rl.rewards:reasoning_gym_reward` hands to that
task's own `score_answer`. Several tasks (comma-separated) are mixed with equal weights by reasoning-gym's
composite dataset. Every item goes through JSON and back before it is written, and one whose own answer
no longer scores 1.0 after that is dropped (counted on stderr).

    python experiments/grpo/prepare_reasoning_gym.py --task countdown --size 20000 \\
        --config '{"min_numbers": 3, "max_numbers": 4}' --out data/reasoning_gym/countdown.jsonl
    python experiments/grpo/prepare_reasoning_gym.py --task knights_knaves,basic_arithmetic --size 20000 \\
        --out data/reasoning_gym/mix.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys

from _prepare import convert_all, messages, write_jsonl  # this directory (the script's own)


def generate(tasks: list[str], size: int, seed: int = 0, config: dict | None = None) -> list[dict]:
    """`size` items of one task, or of several mixed (reasoning-gym's composite dataset), as plain dicts."""
    import reasoning_gym

    config = dict(config or {})
    if len(tasks) == 1:
        data = reasoning_gym.create_dataset(tasks[0], size=size, seed=seed, **config)
    else:
        from reasoning_gym.composite import DatasetSpec

        specs = [DatasetSpec(name=t, weight=1.0, config=dict(config)) for t in tasks]
        data = reasoning_gym.create_dataset("composite", size=size, seed=seed, datasets=specs)
    return [data[i] for i in range(size)]


def convert(item: dict, system: str | None = None) -> dict:
    """One reasoning-gym item -> {"prompt": messages, "entry": the item as JSON gives it back}, or
    ValueError when the item's own answer does not score 1.0 after the JSON round trip."""
    import reasoning_gym
    from reasoning_gym.utils import SYSTEM_PROMPTS

    entry = json.loads(json.dumps(item, default=_plain))
    task = entry["metadata"]["source_dataset"]
    score = reasoning_gym.get_score_answer_fn(task)(entry["answer"], entry)
    if score != 1.0:
        raise ValueError(f"{task}: its own answer scores {score} after the JSON round trip")
    return {"prompt": messages(SYSTEM_PROMPTS["default"] if system is None else system, entry["question"]),
            "entry": entry}


def _plain(x):
    """JSON for the few non-JSON values items carry (sets, numpy scalars)."""
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="countdown", help="a reasoning-gym dataset name, or several comma-separated")
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="{}", help="the task's config as JSON, e.g. '{\"min_numbers\": 3}'")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    items = generate(args.task.split(","), args.size, args.seed, json.loads(args.config))
    write_jsonl(convert_all(items, convert), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
