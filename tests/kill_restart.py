"""SIGKILL + restart == uninterrupted, for a `polmjax <command>` run of any algorithm (the run tests share it).

    check_sigkill_and_restart(tmp_path, "dpo", TINY, overrides, steps=10, kill_after=5)

runs the CLI to the end once (the reference), then again in another run directory, kills that one with
SIGKILL once it has logged `kill_after` steps and written a checkpoint, reruns it to the end, and checks
that its metrics.jsonl (every train and eval row, wall-clock rates aside) and its exported final
parameters equal the reference's bit for bit.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ("tokens_per_s", "mfu", "generated_tokens_per_s")  # wall-clock rates: differ between any two runs
TIMEOUT_S = 300
# `--set`s that turn a tiny experiment (which starts from the tiny SFT export) into a 2-layer random init
TINY_INIT = ['model.path=""', "model.tokenizer=toy", "model.init=" + json.dumps({
    "family": "qwen3", "vocab_size": 0, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
    "num_kv_heads": 2, "head_dim": 8, "qk_norm": True, "tie_embeddings": True})]


def check_sigkill_and_restart(tmp_path, command: str, experiment: str, overrides: list[str], *, steps: int,
                              kill_after: int) -> None:
    overrides = [*overrides, f"train.steps={steps}", "train.export_hf=true"]
    ref = polmjax_cli(command, experiment, tmp_path / "ref", overrides)
    _wait(ref)

    run = tmp_path / "killed"
    proc = polmjax_cli(command, experiment, run, overrides)
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and proc.poll() is None and not (
            max(_train_steps(run), default=0) >= kill_after and _checkpoints(run)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {_stderr(proc)}"
    assert _checkpoints(run) and max(_train_steps(run)) < steps  # really killed mid-way, after a checkpoint
    killed_log = os.path.getsize(proc.log_path)
    resumed = polmjax_cli(command, experiment, run, overrides)
    _wait(resumed)
    with open(resumed.log_path, "rb") as f:
        f.seek(killed_log)
        assert b"resumed from step" in f.read()  # from the checkpoint, not from scratch

    want, got = metrics_rows(tmp_path / "ref"), metrics_rows(run)
    assert sorted(k for k in want if k[0] == "train") == [("train", s) for s in range(1, steps + 1)]
    assert got == want
    want, got = exported_params(tmp_path / "ref"), exported_params(run)
    assert want and sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def polmjax_cli(command: str, experiment: str, run_dir, overrides: list[str]) -> subprocess.Popen:
    """`python -m polmjax.cli <command> <experiment> --set ...` on two host CPU devices; stderr appended to
    <run_dir>.log (a file, not a pipe nobody reads while it runs: a full pipe would stall the run)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    args = [sys.executable, "-m", "polmjax.cli", command, experiment] + [
        f"--set={s}" for s in [*overrides, f"train.run_dir={run_dir}"]]
    with open(f"{run_dir}.log", "ab") as log:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
    proc.log_path = f"{run_dir}.log"
    return proc


def metrics_rows(run_dir) -> dict[tuple[str, int], dict]:
    """(split, step) -> the logged row without its wall-clock rates; a later line of a step replaces an earlier."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {(r.get("split", "train"), r["step"]): {k: v for k, v in r.items()
                                                    if k not in TIMING_KEYS and not k.startswith("time/")} for r in rows}


def exported_params(run_dir) -> dict[str, np.ndarray]:
    """Every tensor of the run's exported HF model (run_dir/export/hf/*.safetensors)."""
    from safetensors.numpy import load_file

    out = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "export", "hf", "*.safetensors"))):
        out.update(load_file(path))
    return out


def _train_steps(run_dir) -> list[int]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:  # the last line may be half-written
        return [r["step"] for r in map(_json_or_none, f) if r and "split" not in r]


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _checkpoints(run_dir) -> list[str]:
    """Finished checkpoints (orbax renames a step's directory to its number when it is complete)."""
    path = os.path.join(run_dir, "checkpoints")
    return [d for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []


def _wait(proc: subprocess.Popen) -> None:
    assert proc.wait(timeout=TIMEOUT_S) == 0, _stderr(proc)


def _stderr(proc: subprocess.Popen) -> str:
    """The end of the run's log (shared by the runs of one run directory)."""
    with open(proc.log_path, errors="replace") as f:
        return f.read()[-3000:]
