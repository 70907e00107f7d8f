"""Every benchmark against the peers in one command, collected into one markdown file.

Runs the benchmarks of this directory one after the other, each as a child process of this one (one
process tree on one machine: every row sees the same machine and the same other load, recorded before and
after each benchmark), has each write its table's rows with `--json`, and writes one markdown file (--out,
default experiments/benchmarks/RESULTS.md): the date and commit, the machine (CPU, cores, load average),
the package versions of polmjax's and the peers' venvs, and for each benchmark its command, settings, table
of s/step (or s/call, tokens/s) and its ratios to polmjax.

  sft      sft_throughput.py      SFT step: polmjax vs tunix (step, trainer) vs TRL vs eager torch
  dpo      dpo_throughput.py      DPO step: polmjax (step, in flight) vs tunix vs TRL vs eager torch
  grpo     grpo_step.py           one whole GRPO step (sample, score, update): polmjax vs TRL vs tunix
  sampler  sampler_throughput.py  KV-cache sampling, greedy and n samples a prompt: polmjax vs transformers, tunix
  kernels  kernels.py --small     token_logprobs temp memory (compiled programs) and time vs the naive path;
                                  attention times (on CPU only the XLA path exists: no ratio)

Run from the repository root (--quick took 8 minutes on 2 cores at load average 8; a full run, by the
benchmarks' own estimates and their 15-30 s wait for an idle machine before each row, about 20-25):

    .venv/bin/python experiments/benchmarks/run_all.py
    .venv/bin/python experiments/benchmarks/run_all.py --only sft,dpo --rounds 2 --out /tmp/sft_dpo.md
    .venv/bin/python experiments/benchmarks/run_all.py --quiet-wait 0     # a machine that is never idle
    .venv/bin/python experiments/benchmarks/run_all.py --quick            # smoke: every row once, tiny sizes

--quick passes every benchmark its --quick (kernels: --small, which both modes use on a CPU host): every row
once at tiny sizes, to check that every row runs and produces a number, not its speed. In both modes a row
without a number (a peer that failed, a missing venv, a benchmark that crashed) is marked FAILED with the
reason, the file is still written, and the exit status is 1. The peers' venv is the benchmarks' own
(`peer_venv.py`: --peer-python, $POLMJAX_BENCH_PYTHON or experiments/benchmarks/.peer-venv, built on first use).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import peer_venv  # noqa: E402
import sft_throughput as bench  # noqa: E402  (the machine helpers: CPU model, memory)

# (distribution name, label) of the versions table; google-tunix pins its own jax/flax/optax in the peers' venv
PACKAGES = [("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"), ("optax", "optax"), ("torch", "torch"),
            ("trl", "trl"), ("google-tunix", "tunix"), ("transformers", "transformers")]


@dataclass(frozen=True)
class Benchmark:
    title: str
    script: str
    full: tuple[str, ...]  # arguments of the full run
    quick: tuple[str, ...]  # arguments of --quick
    peers: bool  # takes --peer-python, --rounds, --quiet-wait and --workdir


BENCHMARKS = {
    "sft": Benchmark("SFT step", "sft_throughput.py", (), ("--quick",), True),
    "dpo": Benchmark("DPO step", "dpo_throughput.py", (), ("--quick",), True),
    "grpo": Benchmark("GRPO step", "grpo_step.py", (), ("--quick",), True),
    "sampler": Benchmark("Sampler throughput", "sampler_throughput.py", (), ("--quick",), True),
    "kernels": Benchmark("Kernels: memory and time vs the references", "kernels.py", ("--small",), ("--small",),
                         False),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="every row once at tiny sizes (each benchmark's --quick): checks that rows run, not speed")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(BENCHMARKS)} (default all)")
    p.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"), help="the markdown file to write")
    p.add_argument("--rounds", type=int, default=0,
                   help="passed to sft, dpo, grpo and sampler (0: each benchmark's default); not with --quick")
    p.add_argument("--quiet-wait", type=float, default=None,
                   help="passed to sft, dpo, grpo and sampler: seconds each row waits for an idle machine "
                        "(default: each benchmark's own, 15-30 s; 0 on a machine that is never idle)")
    p.add_argument("--peer-python", default=peer_venv.default_peer_python(),
                   help="the peers' interpreter, passed to every benchmark with peers (default: theirs)")
    p.add_argument("--timeout", type=int, default=0,
                   help="seconds allowed to each benchmark (0: 1200 with --quick, else 3600)")
    p.add_argument("--workdir", default=None, help="keep every benchmark's JSON, log and files here (default: tmp)")
    args = p.parse_args(argv)
    names = [s.strip().lower() for s in args.only.split(",") if s.strip()] or list(BENCHMARKS)
    if set(names) - set(BENCHMARKS):
        p.error(f"--only: unknown {sorted(set(names) - set(BENCHMARKS))}; choose from {','.join(BENCHMARKS)}")
    if args.quick and (args.rounds or args.quiet_wait is not None):
        p.error("--rounds and --quiet-wait do not go with --quick (every row once, no waiting)")
    timeout = args.timeout or (1200 if args.quick else 3600)
    workdir = args.workdir or tempfile.mkdtemp(prefix="run_all_")
    os.makedirs(workdir, exist_ok=True)

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    runs = {name: _run(name, BENCHMARKS[name], args, workdir, timeout) for name in names}
    total_s = time.perf_counter() - t0
    load_after = os.getloadavg()

    sections, failures = [], []
    for name, run in runs.items():
        lines, failed = render(name, run)
        sections += lines
        failures += [f"{name}: {f}" for f in failed]
    header = _header(args, argv, started, total_s, load_before, load_after, runs, failures)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(header + sections).rstrip() + "\n")
    print(f"\nwrote {args.out} ({total_s / 60:.1f} min; JSON and logs in {workdir})")
    for failure in failures:
        print(f"FAILED {failure}")
    return 1 if failures else 0


def render(name: str, run: dict) -> tuple[list[str], list[str]]:
    """One benchmark's markdown section and its failures (rows without a number; empty: every row ran).

    `run` holds the benchmark's --json data under "data" (None when it wrote none), its command, exit code,
    wall seconds and the tail of its log.
    """
    bm = BENCHMARKS[name]
    lines = [f"## {bm.title} (`{bm.script}`)", "", f"`{run['command']}` ({run['wall_s']:.0f} s"]
    data = run.get("data")
    if data is None:
        lines[-1] += ")"
        why = f"exit code {run['rc']}, no results: {run.get('tail', '')}"
        return lines + ["", f"FAILED: {_cell(why)}", ""], [why]
    if "load_before" in data:
        lines[-1] += f"; load average (1 min) {data['load_before'][0]:.2f} before, {data['load_after'][0]:.2f} after"
    lines[-1] += ")"
    if data.get("settings"):
        lines += ["", "settings: " + ", ".join(f"{k}={v}" for k, v in data["settings"].items()
                                                if v not in (None, "", False) and k not in ("only", "skip", "timeout"))]
    table, failed = RENDERERS[name](data)
    lines += [""] + table
    if run["rc"] != 0 and not failed:
        failed = [f"exit code {run['rc']}: {run.get('tail', '')}"]
        lines += ["", f"FAILED: {_cell(failed[0])}"]
    if data.get("notes"):
        lines += ["", "Notes from the rows:"] + [f"- {_cell(note)}" for note in data["notes"]]
    return lines + [""], failed


# ---------------------------------------------------------------------------------------- per benchmark


def _step_table(data, columns, first=("framework", "code path timed")):
    """Rows of a step benchmark (sft, dpo, grpo: `sft_throughput.summary_row` dicts) as a markdown table."""
    head = list(first) + [c[0] for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(first) + "---:|" * len(columns)]
    failed = []
    for row in data["rows"]:
        cells = [row["framework"], f"`{row['path']}`"]
        if row.get("error") or row.get("s_step") is None:
            failed.append(f"{row['framework']} {row['path']}: {row.get('error')}")
            cells += [f"FAILED: {_cell(row.get('error'))}"] + [""] * (len(columns) - 1)
        else:
            cells += [fmt(row) for _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    if not data["rows"]:
        failed.append("no rows")
    return lines, failed


def _seconds(key):
    return lambda r: f"{r[key]:.3f}" + ("" if r.get("all_quiet", True) else "*")


def _number(key, spec):
    return lambda r: "-" if r.get(key) is None else format(r[key], spec)


def _ratio(r):
    return "-" if r.get("vs_polmjax") is None else f"{r['vs_polmjax']:.2f}x"


def _quiet(r):
    return f"{r['quiet_steps']}/{r['steps']}"


STEP_LEGEND = ("s/step: median over the timed steps during which other processes took < 10% of the CPUs (* = "
               "fewer than 3 such steps: median of all steps, the machine was busy). vs polmjax = s/step / "
               "polmjax's (> 1: slower than polmjax). quiet/n: quiet steps / timed steps.")


def _sft(data):
    table, failed = _step_table(data, [("s/step", _seconds("s_step")), ("tokens/s", _number("tokens_s", ",.0f")),
                                       ("vs polmjax", _ratio), ("quiet/n", _quiet),
                                       ("loss@1", _number("first_loss", ".5f"))])
    return table + ["", STEP_LEGEND + " loss@1: loss before the first update (same weights and batch)."], failed


def _dpo(data):
    table, failed = _step_table(data, [("s/step", _seconds("s_step")), ("pairs/s", _number("pairs_s", ",.1f")),
                                       ("vs polmjax", _ratio), ("quiet/n", _quiet),
                                       ("loss@1", _number("first_loss", ".5f")),
                                       ("logps/chosen@1", _number("first_logps_chosen", ".3f"))])
    table += ["", STEP_LEGEND + " loss@1 = ln 2 = 0.69315 in every row (reference == policy)."]
    if data.get("costs"):
        table += ["", "| XLA program (CPU, cost analysis) | GFLOP | GB accessed | temp MiB |", "|---|---:|---:|---:|"]
        for framework, cost in data["costs"].items():
            for program, c in cost.items():
                table.append(f"| {framework}: {program} | {c['gflop']:.2f} | {c['gb_accessed']:.3f} | "
                             f"{c['temp_mib']:.1f} |")
    return table, failed


def _grpo(data):
    table, failed = _step_table(data, [("s/step", _seconds("s_step")), ("vs polmjax", _ratio),
                                       ("sampling s", _number("sampling_s", ".3f")),
                                       ("rest s", _number("rest_s", ".3f")),
                                       ("sampled tokens/s", _number("sampled_tokens_s", ",.0f")),
                                       ("quiet/n", _quiet), ("reward@1", _number("first_reward", ".3f"))])
    table += ["", STEP_LEGEND + " sampling s: median of the steps' own generate call; rest s = s/step - sampling s.",
              "", "What differs between the rows' work:"]
    return table + [f"- {d}" for d in data.get("differences", [])], failed


def _sampler(data):
    lines = ["| work | framework | code path timed | s/call | tokens/s | vs polmjax | greedy tokens == polmjax |",
             "|---|---|---|---:|---:|---:|---|"]
    failed = []
    for r in data["rows"]:
        cells = [r["work"], r["framework"], f"`{r['path']}`"]
        if r.get("error") or r.get("s_call") is None:
            failed.append(f"{r['work']} {r['framework']} {r['mode']}: {r.get('error')}")
            cells += [f"FAILED: {_cell(r.get('error'))}", "", "", ""]
        else:
            same = r.get("greedy_tokens_equal") or ("n/a (sampled)" if r["work"] == "sampled" else "-")
            cells += [_seconds("s_call")(r), f"{r['tokens_s']:,.0f}", _ratio(r), _cell(same)]
        lines.append("| " + " | ".join(cells) + " |")
    if not data["rows"]:
        failed.append("no rows")
    return lines + ["", "s/call: median of the timed generate calls (quiet ones when at least 3; * = fewer). "
                        "tokens/s: generated tokens a call / s/call, prefill included. vs polmjax = s/call / that of "
                        "the first polmjax row of the same work (> 1: slower)."], failed


def _kernels(data):
    lp, att, failed = data["logprobs"], data["attention"], []
    lines = [f"token_logprobs (`kernels_logprobs.py`), {lp['device']}, N={lp['N']} D={lp['D']} V={lp['V']} "
             f"{lp['dtype']}, impl={lp['impl']}; temp = `compile().memory_analysis().temp_size_in_bytes`, times "
             f"median of {lp['iters']} after {lp['warmup']} warm-up:", "",
             "| metric | ours | naive `log_softmax(h @ W)` | ours / naive |", "|---|---:|---:|---:|"]
    for r in lp["rows"]:
        if r["ours"] is None or r["naive"] is None:
            failed.append(f"token_logprobs {r['metric']}: ours {r['ours']}, naive {r['naive']}")
        lines.append(f"| {r['metric']} ({r['unit']}) | {_number('ours', '.2f')(r)} | {_number('naive', '.2f')(r)} | "
                     f"{_number('ours_over_naive', '.3f')(r)} |")
    if lp.get("max_abs_diff") is not None:
        lines += ["", f"max |lp_ours - lp_naive| = {lp['max_abs_diff']:.3e}"]
    lines += ["", f"causal attention (`kernels_attention.py`), {att['device']}, {att['tokens']} tokens, width "
                  f"{att['width']}, bf16, GQA 4:1, paths {', '.join(att['impls'])}; x xla = XLA time / this time:",
              "", "| impl | K | T | B | fwd ms | TFLOP/s | x xla | fwd+bwd ms | TFLOP/s | x xla |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in att["rows"]:
        if r["fwd_ms"] is None or r["fwd_bwd_ms"] is None:
            failed.append(f"attention {r['impl']} K={r['K']} T={r['T']}: fwd {r['fwd_ms']}, fwd+bwd {r['fwd_bwd_ms']}")
        lines.append(f"| {r['impl']} | {r['K']} | {r['T']} | {r['B']} | " + " | ".join(
            _number(f"{k}_{m}", spec)(r) for k in ("fwd", "fwd_bwd")
            for m, spec in (("ms", ".2f"), ("tflops", ".3g"), ("x_xla", ".2f"))) + " |")
    if not lp["rows"] or not att["rows"]:
        failed.append("no rows")
    return lines, failed


RENDERERS = {"sft": _sft, "dpo": _dpo, "grpo": _grpo, "sampler": _sampler, "kernels": _kernels}


# ---------------------------------------------------------------------------------------- running


def _run(name, bm, args, workdir, timeout):
    """Run one benchmark as a child process (its output echoed and logged); its --json data, or None."""
    json_path, log_path = os.path.join(workdir, f"{name}.json"), os.path.join(workdir, f"{name}.log")
    if os.path.exists(json_path):
        os.remove(json_path)  # a stale file from an earlier run must not pass for this one
    extra = list(bm.quick if args.quick else bm.full)
    if bm.peers:
        extra += ["--workdir", os.path.join(workdir, name)]
        extra += ["--peer-python", args.peer_python] if args.peer_python else []
        extra += ["--rounds", str(args.rounds)] if args.rounds else []
        extra += ["--quiet-wait", str(args.quiet_wait)] if args.quiet_wait is not None else []
    cmd = [sys.executable, os.path.join(HERE, bm.script), *extra, "--json", json_path]
    shown = " ".join(["python", f"experiments/benchmarks/{bm.script}"] +
                     [shlex.quote(a) for a in extra if a not in ("--workdir", os.path.join(workdir, name))])
    print(f"\n===== {name}: {shown}", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("JAX_PLATFORMS", "cpu")
    t0 = time.perf_counter()
    tail = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own process group: a timeout ends all of it
        killed = threading.Event()
        timer = threading.Timer(timeout, _kill_group, (proc, killed))
        timer.start()
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
                if line.strip():
                    tail = (tail + [line.strip()])[-3:]
            rc = proc.wait()
        finally:
            timer.cancel()
    wall = time.perf_counter() - t0
    if killed.is_set():
        tail = [f"timed out after {timeout} s"]
    data = None
    if os.path.exists(json_path):
        with open(json_path) as f:
            data = json.load(f)
    return {"command": shown, "rc": rc, "wall_s": wall, "data": data, "tail": " / ".join(tail)[-300:] +
            f" (log: {log_path})"}


def _kill_group(proc, killed):
    """The timeout: end the benchmark and every process it started (its own session's group)."""
    killed.set()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _header(args, argv, started, total_s, load_before, load_after, runs, failures):
    peer = args.peer_python or os.path.join(peer_venv.VENV, "bin", "python")
    ours, theirs = _versions(sys.executable), _versions(peer) if os.path.exists(peer) else {}
    command = " ".join(["python experiments/benchmarks/run_all.py"] +
                       [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    lines = ["# Benchmarks: polmjax vs its peers", "",
             f"Generated by `{command}` on {started:%Y-%m-%d %H:%M} UTC (commit {_commit()}), "
             f"{total_s / 60:.1f} min in all. Every benchmark ran as a child process of that one command, one "
             f"after the other, on this machine; CPU only. Ratios: time / polmjax's time on the same work "
             f"(> 1: slower than polmjax)."]
    if args.quick:
        lines += ["", "**--quick: a smoke run (every row once at tiny sizes). It shows that every row runs and "
                      "produces a number; the numbers themselves mean nothing.**"]
    lines += ["", "On CPU the ratios compare XLA:CPU with PyTorch's CPU kernels as much as the frameworks; "
                  "rows timed while other processes used the CPUs carry a *.", "",
              "## Machine", "",
              "| CPU | cores | RAM | OS | python | load average (1/5/15 min) before | after |",
              "|---|---|---|---|---|---|---|",
              f"| {bench._cpu_model()} | {os.cpu_count()} logical ({len(os.sched_getaffinity(0))} usable) | "
              f"{bench._mem_gib():.0f} GiB | {platform.system()} {platform.release()} | {platform.python_version()} | "
              f"{' / '.join(f'{x:.2f}' for x in load_before)} | {' / '.join(f'{x:.2f}' for x in load_after)} |", "",
              "## Versions", "", "| package | polmjax's venv | peers' venv |", "|---|---|---|"]
    lines += [f"| {label} | {ours.get(dist, '-')} | {theirs.get(dist, '-')} |" for dist, label in PACKAGES]
    lines += ["", "## Summary", "", "| benchmark | rows with a number | wall s | failed |", "|---|---:|---:|---|"]
    for name, run in runs.items():
        n_rows, n_ok = _count_rows(name, run.get("data"))
        failed = [f for f in failures if f.startswith(f"{name}: ")]
        lines.append(f"| {BENCHMARKS[name].title} | {n_ok}/{n_rows} | {run['wall_s']:.0f} | "
                     f"{_cell('; '.join(f.split(': ', 1)[1] for f in failed)) if failed else 'none'} |")
    return lines + [""]


def _count_rows(name, data):
    """(rows, rows with a number) of one benchmark's data."""
    if data is None:
        return 0, 0
    if name == "kernels":
        rows = data["logprobs"]["rows"] + data["attention"]["rows"]
        ok = [r for r in rows if all(r.get(k) is not None for k in ("ours", "naive", "fwd_ms", "fwd_bwd_ms")
                                     if k in r)]
        return len(rows), len(ok)
    key = "s_call" if name == "sampler" else "s_step"
    return len(data["rows"]), sum(r.get(key) is not None for r in data["rows"])


def _versions(python):
    probe = ("import importlib.metadata as m, json\nout = {}\nfor d in %r:\n    try:\n        out[d] = m.version(d)\n"
             "    except m.PackageNotFoundError:\n        out[d] = 'not installed'\nprint(json.dumps(out))"
             % [d for d, _ in PACKAGES])
    try:
        r = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {}


def _commit():
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return (sha or "unknown") + (", with uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cell(text):
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


if __name__ == "__main__":
    sys.exit(main())
