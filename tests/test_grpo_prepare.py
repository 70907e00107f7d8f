"""experiments/grpo/prepare_*.py: source rows in their real column layout -> `prompt` JSONL that
`PromptSource` loads, whose row fields make the experiment's own rewards score a correct completion 1.0
(and a wrong one 0)."""

import dataclasses
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from polmjax import config as config_lib
from polmjax.data import DataConfig
from polmjax.data.prompts import PromptSource
from polmjax.data.toy import build_tokenizer
from polmjax.rl import rewards as rewards_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPO = os.path.join(ROOT, "experiments", "grpo")
sys.path.insert(0, GRPO)

import prepare_gsm8k  # noqa: E402
import prepare_math  # noqa: E402
import prepare_reasoning_gym  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def load(path, tok):
    """Every prompt of a prepared file (the toy tokenizer's prompts are longer than a real one's: no cut)."""
    source = PromptSource(DataConfig(path=str(path), format="prompt", num_epochs=1), tok, max_prompt_len=4096,
                          split="train")
    prompts = list(iter(source).take(len(source.indices)))
    assert len(prompts) == len(source.indices)
    return sorted(prompts, key=lambda p: p.where)


def scores(experiment, prompts, completions):
    """The experiment's rewards on the completions, with the row fields and completion lengths the rollout
    passes (`Rollout._score`), run in this process: (first reward, total) per completion."""
    exp = config_lib.load_experiment(os.path.join(GRPO, experiment))
    fns = [dataclasses.replace(r.build(), isolate=False) for r in exp.rewards]
    fields = {k: [p.fields.get(k) for p in prompts] for k in prompts[0].fields}
    fields["completion_lengths"] = [len(c.split()) for c in completions]
    out = rewards_lib.score(fns, [p.prompt for p in prompts], completions, fields)
    assert not out.errors, out.errors
    return out.per_fn[fns[0].label].tolist(), out.total.tolist()


def test_gsm8k(tmp_path, tok):
    rows = [{"question": "Tom has 3 bags of 14 apples. How many apples?", "answer": "3 * 14 = <<3*14=42>>42\n#### 42"},
            {"question": "A car costs $250 a day. What do 4 days cost?", "answer": "250*4=1000\n#### 1,000"},
            {"question": "No final line here.", "answer": "it is 5"}]
    source = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), source)
    out = tmp_path / "gsm8k.jsonl"
    assert prepare_gsm8k.main(["--source", str(source), "--out", str(out)]) == 0

    prompts = load(out, tok)
    assert [p.fields for p in prompts] == [{"answer": "42"}, {"answer": "1000"}]  # the bad row is skipped
    system, user = prompts[0].prompt
    assert system["role"] == "system" and "\\boxed{" in system["content"]
    assert user == {"role": "user", "content": rows[0]["question"]}
    right = ["Each bag has 14, so 3 * 14 = 42 apples.\n\\boxed{42}", "4 days: 4 * 250 = 1000, so \\boxed{1000}."]
    assert scores("qwen3_1p7b_gsm8k.py", prompts, right) == ([1.0, 1.0], [1.0, 1.0])
    assert scores("qwen3_1p7b_gsm8k.py", prompts, ["\\boxed{41}", "\\boxed{250}"])[0] == [0.0, 0.0]


def test_math(tmp_path, tok):
    rows = [{"problem": "What is $\\frac{2}{4}$ in lowest terms?", "level": "Level 1", "type": "Prealgebra",
             "solution": "Divide both by 2: $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$."},
            {"problem": "Solve $x^2 = 9$ for $x > 0$.", "level": "Level 2", "type": "Algebra",
             "solution": "Since $x > 0$, $x = \\boxed{3}$."},
            {"problem": "Simplify $\\sqrt{18}$.", "answer": "3\\sqrt{2}", "subject": "Algebra"},  # MATH-500 layout
            {"problem": "No answer anywhere.", "solution": "It is 4."}]
    source = tmp_path / "math.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prepared.jsonl"
    assert prepare_math.main(["--source", str(source), "--out", str(out)]) == 0

    prompts = load(out, tok)
    assert [p.fields.get("level") for p in prompts] == ["Level 1", "Level 2", None]
    assert prompts[2].fields == {"solution": "\\boxed{3\\sqrt{2}}", "subject": "Algebra"}
    assert all("answer" not in p.fields for p in prompts)  # math_reward would read a bare answer first
    assert "\\boxed{}" in prompts[0].prompt[0]["content"]
    right = ["Halve both: \\boxed{0.5}", "x = 3 or x = -3; positive: \\boxed{3}", "\\boxed{\\sqrt{18}}"]
    first, total = scores("qwen2p5_1p5b_math_dapo.py", prompts, right)  # math_reward + DAPO's overlong term
    assert first == [1.0, 1.0, 1.0] and total == [1.0, 1.0, 1.0]
    assert scores("qwen2p5_1p5b_math_dapo.py", prompts, ["\\boxed{2}", "\\boxed{-3}", "\\boxed{18}"])[0] == [0.0] * 3


@pytest.mark.parametrize("tasks,config", [(["countdown"], {"min_numbers": 3, "max_numbers": 4}),
                                          (["basic_arithmetic", "knights_knaves"], {})])
def test_reasoning_gym(tmp_path, tok, tasks, config):
    pytest.importorskip("reasoning_gym")
    out = tmp_path / "rg.jsonl"
    argv = ["--task", ",".join(tasks), "--size", "6", "--config", json.dumps(config), "--out", str(out)]
    assert prepare_reasoning_gym.main(argv) == 0

    prompts = load(out, tok)
    assert len(prompts) == 6
    assert {p.fields["entry"]["metadata"]["source_dataset"] for p in prompts} <= set(tasks)
    assert prompts[0].prompt[0]["role"] == "system" and "<answer>" in prompts[0].prompt[0]["content"]
    assert prompts[0].prompt[1]["content"] == prompts[0].fields["entry"]["question"].strip()
    right = [f"<think>worked it out</think>\n<answer>{p.fields['entry']['answer']}</answer>" for p in prompts]
    assert scores("qwen3_0p6b_reasoning_gym.py", prompts, right)[0] == [1.0] * 6
    wrong = scores("qwen3_0p6b_reasoning_gym.py", prompts, ["<answer>no idea</answer>"] * 6)[0]
    assert max(wrong) < 1.0
