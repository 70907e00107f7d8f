"""Benchmark: DPO step throughput of polmjax vs TRL vs tunix on the same model, pairs, reference and optimizer.

One run builds the SFT benchmark's tiny Llama-style model once with polmjax (`sft_throughput.build_model`, rope
theta 1e6 because tunix's Llama 3 always uses that) and saves it as a Hugging Face directory, so every framework
trains the *same weights* against a reference that is a frozen copy of them; writes one set of N synthetic
preference pairs (random prompt and response token ids, no padding, every response ending with token 1) as .npz;
then runs each framework in its own subprocess, one after the other (`sft_throughput.run_rows`), and prints one
table: steady-state seconds per step (median of `--steps` timed steps after `--warmup` untimed ones), pairs/s,
the ratio to polmjax, and each framework's loss and mean chosen log-prob before the first update. With the
reference equal to the policy the sigmoid DPO loss is ln 2 = 0.69315 whatever the log-probs; equal logps/chosen
show that the rows score the same tokens with the same model. Every row does the same work: fp32, sigmoid DPO
(beta 0.1), the reference forward in every step (no precomputed reference log-probs), forward + backward + AdamW
(constant lr, weight decay 0, global-norm clipping at 1.0) on the policy, chosen and rejected in one forward.

Rows (the code path each one times):
  polmjax  jit(dpo_step)                   the production step (`polmjax.train.dpo.dpo_step`, 1-device mesh,
                                           state donated, frozen["reference"] not donated), the pair packed as
                                           two segments of one row of 2 (P + R) tokens; each step
                                           timed to its end
  polmjax  jit(dpo_step), in flight        the same, one step in flight as `polmjax.train.loop` runs it
                                           (dispatch step i+1, then wait for step i), timed between
                                           dispatches like the trainer rows below
  tunix    _prepare_inputs + train step    `DPOTrainer`'s two jitted programs (reference log-probs, then the
                                           policy step), called in a plain loop
  tunix    DPOTrainer.train()              the whole trainer loop, step times from a TrainingHooks
  TRL      DPOTrainer.train()              the whole trainer loop, step times from a TrainerCallback
  torch    eager DPO step                  the TRL-equivalent step without the trainer (log_softmax + gather)

polmjax runs in this interpreter's environment; TRL, torch and tunix in the peers' venv (`peer_venv.py`:
--peer-python, $POLMJAX_BENCH_PYTHON or experiments/benchmarks/.peer-venv, built on first use; --no-build-peers
skips those rows instead). The two JAX rows also report XLA's cost analysis of their compiled programs (GFLOP and
GB accessed a step, from `compiled.cost_analysis()`; deterministic, load-independent).

Run from the repository root (CPU: about 4 minutes a round on 2 idle cores):

    .venv/bin/python experiments/benchmarks/dpo_throughput.py
    .venv/bin/python experiments/benchmarks/dpo_throughput.py --rounds 3 --pairs 8 --prompt-len 64 --response-len 64
    .venv/bin/python experiments/benchmarks/dpo_throughput.py --skip tunix,torch
    .venv/bin/python experiments/benchmarks/dpo_throughput.py --quick      # every row once, tiny sizes (smoke)

--json PATH also writes the table's rows as JSON (`run_all.py` collects them into RESULTS.md).

Shared machines: as `sft_throughput.py` (--quiet, --quiet-wait, --rounds; * marks a row timed on a busy machine).
A benchmark, not a test: on CPU the ratios compare XLA:CPU with PyTorch's CPU kernels as much as the frameworks.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile

import numpy as np
import sft_throughput as bench
from peer_venv import default_peer_python

EOS = 1  # every response ends with it: TRL's text rows then get no extra EOS (see _peers/trl_dpo_peer.py)
ROPE_THETA = 1e6  # tunix's Llama 3 ignores the checkpoint's theta and uses 1e6

# (row name, peer script, mode, interpreter: "self" or "peer"), as sft_throughput.ROWS
ROWS = [
    ("polmjax", "polmjax_dpo_peer.py", "step", "self"),
    ("polmjax", "polmjax_dpo_peer.py", "loop", "self"),
    ("tunix", "tunix_dpo_peer.py", "step", "peer"),
    ("tunix", "tunix_dpo_peer.py", "trainer", "peer"),
    ("TRL", "trl_dpo_peer.py", "trainer", "peer"),
    ("torch", "trl_dpo_peer.py", "torch", "peer"),
]
SKIPPABLE = ("tunix", "trl", "torch")
QUICK = dict(pairs=2, prompt_len=8, response_len=8, steps=1, warmup=2, rounds=1, quiet_wait=0.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=8, help="preference pairs a step (the global batch)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=64, help="tokens of each chosen and rejected response")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=10, help="timed steps a row (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator warm-up)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every row this many times, alternating the order, and pool the timed steps")
    p.add_argument("--skip", default="", help=f"comma-separated rows to leave out: {','.join(SKIPPABLE)}")
    p.add_argument("--peer-python", default=default_peer_python(),
                   help="interpreter of the venv holding trl, torch==2.13.0 and google-tunix (default "
                        "$POLMJAX_BENCH_PYTHON, else experiments/benchmarks/.peer-venv, built on first use)")
    p.add_argument("--no-build-peers", action="store_true",
                   help="never build the peers' venv: without one, the TRL, tunix and torch rows are skipped")
    p.add_argument("--quiet", type=float, default=0.10, help="see sft_throughput.py")
    p.add_argument("--quiet-wait", type=float, default=30.0, help="see sft_throughput.py")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed to each peer subprocess")
    p.add_argument("--workdir", default=None, help="keep the HF model, pairs and peer logs here (default: tmp)")
    p.add_argument("--json", default="", help="also write the table's rows, versions and load here (JSON)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: every row once with tiny sizes (" + ", ".join(f"{k}={v}" for k, v in
                                                                                 QUICK.items()) + "); no timing value")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.warmup < 2 or args.steps < 1 or args.rounds < 1 or args.pairs < 1:
        p.error("--warmup must be >= 2 (tunix compiles its step twice), --steps, --rounds and --pairs >= 1")
    if args.prompt_len < 1 or args.response_len < 2:
        p.error("--prompt-len must be >= 1 and --response-len >= 2 (its last token is the EOS)")
    skip = {s.strip().lower() for s in args.skip.split(",") if s.strip()}
    if skip - set(SKIPPABLE):
        p.error(f"--skip: unknown {sorted(skip - set(SKIPPABLE))}; choose from {','.join(SKIPPABLE)}")

    workdir = args.workdir or tempfile.mkdtemp(prefix="dpo_throughput_")
    os.makedirs(workdir, exist_ok=True)
    print(f"== DPO step throughput: {args.pairs} pairs x (prompt {args.prompt_len} + response {args.response_len}) "
          f"tokens, sigmoid beta={args.beta}, reference = frozen copy of the initial policy, fp32, AdamW "
          f"lr={args.lr}, {args.steps} timed steps after {args.warmup} warm-up, {args.rounds} round(s); "
          f"workdir {workdir}")
    hf_dir, pairs_path = _prepare(workdir, args)
    load_before = os.getloadavg()
    argv_common = ["--hf-dir", hf_dir, "--pairs", pairs_path, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--lr", str(args.lr), "--beta", str(args.beta)]
    rows = [r for r in ROWS if bench._key(r) not in skip]
    peer, no_peer = bench.resolve_peer(args) if any(r[3] == "peer" for r in rows) else (None, None)
    results, versions = bench.run_rows(rows, argv_common, args, workdir, peer, no_peer, width=40)
    load_after = os.getloadavg()
    _print_report(results, versions, args, load_before, load_after)
    if args.json:
        rows = [bench.summary_row(r, results, args.quiet, rate=("pairs_s", args.pairs),
                                  first_loss=(r or {}).get("first_loss"),
                                  first_logps_chosen=(r or {}).get("first_logps_chosen")) for r in results]
        costs = {r["framework"]: r["cost"] for r in results if r and r.get("cost")}
        bench.write_json(args.json, "dpo_throughput", args, rows, versions, load_before, load_after,
                         costs=costs, notes=bench.row_notes(results))


def _prepare(workdir, args):
    """The one model (saved as HF) and the one set of pairs every framework trains on."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before polmjax imports jax (as build_model does)
    from polmjax.models import RopeConfig

    hf_dir, cfg = bench.build_model(workdir, rope=RopeConfig(theta=ROPE_THETA))
    rs = np.random.RandomState(0)
    N, P, R = args.pairs, args.prompt_len, args.response_len
    prompt = rs.randint(EOS + 1, cfg.vocab_size, (N, P)).astype(np.int32)
    chosen, rejected = (rs.randint(EOS + 1, cfg.vocab_size, (N, R)).astype(np.int32) for _ in range(2))
    chosen[:, -1] = rejected[:, -1] = EOS
    pairs_path = os.path.join(workdir, "pairs.npz")
    np.savez(pairs_path, prompt=prompt, chosen=chosen, rejected=rejected)
    return hf_dir, pairs_path


def _print_report(results, versions, args, load_before, load_after):
    base = next((r for r in results if r and r.get("framework") == "polmjax" and r.get("step_times")), None)
    base_s = bench._seconds(base, args.quiet)[0] if base else None
    print()
    print("| framework | code path timed | s/step | pairs/s | vs polmjax | fastest | quiet/n | loss@1 | "
          "logps/chosen@1 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    flagged = False
    for r in results:
        if not r or not r.get("step_times"):
            r = r or {}
            print(f"| {r.get('framework', '?')} | {r.get('path', '')} | SKIPPED: {r.get('error')} | | | | | | |")
            continue
        sec, fastest, all_quiet = bench._seconds(r, args.quiet)
        flagged |= not all_quiet
        ratio = f"{sec / base_s:.2f}x" if base_s else "n/a"
        print(f"| {r['framework']} | {r['path']} | {sec:.3f}{'' if all_quiet else '*'} | {args.pairs / sec:.1f} | "
              f"{ratio} | {fastest:.3f} | {bench._n_quiet(r, args.quiet)}/{len(r['step_times'])} | "
              f"{r.get('first_loss', float('nan')):.5f} | {r.get('first_logps_chosen', float('nan')):.3f} |")
    print()
    print(f"s/step: median over the quiet timed steps (other processes took < {args.quiet:.0%} of the CPUs "
          f"meanwhile); * = fewer than 3 were quiet, median of all steps (busy machine: rerun, or --rounds 3). "
          f"pairs/s = {args.pairs} pairs a step / s/step. vs polmjax: s/step / polmjax's (> 1: slower than polmjax). "
          f"loss@1, logps/chosen@1: before the first update (reference == policy: loss ln 2 = 0.69315); logps/chosen "
          f"is the mean over pairs of the summed log-probs of the {args.response_len} chosen response tokens.")
    if flagged:
        print("WARNING: some rows were timed on a busy machine (*): their numbers are inflated.")
    costs = [(r["framework"], r["cost"]) for r in results if r and r.get("cost")]
    if costs:
        print()
        print("| XLA program (CPU, cost analysis) | GFLOP | GB accessed | temp MiB |")
        print("|---|---:|---:|---:|")
        seen = set()
        for name, cost in costs:
            if name in seen:  # the step and trainer rows of one framework compile the same programs
                continue
            seen.add(name)
            for program, c in cost.items():
                print(f"| {name}: {program} | {c['gflop']:.2f} | {c['gb_accessed']:.3f} | {c['temp_mib']:.1f} |")
            if len(cost) > 1:
                print(f"| {name}: total a step | {sum(c['gflop'] for c in cost.values()):.2f} | "
                      f"{sum(c['gb_accessed'] for c in cost.values()):.3f} | |")
    for r in results:
        for note in (r or {}).get("notes", []):
            print(f"note ({r.get('framework')}, {r.get('path')}): {note}")
    print()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    print(f"hardware: {bench._cpu_model()}, {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} usable), "
          f"{bench._mem_gib():.0f} GiB RAM, {platform.system()} {platform.release()}, python {platform.python_version()}")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
