"""`polmjax quickstart`: disjoint data splits, stage overrides, and (slow) the whole pipeline, killed and resumed."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from polmjax import config as config_lib
from polmjax import quickstart as qs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prompts(path):
    with open(path) as f:
        return [json.dumps(json.loads(line)["prompt"], sort_keys=True) for line in f]


def test_test_prompts_are_held_out_of_sft_and_rl(tmp_path):
    data = qs.prepare_data(qs.Settings(out=str(tmp_path), test_prompts=50))
    test = _prompts(data.test)
    assert len(test) == len(set(test)) == 50
    assert not set(test) & (set(_prompts(data.sft)) | set(_prompts(data.rl)))
    assert qs.prepare_data(qs.Settings(out=str(tmp_path), test_prompts=50)) == data  # written once
    before = {n: os.path.getmtime(getattr(data, n)) for n in ("sft", "rl", "test")}
    with pytest.raises(config_lib.ConfigError, match=r"demo_noise: 0.6 -> 0.2.*another --out"):
        qs.prepare_data(qs.Settings(out=str(tmp_path), test_prompts=50, demo_noise=0.2))
    assert {n: os.path.getmtime(getattr(data, n)) for n in before} == before  # nothing rewritten
    with pytest.raises(config_lib.ConfigError, match=r"demo_noise=-0.1: .*expected 0 <= demo_noise <= 1"):
        qs.Settings(demo_noise=-0.1)


def test_stage_overrides_and_their_errors(tmp_path):
    s = qs.Settings(out=str(tmp_path))
    data = qs.prepare_data(s)
    stages = qs.stage_experiments(s, data, ["grpo.train.steps=7", "dpo.beta=0.3"])
    assert stages["grpo"].train.steps == 7 and stages["dpo"].beta == 0.3 and stages["sft"].train.steps == 600
    with pytest.raises(config_lib.ConfigError, match="with a stage of sft, rm, dpo, grpo"):
        qs.stage_experiments(s, data, ["ppo.beta=1"])
    with pytest.raises(config_lib.ConfigError, match="unknown key 'betta'"):
        qs.stage_experiments(s, data, ["dpo.betta=1"])


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_toy_demonstrations_flaw_only_sort_and_only_the_demonstrations(tmp_path):
    """demo_noise: that fraction of the "sort" demonstrations are sorted descending; answers stay ascending, the
    other tasks' demonstrations are their answers, and every row names its task."""
    data = qs.prepare_data(qs.Settings(out=str(tmp_path / "noisy"), demo_noise=0.6))
    rows = _rows(data.rl) + _rows(data.test)
    assert {r["task"] for r in rows} == {"add", "reverse", "sort"}
    for r in rows:
        digits = r["prompt"][0]["content"].split(" ")[1:]
        if r["task"] == "sort":
            assert r["answer"] == " ".join(sorted(digits))
            assert r["solution"] in (r["answer"], " ".join(sorted(digits, reverse=True)))
        else:
            assert r["solution"] == r["answer"]
    sort = [r for r in rows if r["task"] == "sort" and len(set(r["answer"].split())) > 1]
    flawed = np.mean([r["solution"] != r["answer"] for r in sort])
    assert 0.55 < flawed < 0.65, flawed
    demos = [r for r in _rows(data.sft) if r["prompt"][0]["content"].startswith("sort: ")]
    completions = [r["completion"][0]["content"] for r in demos]
    assert 0.5 < np.mean([c.split() != sorted(c.split()) for c in completions]) < 0.65
    clean = qs.prepare_data(qs.Settings(out=str(tmp_path / "clean"), demo_noise=0.0))
    assert all(r["solution"] == r["answer"] for r in _rows(clean.rl))


def test_held_out_accuracy_per_task(tmp_path):
    """PolicySampler.evaluate(group_by=) splits greedy accuracy and pass@k by a prompt field."""
    from polmjax.data.prompts import Prompt, tokenize_prompt
    from polmjax.data.toy import build_tokenizer
    from polmjax.mesh import make_mesh
    from polmjax.models import create
    from polmjax.rl.rewards import RewardFn
    from polmjax.rl.rollout import PolicySampler

    tok = build_tokenizer(tmp_path / "tok")
    cfg = dataclasses.replace(qs.TINY, vocab_size=len(tok), num_layers=1)
    model = create(cfg)
    prompts = [Prompt(tokenize_prompt([{"role": "user", "content": f"add {i} and 1"}], tok),
                      [{"role": "user", "content": f"add {i} and 1"}], {"task": "xy"[i % 2]}, f"row {i}")
               for i in range(6)]

    def right_on_x(prompts, completions, task, **_):
        return [1.0 if t == "x" else 0.0 for t in task]

    sampler = PolicySampler(cfg, tok, make_mesh(1, -1, 1), [RewardFn(right_on_x, isolate=False)], max_new_tokens=4)
    out = sampler.evaluate(model.params(), prompts, k=2, key=jax.random.key(0), batch=4, group_by="task")
    assert out["accuracy"] == 0.5 and out["accuracy/x"] == out["pass@2/x"] == 1.0
    assert out["accuracy/y"] == out["pass@2/y"] == 0.0
    assert "accuracy/x" not in sampler.evaluate(model.params(), prompts, k=2, key=jax.random.key(0))


# an SFT model that is sometimes right, so that its samples give preference pairs; short later stages
SMALL = ["sft.train.steps=200", "rm.train.steps=4", "dpo.train.steps=4", "grpo.train.steps=4", "grpo.train.save_every=2",
         "rm.train.save_every=2"]


def _cli(out, extra=()):
    args = [sys.executable, "-m", "polmjax.cli", "quickstart", "--out", str(out), *(f"--set={s}" for s in SMALL)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([*args, *extra], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.slow  # the whole pipeline twice (~6-10 min)
def test_quickstart_killed_mid_way_resumes_to_the_same_table(tmp_path):
    ref = _cli(tmp_path / "ref")
    out, _ = ref.communicate(timeout=900)
    assert ref.returncode == 0, out[-3000:]
    table = out[out.index("| stage |"):].split("\n\n")[0]
    for name in ("curves.png", "accuracy.png", "report.md", "results.json"):
        assert os.path.exists(tmp_path / "ref" / name)
    assert os.path.exists(tmp_path / "ref" / "grpo" / "export" / "hf" / "model.safetensors")

    killed = _cli(tmp_path / "run")
    deadline = time.time() + 900
    while time.time() < deadline and not os.path.exists(tmp_path / "run" / "rm" / "metrics.jsonl"):
        time.sleep(0.5)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    again = _cli(tmp_path / "run")
    out2, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out2[-3000:]
    assert out2[out2.index("| stage |"):].split("\n\n")[0] == table
