"""The pod and cluster launch scripts, checked without a pod: each `--dry-run` prints exactly the commands a
real run executes (shell-quoted, one a line) and runs none of them.

`gcloud`, `tar`, `srun`, ... are fakes first on PATH that record their argv; a dry run with fakes that fail
loudly must leave no record, and a real run with fakes that succeed must record what the dry run printed.
"""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from polmjax.cli import ALGORITHMS

REPO = Path(__file__).resolve().parents[1]
FAKED = ("gcloud", "tar", "ssh", "scp", "srun", "sbatch", "polmjax")
POD = {"TPU_NAME": "pod-7", "ZONE": "europe-west4-b", "ACCELERATOR": "v5litepod-16"}
TPU_SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-7", "--zone=europe-west4-b", "--worker=all"]
NASTY = "train.run_dir=/mnt/shared/it's a \"run\" $HOME `x`"  # spaces, both quotes, $ and backquotes


@pytest.fixture
def sh(tmp_path):
    """sh(script, *args, env={}, fakes_fail=True) -> (CompletedProcess, [recorded argv, ...])."""
    bin_dir, log = tmp_path / "bin", tmp_path / "ran.log"
    bin_dir.mkdir()
    for name in FAKED:
        fake = bin_dir / name
        fake.write_text('#!/usr/bin/env bash\n{ printf %s "${0##*/}"; printf "\\x1f%s" "$@"; printf "\\x1e"; }'
                        ' >> "$FAKE_LOG"\n'
                        'if ((FAKE_FAIL)); then echo "fake ${0##*/} ran" >&2; exit 97; fi\n')
        fake.chmod(0o755)

    def run(script, *args, env=None, fakes_fail=True):
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("DRY_RUN", "QUEUED", "SPOT", "REPO", "POLMJAX") and not k.startswith("SLURM_")}
        full_env.update(POD, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log),
                        FAKE_FAIL=str(int(fakes_fail)), **(env or {}))
        proc = subprocess.run(["bash", str(REPO / script), *args], cwd=REPO, env=full_env,
                              capture_output=True, text=True, timeout=60)
        ran = [rec.split("\x1f") for rec in log.read_text().split("\x1e")[:-1]] if log.exists() else []
        log.unlink(missing_ok=True)
        return proc, ran

    return run


def _dry(sh, script, *args, env=None):
    """The printed commands of a dry run, each as argv; the dry run must succeed and run nothing."""
    proc, ran = sh(script, "--dry-run", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert ran == []
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def _remote(polmjax_argv):
    return (f"cd ~/polmjax && nohup .venv/bin/polmjax {shlex.join(polmjax_argv)} > ~/polmjax_run.log 2>&1 &"
            " sleep 2; tail -n 5 ~/polmjax_run.log")


@pytest.mark.parametrize("queued", [False, True])
def test_create_dry_run(sh, queued):
    env = {"QUEUED": "1", "SPOT": "1"} if queued else {}
    if queued:
        want = ["gcloud", "compute", "tpus", "queued-resources", "create", "pod-7", "--node-id=pod-7",
                "--zone=europe-west4-b", "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5",
                "--spot"]
    else:
        want = ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod-7", "--zone=europe-west4-b",
                "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5"]
    assert _dry(sh, "tpu/create.sh", env=env) == [want]


@pytest.mark.parametrize("queued", [False, True])
def test_teardown_dry_run(sh, queued):
    if queued:
        want = ["gcloud", "compute", "tpus", "queued-resources", "delete", "pod-7", "--zone=europe-west4-b",
                "--force", "--quiet"]
    else:
        want = ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod-7", "--zone=europe-west4-b", "--quiet"]
    assert _dry(sh, "tpu/teardown.sh", env={"QUEUED": "1"} if queued else {}) == [want]


def test_setup_dry_run_quotes_a_checkout_path_with_spaces(sh, tmp_path):
    repo = tmp_path / "my checkout's copy"
    repo.mkdir()
    tar, scp, ssh = _dry(sh, "tpu/setup.sh", env={"REPO": str(repo)})
    assert tar == ["tar", "-C", str(repo), "--exclude=.venv*", "--exclude=runs", "--exclude=.git",
                   "--exclude=__pycache__", "-czf", "/tmp/polmjax.tgz", "."]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/polmjax.tgz", "pod-7:~/polmjax.tgz",
                   "--zone=europe-west4-b", "--worker=all"]
    assert ssh[:-1] == TPU_SSH and ssh[-1].startswith("--command=mkdir -p ~/polmjax && tar -C ~/polmjax -xzf")
    assert '.venv/bin/pip install -q -e ".[tpu]"' in ssh[-1] and "\n" not in ssh[-1]


@pytest.mark.parametrize("experiment, sets", [
    ("experiments/sft/qwen3_1p7b_tulu3.py", []),
    ("experiments/dpo/qwen3_1p7b_ultrafeedback.py", ["--set", "train.run_dir=/mnt/shared/runs/dpo a"]),
    ("experiments/grpo/tiny.py", ["--set", NASTY, "--set", "train.steps=3"]),
])
def test_launch_dry_run_runs_the_experiment_folder_s_algorithm_on_every_host(sh, experiment, sets):
    algo = experiment.split("/")[1]
    assert _dry(sh, "tpu/launch.sh", experiment, *sets) == [TPU_SSH + ["--command=" + _remote([algo, experiment, *sets])]]


def test_launch_s_remote_command_gives_polmjax_the_arguments_unchanged(sh, tmp_path):
    """The printed --command, run by a shell as a host would, starts polmjax with the exact argv."""
    (ssh,) = _dry(sh, "tpu/launch.sh", "experiments/grpo/tiny.py", "--set", NASTY)
    venv_bin = tmp_path / "home" / "polmjax" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "polmjax").symlink_to(tmp_path / "bin" / "polmjax")
    log = tmp_path / "host.log"
    subprocess.run(["bash", "-c", ssh[-1].removeprefix("--command=")], check=True, capture_output=True, timeout=30,
                   env={"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "FAKE_LOG": str(log),
                        "FAKE_FAIL": "0"})
    assert log.read_text() == "\x1f".join(["polmjax", "grpo", "experiments/grpo/tiny.py", "--set", NASTY]) + "\x1e"


@pytest.mark.parametrize("script", ["tpu/launch.sh", "slurm/launch_gpu.sbatch"])
@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_every_training_command_of_the_cli_launches(sh, script, algo):
    (cmd,) = _dry(sh, script, f"experiments/{algo}/tiny.py")
    assert f"polmjax {algo} experiments/{algo}/tiny.py" in shlex.join(cmd)


@pytest.mark.parametrize("script", ["tpu/launch.sh", "slurm/launch_gpu.sbatch"])
def test_launch_refuses_what_is_not_an_experiment_of_an_algorithm(sh, script, tmp_path):
    outside = tmp_path / "sft" / "mine.py"
    outside.parent.mkdir()
    outside.write_text("")
    cases = [(["experiments/benchmarks/sft_mfu.py"],
              "'experiments/benchmarks/sft_mfu.py' is in 'benchmarks/', not an algorithm folder: pass "
              "experiments/<algo>/<name>.py with algo one of sft dpo rm kto grpo"),
             (["experiments/sft/nope.py"], "no experiment file 'experiments/sft/nope.py'"),
             ([], "usage: ")]
    if script.startswith("tpu/"):
        cases.append(([str(outside)], f"'{outside}' is outside {REPO}, the checkout that setup.sh copies"))
    for args, message in cases:
        for dry in (["--dry-run"], []):
            proc, ran = sh(script, *dry, *args)
            assert (proc.returncode, proc.stdout, ran) == (2, "", []), (args, proc.stderr)
            assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize("script, args, env", [
    ("tpu/create.sh", [], {}),
    ("tpu/create.sh", [], {"QUEUED": "1"}),
    ("tpu/setup.sh", [], {}),
    ("tpu/launch.sh", ["experiments/dpo/tiny.py", "--set", NASTY], {}),
    ("tpu/teardown.sh", [], {}),
    ("slurm/launch_gpu.sbatch", ["experiments/kto/tiny.py", "--set", NASTY], {"SLURM_CPUS_PER_TASK": "12"}),
])
def test_a_real_run_executes_exactly_what_its_dry_run_prints(sh, script, args, env):
    printed = _dry(sh, script, *args, env=env)
    proc, ran = sh(script, *args, env=env, fakes_fail=False)
    assert proc.returncode == 0, proc.stderr
    assert ran == printed and proc.stdout == ""


def test_slurm_dry_run(sh):
    assert _dry(sh, "slurm/launch_gpu.sbatch", "experiments/sft/tiny.py", "--set", NASTY) == [
        ["srun", "--kill-on-bad-exit=1", "--gpu-bind=none", "polmjax", "sft", "experiments/sft/tiny.py", "--set", NASTY]]
    proc, ran = sh("slurm/launch_gpu.sbatch", "experiments/rm/tiny.py",
                   env={"DRY_RUN": "1", "SLURM_CPUS_PER_TASK": "12", "POLMJAX": ".venv/bin/polmjax"})
    assert (proc.returncode, ran) == (0, [])
    assert proc.stdout == ("srun --kill-on-bad-exit=1 --gpu-bind=none --cpus-per-task=12 .venv/bin/polmjax rm "
                           "experiments/rm/tiny.py\n")


def test_slurm_refuses_fewer_tasks_than_gpus_per_node_unless_there_is_one_task(sh):
    proc, ran = sh("slurm/launch_gpu.sbatch", "experiments/sft/tiny.py",
                   env={"SLURM_NTASKS": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1"})
    assert (proc.returncode, proc.stdout, ran) == (2, "", [])
    assert "8 GPUs but 1 tasks per node" in proc.stderr and "--ntasks-per-node=8" in proc.stderr
    one_process = {"SLURM_NTASKS": "1", "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1"}
    assert _dry(sh, "slurm/launch_gpu.sbatch", "experiments/grpo/tiny.py", env=one_process) == [
        ["srun", "--kill-on-bad-exit=1", "--gpu-bind=none", "polmjax", "grpo", "experiments/grpo/tiny.py"]]


def test_slurm_header_runs_one_task_per_gpu():
    header = dict(line.removeprefix("#SBATCH ").partition("=")[::2]
                  for line in (REPO / "slurm/launch_gpu.sbatch").read_text().splitlines() if line.startswith("#SBATCH "))
    assert header["--ntasks-per-node"] == header["--gpus-per-node"]
    assert "--gpus-per-task" not in header


def test_jax_gives_each_slurm_task_the_gpu_of_its_local_id(monkeypatch):
    """What launch_gpu.sbatch relies on: jax.distributed.initialize() on srun's environment."""
    from jax._src.clusters import ClusterEnv

    from polmjax.mesh import _launched_on_several_hosts

    for name, value in {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_NTASKS": "16",
                        "SLURM_PROCID": "11", "SLURM_LOCALID": "3"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("JAX_COORDINATOR_PORT", raising=False)
    assert _launched_on_several_hosts()
    port = 4242 % 2**12 + 65535 - 2**12 + 1
    assert ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, None) == (
        f"gpu007:{port}", 16, 11, [3])
