"""The README's first command (`polmjax quickstart`) and its SFT example, end to end, and the claims the README
makes about them (slow: ~5 min each).

    pytest -m slow tests/test_quickstart.py

Each runs the command in a subprocess (as a user would, into a temporary directory), then checks the
README's numbers (the runs are deterministic on one CPU type; other CPUs may differ in the last digits):
for the quickstart, its promised gains and its table; for `polmjax sft experiments/sft/tiny.py`, its losses
with a margin, the run directory's listing, the samples, the export, and that the second invocation finds
the run finished.
"""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# What the README states about `polmjax sft experiments/sft/tiny.py` (section "Training (SFT)"); kept in one place.
FINAL_TRAIN_LOSS = 0.22  # README: training loss at step 400
HELD_OUT_LOSS = {100: 1.40, 200: 0.90, 300: 0.40, 400: 0.33}
RUN_DIR_LISTING = ["checkpoints", "config.json", "data", "export", "metrics.jsonl", "samples.jsonl",
                   "tensorboard", "tokenizer"]
MARGIN = 0.05


def _polmjax(*args, timeout):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a user's machine
    return subprocess.run([sys.executable, "-m", "polmjax.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_readme_first_command_the_quickstart_and_its_table(tmp_path):
    readme = open(README).read()
    assert ".venv/bin/polmjax quickstart" in readme.split("```")[1]
    out = _polmjax("quickstart", "--out", str(tmp_path / "qs"), timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.load(open(tmp_path / "qs" / "results.json"))
    sft = results["sft"]["accuracy"]
    # the promised gains: every stage above SFT on the held-out prompts, GRPO by at least 10 points
    assert all(results[s]["accuracy"] > sft for s in ("rm", "dpo", "grpo")), results
    assert results["grpo"]["accuracy"] >= sft + 0.10, results
    # the README's table is this run's
    for stage, label in (("sft", "sft"), ("rm", "rm (best-of-4 of the SFT model)"),
                         ("dpo", "dpo (+ the chosen responses' NLL)"), ("grpo", "grpo")):
        r = results[stage]
        assert re.search(rf"^\| {re.escape(label)} \| (\*\*)?{r['accuracy']:.3f}(\*\*)? \| {r['pass@4']:.3f} \| "
                         rf"{r['accuracy_sampled']:.3f} \|$", readme, re.M), (stage, r)
    for name in ("curves.png", "accuracy.png", "report.md"):
        assert os.path.getsize(tmp_path / "qs" / name) > 0
    assert os.path.exists(tmp_path / "qs" / "grpo" / "export" / "hf" / "model.safetensors")


@pytest.mark.slow
def test_readme_sft_example_and_its_claims(tmp_path):
    readme = open(README).read()
    run_dir = tmp_path / "sft_tiny"
    out = _polmjax("sft", "experiments/sft/tiny.py", f"--set=train.run_dir={run_dir}", timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]

    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    train = {r["step"]: r["loss"] for r in rows if "split" not in r}
    held_out = {r["step"]: r["loss"] for r in rows if r.get("split") == "eval"}
    assert train[400] < FINAL_TRAIN_LOSS + MARGIN, train[400]
    for step, loss in HELD_OUT_LOSS.items():
        assert held_out[step] < loss + MARGIN, (step, held_out[step])
    # the numbers in the README are these numbers
    assert f"{train[400]:.2f}" in readme and all(f"{held_out[s]:.2f}" in readme for s in HELD_OUT_LOSS)

    assert sorted(os.listdir(run_dir)) == RUN_DIR_LISTING
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["300", "400"]
    samples = [json.loads(line) for line in open(run_dir / "samples.jsonl")]
    assert [s["prompt"] for s in samples] == ["add 12 and 30", "reverse: c a t", "sort: 3 1 2"]
    for s in samples:
        assert f"'{s['prompt']}' -> '{s['completion']}'" in readme, s
    hf = json.load(open(run_dir / "export" / "hf" / "config.json"))
    assert hf["eos_token_id"] is not None and os.path.exists(run_dir / "export" / "hf" / "generation_config.json")

    again = _polmjax("sft", "experiments/sft/tiny.py", f"--set=train.run_dir={run_dir}", timeout=600)
    assert again.returncode == 0 and "resumed from step 400" in again.stderr, again.stderr[-2000:]
    # the README's export example works on this run
    step = re.search(r"polmjax export runs/sft_tiny --step (\d+)", readme).group(1)
    exported = _polmjax("export", str(run_dir), "--step", step, timeout=600)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert os.path.exists(run_dir / "export" / f"step_{step}" / "model.safetensors")
