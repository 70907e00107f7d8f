"""`polmjax quickstart`: disjoint data splits, stage overrides, and (slow) the whole pipeline, killed and resumed."""

import json
import os
import signal
import subprocess
import sys
import time

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


def test_stage_overrides_and_their_errors(tmp_path):
    s = qs.Settings(out=str(tmp_path))
    data = qs.prepare_data(s)
    stages = qs.stage_experiments(s, data, ["grpo.train.steps=7", "dpo.beta=0.3"])
    assert stages["grpo"].train.steps == 7 and stages["dpo"].beta == 0.3 and stages["sft"].train.steps == 400
    with pytest.raises(config_lib.ConfigError, match="with a stage of sft, rm, dpo, grpo"):
        qs.stage_experiments(s, data, ["ppo.beta=1"])
    with pytest.raises(config_lib.ConfigError, match="unknown key 'betta'"):
        qs.stage_experiments(s, data, ["dpo.betta=1"])


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
