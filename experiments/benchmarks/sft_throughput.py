"""Benchmark: SFT step throughput of polmjax vs TRL vs tunix on the same model, batch and optimizer.

One run builds a tiny Llama-style model once with polmjax, saves it as a Hugging Face directory (so every
framework trains the *same weights*), writes one batch of random token ids and its loss mask as .npy, then
runs each framework in its own subprocess, one after the other, and prints one table: steady-state seconds
per step (median of `--steps` timed steps after `--warmup` untimed ones), tokens/s and the ratio to polmjax,
plus each framework's loss before the first update (equal losses show the rows do the same computation).
Every row does the same work: fp32, no packing, forward + backward + AdamW update (constant lr, weight decay
0, global-norm clipping at 1.0), loss on the same tokens (all of them, or the completion with --prompt-len).

Rows (the code path each one times):
  polmjax  jit_sft_step                the production step (`polmjax.train.sft.jit_sft_step`, 1-device mesh)
  tunix    PeftTrainer train step      the trainer's own jitted step, called in a plain loop
  tunix    PeftTrainer.train()         the whole trainer loop, step times from a TrainingHooks
  TRL      SFTTrainer.train()          the whole trainer loop, step times from a TrainerCallback
  torch    model(ids, labels=..)       the TRL-equivalent eager step: loss.backward(); clip; AdamW.step()

polmjax runs in this interpreter's environment. TRL and tunix (`google-tunix`, which brings its own jax,
flax and optax pins) run in a separate venv: `--peer-python PATH` (or $POLMJAX_BENCH_PYTHON), else the
repository's git-ignored experiments/benchmarks/.peer-venv, which `peer_venv.py` builds on first use (a few
minutes; --no-build-peers skips the peer rows instead).

Run from the repository root (CPU: about 2 minutes a round on 2 idle cores):

    .venv/bin/python experiments/benchmarks/sft_throughput.py
    .venv/bin/python experiments/benchmarks/sft_throughput.py --rounds 2 --steps 10 --batch 8 --seq-len 256
    .venv/bin/python experiments/benchmarks/sft_throughput.py --prompt-len 64   # completion-only loss
    .venv/bin/python experiments/benchmarks/sft_throughput.py --only polmjax,torch
    .venv/bin/python experiments/benchmarks/sft_throughput.py --quick      # every row once, tiny sizes (smoke)

--json PATH also writes the table's rows as JSON (`run_all.py` collects them into RESULTS.md).

Shared machines: each peer also records, per step, the CPU share other processes took meanwhile; the table's
s/step is the median over the "quiet" steps (others < --quiet, default 10%) and marks a row * when fewer than
3 were quiet. Before each row the script waits up to --quiet-wait seconds for the machine to go idle, and
--rounds N reruns every row N times in alternating order. Torch's OpenMP threads slow down tenfold when
another process holds the cores; XLA about twofold.

A benchmark, not a test: on CPU the ratios compare XLA:CPU with PyTorch's CPU kernels as much as the
frameworks; absolute numbers mean something only on a GPU or TPU.
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
sys.path.insert(0, PEERS)

from peer_common import busy_seconds  # noqa: E402  (stdlib only; the peers share it)
from peer_venv import default_peer_python, peer_python  # noqa: E402

MODEL = dict(family="llama", vocab_size=512, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8,
             num_kv_heads=4, head_dim=32)

# (row name, peer script, mode, interpreter: "self" or "peer")
ROWS = [
    ("polmjax", "polmjax_peer.py", "step", "self"),
    ("tunix", "tunix_peer.py", "step", "peer"),
    ("tunix", "tunix_peer.py", "trainer", "peer"),
    ("TRL", "trl_peer.py", "trainer", "peer"),
    ("torch", "trl_peer.py", "torch", "peer"),
]
QUICK = dict(batch=2, seq_len=16, steps=1, warmup=2, rounds=1, quiet_wait=0.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps a row (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator warm-up)")
    p.add_argument("--batch", type=int, default=8, help="global batch (rows)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--prompt-len", type=int, default=0,
                   help="0: loss on every token; N > 0: completion-only, no loss on the first N tokens of each row")
    p.add_argument("--peer-python", default=default_peer_python(),
                   help="interpreter of the venv holding trl, torch==2.13.0 and google-tunix (default "
                        "$POLMJAX_BENCH_PYTHON, else experiments/benchmarks/.peer-venv, built on first use)")
    p.add_argument("--no-build-peers", action="store_true",
                   help="never build the peers' venv: without one, the TRL, tunix and torch rows are skipped")
    p.add_argument("--only", default="", help="comma-separated subset of: polmjax,tunix,trl,torch")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every row this many times, alternating the order, and pool the timed steps")
    p.add_argument("--quiet", type=float, default=0.10,
                   help="a step is 'quiet' when other processes took less than this share of the CPUs meanwhile")
    p.add_argument("--quiet-wait", type=float, default=30.0,
                   help="before each row wait up to this many seconds for the machine to be quiet")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed to each peer subprocess")
    p.add_argument("--workdir", default=None, help="keep the HF model, batch and peer logs here (default: tmp)")
    p.add_argument("--json", default="", help="also write the table's rows, versions and load here (JSON)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: every row once with tiny sizes (" + ", ".join(f"{k}={v}" for k, v in
                                                                                 QUICK.items()) + "); no timing value")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.warmup < 2 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup must be >= 2 (tunix compiles its step twice), --steps and --rounds >= 1")
    if not 0 <= args.prompt_len < args.seq_len - 1:
        p.error(f"--prompt-len={args.prompt_len} must be in [0, seq_len - 1)")
    only = {s.strip().lower() for s in args.only.split(",") if s.strip()}
    if only - {_key(r) for r in ROWS}:
        p.error(f"--only: unknown {sorted(only - {_key(r) for r in ROWS})}; choose from polmjax,tunix,trl,torch")

    workdir = args.workdir or tempfile.mkdtemp(prefix="sft_throughput_")
    os.makedirs(workdir, exist_ok=True)
    print(f"== SFT step throughput: batch {args.batch} x seq {args.seq_len}, fp32, AdamW lr={args.lr}, "
          f"{'full loss' if args.prompt_len == 0 else f'completion-only (prompt {args.prompt_len})'}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, {args.rounds} round(s); workdir {workdir}")
    hf_dir, tokens_path, mask_path = _prepare(workdir, args)
    load_before = os.getloadavg()

    argv_common = ["--hf-dir", hf_dir, "--tokens", tokens_path, "--loss-mask", mask_path, "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--lr", str(args.lr)]
    rows = [r for r in ROWS if not only or _key(r) in only]
    peer, no_peer = resolve_peer(args) if any(r[3] == "peer" for r in rows) else (None, None)
    results, versions = run_rows(rows, argv_common, args, workdir, peer, no_peer)
    load_after = os.getloadavg()
    _print_report(results, versions, args, load_before, load_after)
    if args.json:
        tokens = args.batch * args.seq_len
        rows = [summary_row(r, results, args.quiet, rate=("tokens_s", tokens), first_loss=(r or {}).get("first_loss"))
                for r in results]
        write_json(args.json, "sft_throughput", args, rows, versions, load_before, load_after,
                   notes=row_notes(results))


# ----------------------------------------------------------------------------------------------


def run_rows(rows, argv_common, args, workdir, peer, no_peer, width=38):
    """Run every row (name, peer script, mode, "self" | "peer") args.rounds times, alternating the order.

    Each run waits for a quiet machine first (args.quiet_wait, args.quiet), gets `argv_common` plus its own
    --out, and prints one line; a row's timed steps are pooled over the rounds. Returns ([result per row, in
    row order], {package: version}); a row without an interpreter or whose peer failed has "error" instead.
    """
    results = {(_key(r), r[2]): None for r in rows}
    versions = {}
    for rnd in range(args.rounds):
        for row in rows if rnd % 2 == 0 else rows[::-1]:  # alternate the order: drift hits every row alike
            name, script, mode, interp = row
            python = sys.executable if interp == "self" else peer
            if python is None:
                r = _skipped(name, mode, no_peer)
            else:
                busy = _wait_quiet(args.quiet_wait, args.quiet)
                out = os.path.join(workdir, f"{_key(row)}_{mode}_r{rnd}.json")
                r = _run_peer(python, script, mode, argv_common + ["--out", out], out, workdir, args.timeout)
                r.setdefault("framework", name)
                r.setdefault("path", mode)
                versions.update(r.get("versions", {}))
                print(f"   round {rnd + 1}: {r['framework']:8s} {r['path']:{width}s} "
                      + (f"{statistics.median(r['step_times']):.4f} s/step" if r.get("step_times")
                         else f"SKIPPED: {r.get('error')}")
                      + f"  [{r.get('wall_s', 0):.0f}s; machine busy before {busy:.0%}, quiet steps "
                        f"{_n_quiet(r, args.quiet)}/{len(r.get('step_times', []))}]", flush=True)
            prev = results[(_key(row), mode)]
            if prev is None or not prev.get("step_times"):
                results[(_key(row), mode)] = r
            elif r.get("step_times"):
                prev["step_times"] += r["step_times"]
                prev["step_others"] += r["step_others"]
    return list(results.values()), versions


def summary_row(r, results, quiet, rate=None, **extra):
    """One table row of a step benchmark as plain data (the numbers its printed table shows).

    s_step: median over the quiet steps (all steps when fewer than 3 were quiet: all_quiet False);
    vs_polmjax: s_step / the first polmjax row's (> 1: slower); rate = (name, work a step) adds
    name = work / s_step. A row without step times has error set and no numbers.
    """
    r = r or {}
    row = {"framework": r.get("framework", "?"), "path": r.get("path", "")}
    if not r.get("step_times"):
        return {**row, "error": str(r.get("error") or "no step times")}
    base = next((b for b in results if b and b.get("framework") == "polmjax" and b.get("step_times")), None)
    sec, fastest, all_quiet = _seconds(r, quiet)
    row.update(s_step=sec, fastest=fastest, all_quiet=all_quiet, quiet_steps=_n_quiet(r, quiet),
               steps=len(r["step_times"]), vs_polmjax=sec / _seconds(base, quiet)[0] if base else None)
    if rate:
        row[rate[0]] = rate[1] / sec
    return {**row, **extra}


def row_notes(results):
    """The rows' notes, each as "framework, path: note" (as the printed report lists them)."""
    return [f"{r.get('framework')}, {r.get('path')}: {n}" for r in results if r for n in r.get("notes", [])]


def write_json(path, benchmark, args, rows, versions, load_before, load_after, **extra):
    """A benchmark's --json file: its settings, table rows, package versions and the load around the rows."""
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "peer_python", "workdir")}
    out = {"benchmark": benchmark, "settings": settings, "rows": rows, "versions": versions,
           "load_before": list(load_before), "load_after": list(load_after), **extra}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def resolve_peer(args) -> tuple[str | None, str | None]:
    """(the peers' interpreter, None), built if missing and allowed; else (None, why there is none)."""
    try:
        return peer_python(args.peer_python, build=not args.no_build_peers), None
    except (SystemExit, subprocess.CalledProcessError) as e:
        return None, f"no peer venv: {e}"


def _key(row):
    name, _, mode, _ = row
    return "torch" if mode == "torch" else name.lower()


def _prepare(workdir, args):
    """The one model (saved as HF) and the one batch every framework trains on."""
    hf_dir, cfg = build_model(workdir)
    rs = np.random.RandomState(0)
    tokens_BT = rs.randint(0, cfg.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
    # loss_mask_BT[b, t] = 1: token t is a prediction target (predicted from tokens < t); token 0 never is
    loss_mask_BT = np.ones((args.batch, args.seq_len), np.float32)
    loss_mask_BT[:, : max(args.prompt_len, 1)] = 0
    tokens_path, mask_path = os.path.join(workdir, "tokens.npy"), os.path.join(workdir, "loss_mask.npy")
    np.save(tokens_path, tokens_BT)
    np.save(mask_path, loss_mask_BT)
    return hf_dir, tokens_path, mask_path


def build_model(workdir, **overrides):
    """`MODEL` (fields replaced by `overrides`) with seed-0 weights, saved as a Hugging Face directory
    workdir/hf that every framework loads: (that directory, the polmjax ModelConfig)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a libtpu in the venv must not be probed for this
    import jax

    from polmjax import models

    cfg = models.ModelConfig(**{**MODEL, **overrides})
    hf_dir = os.path.join(workdir, "hf")
    models.save_pretrained(models.create(cfg, seed=0), hf_dir)
    n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(models.param_specs(cfg),
                                                                   is_leaf=lambda x: hasattr(x, "shape")))
    print(f"   model: llama {cfg.num_layers}L D={cfg.hidden_size} F={cfg.intermediate_size} H={cfg.num_heads} "
          f"G={cfg.num_kv_heads} K={cfg.head_dim} V={cfg.vocab_size} untied, {n_params / 1e6:.2f}M params -> {hf_dir}")
    return hf_dir, cfg


def _run_peer(python, script, mode, argv, out, workdir, timeout):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true",
               PYTHONPATH=os.pathsep.join([ROOT] + [x for x in [os.environ.get("PYTHONPATH")] if x]))
    # one host device for every JAX peer, whatever the caller's XLA_FLAGS say
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    log_path = os.path.join(workdir, os.path.basename(out).replace(".json", ".log"))
    cmd = [python, os.path.join(PEERS, script), "--mode", mode] + argv
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return _skipped(None, mode, f"timed out after {timeout}s (log: {log_path})")
    wall = time.perf_counter() - t0
    if os.path.exists(out):
        with open(out) as f:
            r = json.load(f)
        r["wall_s"] = wall
        if r.get("error"):
            r["error"] += f" (log: {log_path})"
        return r
    with open(log_path) as f:
        tail = [ln.rstrip() for ln in f.readlines() if ln.strip()][-1:]
    return _skipped(None, mode, f"exit code {rc}: {tail[0] if tail else '(no output)'} (log: {log_path})")


def _skipped(name, mode, why):
    r = {"path": mode, "error": why}
    if name:
        r["framework"] = name
    return r


def _n_quiet(r, quiet):
    return sum(o < quiet for o in r.get("step_others", []))


def _seconds(r, quiet):
    """(median s/step, fastest step, whether only quiet steps were used): quiet ones when there are >= 3."""
    quiet_times = [t for t, o in zip(r["step_times"], r["step_others"]) if o < quiet]
    enough = len(quiet_times) >= min(3, len(r["step_times"]))
    return statistics.median(quiet_times if enough else r["step_times"]), min(r["step_times"]), enough


def _print_report(results, versions, args, load_before, load_after):
    tokens = args.batch * args.seq_len
    base = next((r for r in results if r and r.get("framework") == "polmjax" and r.get("step_times")), None)
    base_s = _seconds(base, args.quiet)[0] if base else None
    print()
    print(f"{'framework':9s} {'code path timed':38s} {'s/step':>8s} {'tokens/s':>8s} {'vs polmjax':>10s} "
          f"{'fastest':>7s} {'quiet/n':>7s} {'loss@1':>8s}")
    print("-" * 103)
    flagged = False
    for r in results:
        if not r or not r.get("step_times"):
            r = r or {}
            print(f"{r.get('framework', '?'):9s} {r.get('path', ''):38s} SKIPPED: {r.get('error')}")
            continue
        sec, fastest, all_quiet = _seconds(r, args.quiet)
        flagged |= not all_quiet
        ratio = f"{sec / base_s:9.2f}x" if base_s else f"{'n/a':>10s}"
        loss = r.get("first_loss")
        print(f"{r['framework']:9s} {r['path']:38s} {sec:7.3f}{' ' if all_quiet else '*'} {tokens / sec:8.0f} "
              f"{ratio} {fastest:7.3f} {_n_quiet(r, args.quiet):3d}/{len(r['step_times']):<3d} "
              f"{'' if loss is None else f'{loss:8.5f}'}")
    print()
    print(f"s/step: median over the quiet timed steps (other processes took < {args.quiet:.0%} of the CPUs "
          f"meanwhile); * = fewer than 3 were quiet, median of all steps (busy machine: rerun, or --rounds 3). "
          f"tokens/s = {tokens} tokens a step / s/step. vs polmjax: s/step / polmjax's (> 1: slower than polmjax). "
          f"fastest: the fastest step. loss@1: loss before the first update, same weights and batch "
          f"(tunix's llama3 ignores rope_theta and always uses 1e6, hence its small difference).")
    if flagged:
        print("WARNING: some rows were timed on a busy machine (*): their numbers are inflated.")
    for r in results:
        for note in (r or {}).get("notes", []):
            print(f"note ({r.get('framework')}, {r.get('path')}): {note}")
    print()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    print(f"hardware: {_cpu_model()}, {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} usable), "
          f"{_mem_gib():.0f} GiB RAM, {platform.system()} {platform.release()}, python {platform.python_version()}")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")


def _wait_quiet(max_wait, quiet, window=1.0):
    """Wait (at most max_wait s) until the machine is less than `quiet` busy; return the last busy share."""
    deadline = time.perf_counter() + max_wait
    while True:
        b0, t0 = busy_seconds(), time.perf_counter()
        time.sleep(window)
        busy = (busy_seconds() - b0) / ((time.perf_counter() - t0) * os.cpu_count())
        if busy < quiet or time.perf_counter() >= deadline:
            return busy


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mem_gib():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return float("nan")


if __name__ == "__main__":
    main()
