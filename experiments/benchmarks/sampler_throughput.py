"""Benchmark: KV-cache sampling throughput of polmjax vs transformers vs tunix on the same weights and prompts.

One run builds a small Llama once with polmjax and saves it as a Hugging Face directory (so every framework
samples from the *same weights*), writes one batch of random prompts as .npy, then runs each framework in its
own subprocess, one after the other, and prints one table: seconds per generate call (median of --calls timed
calls after --warmup untimed ones), generated tokens/s, the ratio to the first polmjax row of the same work,
and whether the framework's greedy tokens equal polmjax's. Every row does the same work: fp32, batch B of
P-token prompts (no padding), N new tokens per row (no end token), on CPU; either

  greedy   one completion per prompt, temperature 0 (B x N tokens a call), or
  sampled  --samples completions per prompt at temperature 1, no top-k/top-p (B x samples x N tokens a call:
           the rollout of a GRPO step; tokens differ between frameworks, their RNGs do).

Rows (the code path each one times):
  greedy   polmjax       polmjax.generate.generate       prefill + decode loop in one jit, cache updated in place
  greedy   polmjax       polmjax.rl.sampler.sample       the RL sampler: jitted prefill into a prompt-sized cache,
                                                         jitted while-loop decode (n=1)
  greedy   transformers  model.generate(do_sample=False) torch CPU, sdpa, default dynamic cache
  greedy   tunix         tunix.generate.sampler.Sampler  the vanilla sampler (prefill jit + decode while_loop jit)
  sampled  polmjax       polmjax.rl.sampler.sample(n)    one prefill per prompt, its cache rows repeated n times
  sampled  transformers  generate(num_return_sequences)  prompts expanded n times before the prefill
  sampled  tunix         Sampler(prompts repeated n x)   no n option; tunix's GRPO learner repeats the prompts too

polmjax runs in this interpreter's environment; transformers and tunix in the peers' venv (`peer_venv.py`:
`--peer-python`, else experiments/benchmarks/.peer-venv, built on first use). Run from the repository root:

    .venv/bin/python experiments/benchmarks/sampler_throughput.py
    .venv/bin/python experiments/benchmarks/sampler_throughput.py --rounds 3 --only polmjax,tunix
    .venv/bin/python experiments/benchmarks/sampler_throughput.py --quick     # every row once, tiny sizes (smoke)

--json PATH also writes the table's rows as JSON (`run_all.py` collects them into RESULTS.md).

Shared machines: each timed call records the CPU share other processes took meanwhile; the table's s/call is
the median of the "quiet" calls (others < --quiet) when there are at least 3, and --rounds N reruns every row
N times in alternating order, pooling the calls. A benchmark, not a test: on CPU the ratios compare XLA:CPU
with PyTorch's CPU kernels as much as the frameworks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PEERS = os.path.join(HERE, "_peers")
sys.path.insert(0, HERE)
sys.path.insert(0, PEERS)

from sft_throughput import _cpu_model, _wait_quiet  # noqa: E402  (one copy of the machine helpers)
from peer_venv import default_peer_python, peer_python  # noqa: E402

# 4.0M parameters; rope theta 1e6 because tunix's Llama 3 always uses that
MODEL = dict(family="llama", vocab_size=2048, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
             num_kv_heads=2, head_dim=64, rope=dict(theta=1e6))

# (framework, peer script, --mode, interpreter: "self" or "peer"); a mode "sampled" row does the sampled work
ROWS = [("polmjax", "polmjax_sampler.py", "generate", "self"), ("polmjax", "polmjax_sampler.py", "greedy", "self"),
        ("transformers", "hf_sampler.py", "greedy", "peer"), ("tunix", "tunix_sampler.py", "greedy", "peer"),
        ("polmjax", "polmjax_sampler.py", "sampled", "self"), ("transformers", "hf_sampler.py", "sampled", "peer"),
        ("tunix", "tunix_sampler.py", "sampled", "peer")]
FRAMEWORKS = ("polmjax", "transformers", "tunix")
QUICK = dict(batch=2, prompt_len=8, new_tokens=8, samples=2, calls=1, warmup=1, rounds=1, quiet_wait=0.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--samples", type=int, default=4,
                   help="completions per prompt of the sampled rows (0: greedy rows only)")
    p.add_argument("--calls", type=int, default=3, help="timed generate calls a row (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (compilation)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every row this many times, alternating the order, and pool the timed calls")
    p.add_argument("--only", default="", help="comma-separated subset of: polmjax,transformers,tunix")
    p.add_argument("--peer-python", default=default_peer_python(),
                   help="interpreter of a venv with torch, transformers and google-tunix (default: the in-repo "
                        "peer venv, built on first use)")
    p.add_argument("--quiet", type=float, default=0.10,
                   help="a call is 'quiet' when other processes took less than this share of the CPUs meanwhile")
    p.add_argument("--quiet-wait", type=float, default=15.0,
                   help="before each row wait up to this many seconds for the machine to be quiet")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed to each peer subprocess")
    p.add_argument("--workdir", default=None, help="keep the HF model, prompts, tokens and peer logs here")
    p.add_argument("--json", default="", help="also write the table's rows, versions and load here (JSON)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: every row once with tiny sizes (" + ", ".join(f"{k}={v}" for k, v in
                                                                                 QUICK.items()) + "); no timing value")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    only = {s.strip().lower() for s in args.only.split(",") if s.strip()}
    if only - set(FRAMEWORKS):
        p.error(f"--only: unknown {sorted(only - set(FRAMEWORKS))}; choose from {','.join(FRAMEWORKS)}")
    if args.warmup < 1 or args.calls < 1 or args.rounds < 1 or args.samples < 0:
        p.error("--warmup, --calls and --rounds must be >= 1, --samples >= 0")
    rows = [r for r in ROWS if (not only or r[0] in only) and (args.samples or r[2] != "sampled")]
    peer = peer_python(args.peer_python) if any(r[3] == "peer" for r in rows) else None

    workdir = args.workdir or tempfile.mkdtemp(prefix="sampler_throughput_")
    os.makedirs(workdir, exist_ok=True)
    print(f"== sampling throughput: batch {args.batch} x prompt {args.prompt_len} + {args.new_tokens} new tokens, "
          f"greedy" + (f" and {args.samples} samples a prompt at T=1" if args.samples else "") + f", fp32, "
          f"{args.calls} timed calls after {args.warmup} warm-up, {args.rounds} round(s); workdir {workdir}")
    hf_dir, prompts_path = _prepare(workdir, args)
    load_before = os.getloadavg()
    common = ["--hf-dir", hf_dir, "--prompts", prompts_path, "--new-tokens", str(args.new_tokens),
              "--calls", str(args.calls), "--warmup", str(args.warmup), "--samples", str(max(args.samples, 1))]
    results = {(r[0], r[2]): None for r in rows}
    versions = {}
    for rnd in range(args.rounds):
        for key, script, mode, interp in rows if rnd % 2 == 0 else rows[::-1]:
            busy = _wait_quiet(args.quiet_wait, args.quiet)
            out = os.path.join(workdir, f"{key}_{mode}_r{rnd}.json")
            python = sys.executable if interp == "self" else peer
            r = _run_peer(python, script, common + ["--mode", mode, "--out", out], out, workdir, args.timeout)
            r.setdefault("framework", key)
            r["mode"] = mode
            versions.update(r.get("versions", {}))
            print(f"   round {rnd + 1}: {key:12s} {mode:8s} "
                  + (f"{statistics.median(r['step_times']):.3f} s/call" if r.get("step_times")
                     else f"SKIPPED: {r.get('error')}")
                  + f"  [{r.get('wall_s', 0):.0f}s; machine busy before {busy:.0%}]", flush=True)
            prev = results[(key, mode)]
            if prev is None or not prev.get("step_times"):
                results[(key, mode)] = r
            elif r.get("step_times"):
                prev["step_times"] += r["step_times"]
                prev["step_others"] += r["step_others"]
    load_after = os.getloadavg()
    _print_report(results, versions, args, load_before, load_after)
    if args.json:
        _write_json(args.json, results, versions, args, load_before, load_after)


def _prepare(workdir, args):
    """The one model (saved as HF) and the one batch of prompts every framework samples from."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from polmjax import models

    cfg = models.ModelConfig(**{**MODEL, "rope": models.RopeConfig(**MODEL["rope"])})
    hf_dir = os.path.join(workdir, "hf")
    models.save_pretrained(models.create(cfg, seed=0), hf_dir)
    prompts = np.random.RandomState(0).randint(1, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
    prompts_path = os.path.join(workdir, "prompts.npy")
    np.save(prompts_path, prompts)
    print(f"   model: llama {cfg.num_layers}L D={cfg.hidden_size} F={cfg.intermediate_size} H={cfg.num_heads} "
          f"G={cfg.num_kv_heads} K={cfg.head_dim} V={cfg.vocab_size} untied, {cfg.num_params() / 1e6:.2f}M params "
          f"-> {hf_dir}")
    return hf_dir, prompts_path


def _run_peer(python, script, argv, out, workdir, timeout):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu",
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([ROOT] + [x for x in [os.environ.get("PYTHONPATH")] if x]))
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)  # one host device for every JAX peer
    log_path = out.replace(".json", ".log")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run([python, os.path.join(PEERS, script)] + argv, env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout}s (log: {log_path})"}
    if os.path.exists(out):
        with open(out) as f:
            r = json.load(f)
        r["wall_s"] = time.perf_counter() - t0
        if r.get("error"):
            r["error"] += f" (log: {log_path})"
        return r
    return {"error": f"exit code {rc}, no result (log: {log_path})"}


def _seconds(r, quiet):
    """(median s/call, whether only quiet calls were used): the quiet ones when there are >= 3."""
    quiet_times = [t for t, o in zip(r["step_times"], r["step_others"]) if o < quiet]
    enough = len(quiet_times) >= min(3, len(r["step_times"]))
    return statistics.median(quiet_times if enough else r["step_times"]), enough


def _print_report(results, versions, args, load_before, load_after):
    ok = {k: r for k, r in results.items() if r and r.get("step_times")}
    base = {}  # work -> (s/call, tokens) of the first polmjax row of that work
    for (key, mode), r in ok.items():
        work = _work(mode)
        if key == "polmjax" and work not in base:
            base[work] = (_seconds(r, args.quiet)[0], np.load(r["tokens"]))
    print()
    print("| work | framework | code path timed | s/call | tokens/s | vs polmjax | greedy tokens == polmjax |")
    print("|---|---|---|---:|---:|---:|---|")
    flagged = False
    for (key, mode), r in results.items():
        work = _work(mode)
        if (key, mode) not in ok:
            print(f"| {work} | {key} | {mode}: SKIPPED: {(r or {}).get('error')} | | | | |")
            continue
        sec, all_quiet = _seconds(r, args.quiet)
        flagged |= not all_quiet
        tokens = args.batch * args.new_tokens * (args.samples if work == "sampled" else 1)
        base_s, base_tokens = base.get(work, (None, None))
        same = ("n/a (sampled)" if work == "sampled" else "n/a" if base_tokens is None
                else _same(np.load(r["tokens"]), base_tokens))
        print(f"| {work} | {r['framework']} | {r['path']} | {sec:.3f}{'' if all_quiet else '*'} | {tokens / sec:,.0f} | "
              f"{f'{sec / base_s:.2f}x' if base_s else 'n/a'} | {same} |")
    print()
    print(f"s/call: median of the timed generate calls (quiet ones: other processes took < {args.quiet:.0%} of the "
          f"CPUs meanwhile; * = fewer than 3 were quiet, all calls used). tokens/s = generated tokens a call "
          f"({args.batch * args.new_tokens} greedy, {args.batch * max(args.samples, 1) * args.new_tokens} sampled) / "
          f"s/call (prefill included). vs polmjax: this row's s/call / that of the first polmjax row of the same "
          f"work (> 1: slower).")
    if flagged:
        print("WARNING: some rows were timed on a busy machine (*): rerun with --rounds 3.")
    for r in results.values():
        for note in (r or {}).get("notes", []):
            print(f"note ({r.get('framework')}, {r.get('mode')}): {note}")
    print()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    print(f"hardware: {_cpu_model()}, {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} usable), "
          f"{platform.system()} {platform.release()}, python {platform.python_version()}")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")


def _write_json(path, results, versions, args, load_before, load_after):
    """The table's rows as data (the numbers _print_report shows), with the settings, versions and load."""
    ok = {k: r for k, r in results.items() if r and r.get("step_times")}
    base = {}  # work -> (s/call, tokens) of the first polmjax row of that work, as in _print_report
    for (key, mode), r in ok.items():
        if key == "polmjax" and _work(mode) not in base:
            base[_work(mode)] = (_seconds(r, args.quiet)[0], np.load(r["tokens"]))
    rows = []
    for (key, mode), r in results.items():
        work = _work(mode)
        row = {"work": work, "framework": key, "mode": mode, "path": (r or {}).get("path", mode)}
        if (key, mode) not in ok:
            rows.append({**row, "error": str((r or {}).get("error") or "no call times")})
            continue
        sec, all_quiet = _seconds(r, args.quiet)
        tokens = args.batch * args.new_tokens * (args.samples if work == "sampled" else 1)
        base_s, base_tokens = base.get(work, (None, None))
        same = (None if work == "sampled" or base_tokens is None else _same(np.load(r["tokens"]), base_tokens))
        rows.append({**row, "s_call": sec, "tokens_s": tokens / sec, "vs_polmjax": sec / base_s if base_s else None,
                     "all_quiet": all_quiet, "quiet_calls": sum(o < args.quiet for o in r["step_others"]),
                     "calls": len(r["step_times"]), "greedy_tokens_equal": same})
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "peer_python", "workdir")}
    notes = [f"{r.get('framework')}, {r.get('mode')}: {n}" for r in results.values() if r for n in r.get("notes", [])]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"benchmark": "sampler_throughput", "settings": settings, "rows": rows, "versions": versions,
                   "load_before": list(load_before), "load_after": list(load_after), "notes": notes}, f, indent=1)


def _work(mode):
    return "sampled" if mode == "sampled" else "greedy"


def _same(tokens, base):
    if tokens.shape != base.shape:
        return f"no (shape {tokens.shape} vs {base.shape})"
    diff = np.argwhere(tokens != base)
    if not len(diff):
        return "yes"
    return f"no: {len({int(b) for b, _ in diff})}/{len(base)} rows differ, first at token {int(diff[:, 1].min())}"


if __name__ == "__main__":
    main()
