"""Benchmark: fused `token_logprobs` against the naive log_softmax(h @ w)[target] on the same inputs.

Times the forward and forward+backward (loss = sum of lp, gradients to hidden and unembed), median of
several runs after warm-up, and the compiled temporary memory (`memory_analysis().temp_size_in_bytes`)
of each, then prints a table with ours / naive ratios. A benchmark, not a test: absolute times mean
something only on a GPU or TPU.

    python experiments/benchmarks/kernels_logprobs.py                  # N=16384 D=2048 V=131072 bf16
    python experiments/benchmarks/kernels_logprobs.py --small          # CPU-sized: N=1024 D=256 V=8192
    python experiments/benchmarks/kernels_logprobs.py --impl xla --entropy
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from polmjax.kernels import token_logprobs
from polmjax.bench import median_ms
from polmjax.kernels.logprobs import token_logprobs_naive


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="CPU-sized shapes (N=1024 D=256 V=8192)")
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--v", type=int, default=131072)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--impl", default="auto", help="token_logprobs impl: auto, xla, pallas_tpu, pallas_gpu")
    p.add_argument("--entropy", action="store_true", help="also return (and differentiate) the entropy")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    N, D, V = (1024, 256, 8192) if args.small else (args.n, args.d, args.v)
    dtype = jnp.dtype(args.dtype)

    k = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k[0], (N, D), jnp.float32).astype(dtype)
    w = (jax.random.normal(k[1], (D, V), jnp.float32) * D**-0.5).astype(dtype)
    t = jax.random.randint(k[2], (N,), 0, V)
    device = jax.devices()[0]
    print(f"{device.platform} ({device.device_kind}), N={N} D={D} V={V} {dtype.name}, impl={args.impl}, "
          f"entropy={args.entropy}, median of {args.iters} after {args.warmup} warm-up")

    paths = {
        "ours": lambda h, w, t, **kw: token_logprobs(h, w, t, impl=args.impl, **kw),
        "naive": token_logprobs_naive,
    }
    rows, lps = {}, {}
    for name, fn in paths.items():
        rows[name], lps[name] = _measure(fn, h, w, t, args)

    print(f"\n{'':28s}{'ours':>14s}{'naive':>14s}{'ours/naive':>12s}")
    table = []  # the printed rows as data (peak only where the device reports it): main's return value
    for key, unit in (("fwd_ms", "ms"), ("fwd_bwd_ms", "ms"), ("fwd_temp", "MiB"), ("fwd_bwd_temp", "MiB"),
                      ("peak", "MiB")):
        a, b = rows["ours"].get(key), rows["naive"].get(key)
        ratio = f"{a / b:.3f}" if isinstance(a, float) and isinstance(b, float) and b > 0 else "-"
        print(f"{key + ' (' + unit + ')':28s}{_fmt(a):>14s}{_fmt(b):>14s}{ratio:>12s}")
        if key != "peak" or a is not None or b is not None:
            table.append({"metric": key, "unit": unit, "ours": a, "naive": b,
                          "ours_over_naive": a / b if isinstance(a, float) and isinstance(b, float) and b > 0
                          else None})
    if lps["ours"] is not None and lps["naive"] is not None:
        print(f"\nmax |lp_ours - lp_naive| = {float(np.max(np.abs(lps['ours'] - lps['naive']))):.3e}")
    if "peak" in rows["ours"]:
        print("peak: device peak_bytes_in_use after each path (ours runs first, so naive's is a max of both)")
    diff = None if lps["ours"] is None or lps["naive"] is None else float(np.max(np.abs(lps["ours"] - lps["naive"])))
    return {"device": f"{device.platform} ({device.device_kind})", "N": N, "D": D, "V": V, "dtype": dtype.name,
            "impl": args.impl, "entropy": args.entropy, "iters": args.iters, "warmup": args.warmup, "rows": table,
            "max_abs_diff": diff}


def _measure(fn, h, w, t, args):
    """Times and compiled temp memory of forward and forward+backward; None entries where it fails."""

    def fwd(h, w, t):
        out = fn(h, w, t, return_entropy=args.entropy) if args.entropy else fn(h, w, t)
        return out

    def loss(h, w, t):
        out = fwd(h, w, t)
        return (out[0].sum() + 0.01 * out[1].sum()) if args.entropy else out.sum()

    row, lp = {}, None
    for key, f in (("fwd", fwd), ("fwd_bwd", jax.value_and_grad(loss, argnums=(0, 1)))):
        try:
            compiled = jax.jit(f).lower(h, w, t).compile()
            row[key + "_temp"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
            row[key + "_ms"] = median_ms(compiled, (h, w, t), args.warmup, args.iters)
            if key == "fwd":
                out = compiled(h, w, t)
                lp = np.asarray(out[0] if args.entropy else out, np.float32)
        except Exception as e:  # typically out of memory for the naive path at full size
            print(f"  {key}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        row["peak"] = stats["peak_bytes_in_use"] / 2**20
    return row, lp


def _fmt(x):
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
