"""Benchmark: polmjax's SFT train step against tunix's, compiled program against compiled program.

The model, weights, batch and optimizer of `sft_throughput.py` (whose helpers this reuses): a 3.2M-param
Llama-style model, batch 8 x 256, fp32, AdamW, global-norm clipping at 1.0, loss on every token. One markdown
table, a row per framework:

  CPU GFLOP, CPU GB accessed       XLA's cost analysis of the step as compiled for this host (deterministic)
  CPU s/step                       median of the quiet timed steps (other processes < --quiet of the CPUs;
                                   * = fewer than 3 were quiet), pooled over --rounds alternating runs
  v5p GFLOP, GB accessed, temp MiB the same step compiled ahead of time for one chip of --target from this CPU
                                   host, per device, from the TPU compiler (libtpu in both venvs)

polmjax is `jit_sft_step` (`_peers/polmjax_peer.py`), tunix its `PeftTrainer` train step as one jitted function
of (model + optimizer state, batch) (`_peers/tunix_peer.py`), both with the state donated. On the TPU polmjax
compiles twice: as it runs there (attention and log-probs in its Pallas TPU kernels, whose cost XLA takes from
the kernels' own estimates) and with impl="xla" (plain XLA attention and chunked log-probs, like tunix).
tunix runs in the peers' venv (`peer_venv.py`: --peer-python, $POLMJAX_BENCH_PYTHON or the in-repo venv); its
TPU column needs `<peer python> -m pip install "jax[tpu]==<its jax version>"` there.

Run from the repository root (CPU: about 3 minutes on 2 idle cores):

    .venv/bin/python experiments/benchmarks/sft_step_compare.py
    .venv/bin/python experiments/benchmarks/sft_step_compare.py --rounds 3 --dump-dir /tmp/sft_hlo  # + HLO text
    .venv/bin/python experiments/benchmarks/sft_step_compare.py --target ''                        # CPU only

A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import sft_throughput as bench
from peer_venv import default_peer_python

ROWS = (("polmjax", "polmjax_peer.py", "self"), ("tunix", "tunix_peer.py", "peer"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps a run (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (tunix compiles its step twice)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rounds", type=int, default=2, help="timed runs a framework, alternating the order")
    p.add_argument("--target", default="v5p:1x1x1", help="TPU slice to compile for ('': CPU only)")
    p.add_argument("--dump-dir", default="", help="write every compiled program's HLO text here")
    p.add_argument("--peer-python", default=default_peer_python(),
                   help="interpreter of the venv holding google-tunix (default $POLMJAX_BENCH_PYTHON, else "
                        "experiments/benchmarks/.peer-venv, built on first use)")
    p.add_argument("--no-build-peers", action="store_true", help="never build the peers' venv")
    p.add_argument("--quiet", type=float, default=0.10, help="see sft_throughput.py")
    p.add_argument("--quiet-wait", type=float, default=30.0, help="see sft_throughput.py")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed to each peer subprocess")
    p.add_argument("--workdir", default=None, help="keep the HF model, batch and peer logs here (default: tmp)")
    args = p.parse_args(argv)
    if args.warmup < 2 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup must be >= 2, --steps and --rounds >= 1")
    args.prompt_len = 0  # loss on every token, as sft_throughput's default

    workdir = args.workdir or tempfile.mkdtemp(prefix="sft_step_compare_")
    os.makedirs(workdir, exist_ok=True)
    print(f"== SFT step, polmjax vs tunix: batch {args.batch} x seq {args.seq_len}, fp32, AdamW, clip 1.0; "
          f"{args.steps} timed steps after {args.warmup} warm-up, {args.rounds} round(s); TPU target "
          f"{args.target or '(none)'}; workdir {workdir}")
    hf_dir, tokens_path, mask_path = bench._prepare(workdir, args)
    peer, no_peer = bench.resolve_peer(args)
    load_before = os.getloadavg()
    argv_common = ["--hf-dir", hf_dir, "--tokens", tokens_path, "--loss-mask", mask_path, "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--lr", str(args.lr)]
    results = {name: None for name, _, _ in ROWS}
    for rnd in range(args.rounds):
        for name, script, interp in ROWS if rnd % 2 == 0 else ROWS[::-1]:
            python = sys.executable if interp == "self" else peer
            if python is None:
                results[name] = {"framework": name, "error": no_peer}
                continue
            out = os.path.join(workdir, f"{name}_compare_r{rnd}.json")
            argv = argv_common + ["--out", out]
            if rnd == 0:  # the compiled programs do not change between rounds: analyse them once
                argv += (["--target", args.target] if args.target else []) + (
                    ["--dump-dir", args.dump_dir] if args.dump_dir else [])
            busy = bench._wait_quiet(args.quiet_wait, args.quiet)
            r = bench._run_peer(python, script, "compare", argv, out, workdir, args.timeout)
            print(f"   round {rnd + 1}: {name:8s} "
                  + (f"{len(r['step_times'])} steps" if r.get("step_times") else f"FAILED: {r.get('error')}")
                  + f" [{r.get('wall_s', 0):.0f}s; machine busy before {busy:.0%}, quiet steps "
                    f"{bench._n_quiet(r, args.quiet)}/{len(r.get('step_times', []))}]", flush=True)
            prev = results[name]
            if prev is None or not prev.get("step_times"):
                results[name] = r
            elif r.get("step_times"):
                prev["step_times"] += r["step_times"]
                prev["step_others"] += r["step_others"]
    _print_table(results, args, load_before)


def _print_table(results, args, load_before):
    tpu = args.target.split(":")[0] if args.target else "TPU"
    print()
    print(f"| framework | CPU GFLOP | CPU GB accessed | CPU s/step | {tpu} GFLOP | {tpu} GB accessed | "
          f"{tpu} temp MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    notes, versions = [], {}
    for name, r in results.items():
        r = r or {"error": "not run"}
        versions.update(r.get("versions", {}))
        if r.get("error"):
            print(f"| {name} | failed: {r['error']} |  |  |  |  |  |")
            continue
        cpu = r["cpu"]
        sec, _, all_quiet = bench._seconds(r, args.quiet)
        cpu_cells = f"{cpu['gflop']:.2f} | {cpu['gb_accessed']:.3f} | {sec:.3f}{'' if all_quiet else '*'}"
        tpus = r.get("tpu") or {}
        if r.get("tpu_error"):
            notes.append(f"{name}: no {tpu} compile: {r['tpu_error']} (the TPU compiler is libtpu: pip install "
                         f'"jax[tpu]=={r.get("versions", {}).get("jax", "<its jax version>")}" in its venv)')
        if not tpus:
            print(f"| {name} | {cpu_cells} | - | - | - |")
        for i, (impl, t) in enumerate(tpus.items()):
            label = name if len(tpus) == 1 else f"{name} ({tpu}: {_IMPL_LABEL[impl]})"
            cells = cpu_cells if i == 0 else "(as above) | | "
            print(f"| {label} | {cells} | {t['gflop']:.2f} | {t['gb_accessed']:.3f} | {t['temp_mib']:.1f} |")
        notes.append(f"{name}: loss before the first update {r.get('first_loss', float('nan')):.5f}; "
                     f"{bench._n_quiet(r, args.quiet)}/{len(r['step_times'])} timed steps quiet")
    print()
    for note in notes:
        print(f"note: {note}")
    print("CPU GFLOP / GB accessed: `compiled.cost_analysis()` of the step compiled for this host; "
          f"{tpu}: per chip, ahead of time for one chip of {args.target or '-'} (Pallas kernels' cost from their "
          "own estimates). s/step: median of the quiet timed steps, * = fewer than 3 quiet (busy machine).")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    print(f"hardware: {bench._cpu_model()}, {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} usable), "
          f"{bench._mem_gib():.0f} GiB RAM")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")


_IMPL_LABEL = {"auto": "Pallas kernels", "xla": "impl=xla"}


if __name__ == "__main__":
    main()
