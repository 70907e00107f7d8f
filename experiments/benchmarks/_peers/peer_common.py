"""What every peer of `sft_throughput.py` shares: its arguments, the batch files, timing and the result file.

Stdlib and numpy only: each peer imports this from its own venv.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from importlib import metadata

import numpy as np


def parse_args(modes):
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=modes, required=True)
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--tokens", required=True, help=".npy int32 [B, T] token ids")
    p.add_argument("--loss-mask", required=True, help=".npy float32 [B, T]; 1 where token t is a target")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--target", default="", help="--mode compare: also compile for this TPU slice (v5p:1x1x1)")
    p.add_argument("--dump-dir", default="", help="--mode compare: write the compiled programs' HLO text here")
    return p.parse_args()


def load_batch(args):
    return np.load(args.tokens), np.load(args.loss_mask)


def versions(*packages):
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


class Clock:
    """Marks at step boundaries -> per-step wall seconds and the CPU share other processes took meanwhile.

    The share is (machine busy CPU time - this process's CPU time) / (wall time * cores), from /proc/stat and
    `time.process_time()` (all threads): on a shared machine it tells the steps that ran alone from the rest.
    """

    def __init__(self):
        self.marks = []

    def mark(self):
        self.marks.append((time.perf_counter(), busy_seconds(), time.process_time()))

    def steps(self, n_warmup):
        """(step seconds, others' CPU share) for every step after the first n_warmup."""
        out = []
        for (t0, b0, c0), (t1, b1, c1) in zip(self.marks, self.marks[1:]):
            out.append((t1 - t0, max(0.0, (b1 - b0) - (c1 - c0)) / (max(t1 - t0, 1e-9) * os.cpu_count())))
        return out[n_warmup:]


def busy_seconds():
    """Non-idle CPU seconds of the whole machine since boot (all cores); 0 where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def time_steps(step, n_warmup, n_steps):
    """Call `step()` (which must return only when the update is done) n_warmup + n_steps times.

    Returns (the first call's return value, Clock.steps(n_warmup)).
    """
    clock, first = Clock(), None
    for i in range(n_warmup + n_steps):
        clock.mark()
        r = step()
        if i == 0:
            first = r
    clock.mark()
    return first, clock.steps(n_warmup)


def xla_cost(compiled) -> str:
    """'X GFLOP, Y GB accessed' from XLA's cost analysis of a compiled step (deterministic, load-independent)."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        gflop, gb = cost["flops"] / 1e9, cost["bytes accessed"] / 1e9
        return f"XLA cost analysis: {gflop:.1f} GFLOP, {gb:.2f} GB accessed a step"
    except Exception as e:  # noqa: BLE001 - a note, never a failure
        return f"XLA cost analysis unavailable ({type(e).__name__})"


def cost_report(compiled) -> dict:
    """XLA's cost and memory analysis of a compiled step (per device; deterministic, load-independent)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    return {"gflop": cost["flops"] / 1e9, "gb_accessed": cost["bytes accessed"] / 1e9,
            "temp_mib": mem.temp_size_in_bytes / 2**20, "argument_mib": mem.argument_size_in_bytes / 2**20,
            "pallas_calls": hlo.count('custom_call_target="tpu_custom_call"')}


def dump_hlo(args, name, compiled):
    """The compiled program's HLO text into --dump-dir (nothing without one)."""
    if args.dump_dir:
        os.makedirs(args.dump_dir, exist_ok=True)
        with open(os.path.join(args.dump_dir, f"{name}.hlo.txt"), "w") as f:
            f.write(compiled.as_text())


def tpu_devices(target):
    """Compile-only devices of a TPU slice ("v5p:1x1x1", "v5e:2x2") from this CPU host (needs libtpu).

    A slice smaller than one host (v5p hosts hold 2x2x1 chips) needs its own chips_per_host_bounds.
    """
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no host-wide lock, no TPU host probing
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    dims = [int(d) for d in target.partition(":")[2].split("x")]
    kwargs = {"chips_per_host_bounds": tuple(dims + [1] * (3 - len(dims)))} if np.prod(dims) < 4 else {}
    return list(topologies.get_topology_desc(platform="tpu", topology_name=target, **kwargs).devices)


def write(args, steps, **result):
    """The result file: `steps` is Clock.steps(), stored as step_times and step_others."""
    result["step_times"] = [t for t, _ in steps]
    result["step_others"] = [o for _, o in steps]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


def one_line(e: Exception) -> str:
    """An exception as one short line for a result file."""
    return f"{type(e).__name__}: {e}".splitlines()[0][:400]


def guarded(main):
    """Run main(); on an exception write {"error": ...} to --out so the orchestrator can say why."""
    import sys

    out = None
    if "--out" in sys.argv:
        out = sys.argv[sys.argv.index("--out") + 1]
    try:
        main()
    except Exception as e:  # noqa: BLE001 - reported, not swallowed
        traceback.print_exc()
        if out:
            with open(out, "w") as f:
                json.dump({"error": one_line(e)}, f)
        sys.exit(1)
