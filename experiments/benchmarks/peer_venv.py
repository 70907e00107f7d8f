"""The peers' interpreter for the benchmarks: TRL, torch (CPU) and tunix in a venv of their own.

tunix pins its own jax/flax/optax, so it cannot share polmjax's venv. Every benchmark that runs a peer
takes `--peer-python PATH` (or `POLMJAX_BENCH_PYTHON`); without one, `peer_python()` builds (once) and
returns `experiments/benchmarks/.peer-venv` inside this repository (git-ignored):

    python3 -m venv experiments/benchmarks/.peer-venv
    experiments/benchmarks/.peer-venv/bin/pip install torch==2.13.0 trl google-tunix transformers

(torch pinned: that CPU build lies on the build machine's disk; an unpinned torch pulls a multi-GB CUDA build.)
"""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, ".peer-venv")
PACKAGES = ["torch==2.13.0", "trl", "google-tunix", "transformers"]


def default_peer_python() -> str:
    """`--peer-python`'s default: $POLMJAX_BENCH_PYTHON, else the in-repo venv (built on first use)."""
    return os.environ.get("POLMJAX_BENCH_PYTHON", "")


def peer_python(path: str = "", build: bool = True) -> str:
    """The interpreter to run peers with: `path` if given, else the in-repo venv, built if missing."""
    if path:
        if not os.path.exists(path):
            raise SystemExit(f"--peer-python {path}: no such interpreter")
        return path
    python = os.path.join(VENV, "bin", "python")
    if os.path.exists(python) and _has_packages(python):
        return python
    if not build:
        raise SystemExit(f"no peer venv at {VENV}; run without --no-build-peers or pass --peer-python")
    print(f"building the peers' venv in {VENV} ({' '.join(PACKAGES)}; a few minutes, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *PACKAGES], check=True)
    return python


def _has_packages(python: str) -> bool:
    probe = "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in ('torch','trl','tunix')) else 1)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0
