"""run_all.py, the one benchmark command: every section and row in its markdown, failures marked and counted.

The slow test runs `run_all.py --quick` (every benchmark's rows once at tiny sizes, peers included: it needs
the peers' venv, experiments/benchmarks/.peer-venv or $POLMJAX_BENCH_PYTHON, and about 8 minutes on 2 cores).
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "experiments", "benchmarks")

# section heading -> the rows of its table, in order: the first cells of each row (framework, or work + framework)
EXPECTED = {
    "## SFT step (`sft_throughput.py`)": [["polmjax"], ["tunix"], ["tunix"], ["TRL"], ["torch"]],
    "## DPO step (`dpo_throughput.py`)": [["polmjax"], ["polmjax"], ["tunix"], ["tunix"], ["TRL"], ["torch"]],
    "## GRPO step (`grpo_step.py`)": [["polmjax"], ["TRL"], ["tunix"]],
    "## Sampler throughput (`sampler_throughput.py`)": [
        ["greedy", "polmjax"], ["greedy", "polmjax"], ["greedy", "transformers"], ["greedy", "tunix"],
        ["sampled", "polmjax"], ["sampled", "transformers"], ["sampled", "tunix"]],
}
KERNEL_SECTION = "## Kernels: memory and time vs the references (`kernels.py`)"
LOGPROB_METRICS = ["fwd_ms (ms)", "fwd_bwd_ms (ms)", "fwd_temp (MiB)", "fwd_bwd_temp (MiB)"]


@pytest.mark.slow
def test_quick_run_has_every_section_and_row(tmp_path):
    peer = os.environ.get("POLMJAX_BENCH_PYTHON") or os.path.join(BENCH, ".peer-venv", "bin", "python")
    if not os.path.exists(peer):
        pytest.skip(f"no peers' venv at {peer} (build it: python experiments/benchmarks/peer_venv.py's commands)")
    out = tmp_path / "RESULTS.md"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "run_all.py"), "--quick", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_results(out.read_text())


def check_results(text):
    """Every section, every expected row with its seconds and ratio to polmjax, every version; no FAILED."""
    for heading in ["## Machine", "## Versions", "## Summary", *EXPECTED, KERNEL_SECTION]:
        assert heading in text, f"missing section {heading!r}"
    assert "FAILED" not in text
    for package in ("jax", "flax", "optax", "torch", "trl", "tunix", "transformers"):
        assert re.search(rf"^\| {package} \| [^|]+ \| \d[^|]* \|$", text, re.M), f"no peer version of {package}"
    sections = _sections(text)
    for heading, expected in EXPECTED.items():
        rows = _tables(sections[heading])[0]
        keys = ["work", "framework"] if len(expected[0]) == 2 else ["framework"]
        assert [[r[k] for k in keys] for r in rows] == expected, heading
        for r in rows:
            assert re.fullmatch(r"\d+\.\d{3}\*?", r.get("s/step", r.get("s/call", ""))), f"{heading}: {r}"
            assert re.fullmatch(r"\d+\.\d\dx", r["vs polmjax"]), f"{heading}: no ratio to polmjax in {r}"
    logprobs, attention = _tables(sections[KERNEL_SECTION])
    assert [r["metric"] for r in logprobs] == LOGPROB_METRICS
    for r in logprobs:
        assert all(re.fullmatch(r"\d+\.\d+", r[k]) for k in list(r)[1:]), r
    assert [r["impl"] for r in attention] == ["xla"] * 4  # --small on CPU: 2 head dims x 2 lengths
    assert all(re.fullmatch(r"\d+\.\d+", r["fwd ms"]) and re.fullmatch(r"\d+\.\d+", r["fwd+bwd ms"])
               for r in attention), attention


@pytest.fixture(scope="module")
def run_all():
    """experiments/benchmarks/run_all.py as a module, with that folder taken off sys.path again: left on it,
    its kernels.py would shadow the `kernels` package transformers imports, in every later test."""
    sys.path.insert(0, BENCH)
    try:
        import run_all as module
    finally:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != BENCH]
    return module


def test_failed_row_is_marked_and_counted(run_all):
    ok = {"framework": "polmjax", "path": "jit_sft_step", "s_step": 0.5, "tokens_s": 100.0, "vs_polmjax": 1.0,
          "all_quiet": False, "quiet_steps": 0, "steps": 1, "first_loss": 6.25}
    bad = {"framework": "TRL", "path": "trainer", "error": "exit code 1: ImportError | trl (log: x.log)"}
    run = {"command": "python experiments/benchmarks/sft_throughput.py --quick", "rc": 0, "wall_s": 3.0,
           "data": {"rows": [ok, bad], "settings": {"quick": True}, "load_before": [1, 1, 1],
                    "load_after": [2, 2, 2]}}
    lines, failed = run_all.render("sft", run)
    rows = _tables(lines)[0]
    assert list(rows[0].values()) == ["polmjax", "`jit_sft_step`", "0.500*", "100", "1.00x", "0/1", "6.25000"]
    assert rows[1]["s/step"] == "FAILED: exit code 1: ImportError \\| trl (log: x.log)"
    assert failed == ["TRL trainer: exit code 1: ImportError | trl (log: x.log)"]
    assert run_all._count_rows("sft", run["data"]) == (2, 1)

    crashed = {**run, "rc": 1, "data": None, "tail": "Traceback ... (log: y.log)"}
    lines, failed = run_all.render("sft", crashed)
    assert failed == ["exit code 1, no results: Traceback ... (log: y.log)"]
    assert any(line.startswith("FAILED: exit code 1") for line in lines)


def _sections(text):
    out, name = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            name = line
            out[name] = []
        elif name:
            out[name].append(line)
    return out


def _tables(lines):
    """Every markdown table in `lines`: a list of its data rows, each {header cell: cell}."""
    tables, header = [], None
    for line in lines:
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        if header is None:
            header = cells
            tables.append([])
        elif not all(re.fullmatch(r"-+:?", c) for c in cells):
            tables[-1].append(dict(zip(header, cells, strict=True)))
    return tables
