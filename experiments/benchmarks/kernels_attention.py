"""Benchmark: causal attention TFLOP/s, forward and forward+backward, ours vs the XLA reference vs cuDNN.

Every row does the same work: bf16, causal, B*T = 16384 tokens, H query heads over H/4 kv heads (GQA),
head dim 64 and 128, T in 2048/4096/8192. "ours" is the Pallas kernel of this platform (pallas_tpu on TPU,
pallas_gpu on GPU); "cudnn" is `jax.nn.dot_product_attention(implementation="cudnn")` (GPU only). Times are
medians of several runs after warm-up; TFLOP/s count the causal half of 4*B*H*T*S*K for the forward and
3.5x that for forward+backward (FlashAttention-2's accounting). Ratios are against the XLA reference on
the same shapes. A benchmark, not a test: absolute numbers mean something only on a GPU or TPU.

    python experiments/benchmarks/kernels_attention.py                    # GPU / TPU, full table
    python experiments/benchmarks/kernels_attention.py --seq-lens 8192 --head-dims 128
    python experiments/benchmarks/kernels_attention.py --small            # CPU: xla only, tiny shapes
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from polmjax.bench import median_ms
from polmjax.kernels.attention.ops import attention


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="CPU-sized shapes (1024 tokens); times xla only")
    p.add_argument("--tokens", type=int, default=16384, help="B * T")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--width", type=int, default=2048, help="H * head dim")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    device = jax.devices()[0]
    if args.small:
        args.tokens, args.seq_lens, args.width, args.iters = 1024, [256, 512], 256, 5
    impls = {"tpu": ["pallas_tpu", "xla"], "gpu": ["pallas_gpu", "xla", "cudnn"]}.get(device.platform, ["xla"])
    print(f"{device.platform} ({device.device_kind}), {args.tokens} tokens, width {args.width}, bf16, causal, "
          f"GQA 4:1, median of {args.iters} after {args.warmup} warm-up")

    header = f"{'impl':>11s}{'K':>5s}{'T':>6s}{'B':>4s}{'fwd ms':>10s}{'TFLOP/s':>9s}{'x xla':>7s}"
    header += f"{'fwd+bwd ms':>12s}{'TFLOP/s':>9s}{'x xla':>7s}"
    print(header)
    table = []  # the printed rows as data: main's return value
    for K in args.head_dims:
        for T in args.seq_lens:
            B, H = max(args.tokens // T, 1), max(args.width // K, 4)
            flops = 4 * B * H * T * T * K * 0.5
            rows = {impl: _measure(impl, B, T, H, K, args) for impl in impls}
            base = rows.get("xla", {})
            for impl, row in rows.items():
                cells = [f"{impl:>11s}{K:>5d}{T:>6d}{B:>4d}"]
                table.append({"impl": impl, "K": K, "T": T, "B": B})
                for key, work in (("fwd", flops), ("fwd_bwd", 3.5 * flops)):
                    ms, ref = row.get(key), base.get(key)
                    tflops = f"{work / ms / 1e9:.3g}" if ms else "-"
                    ratio = f"{ref / ms:.2f}" if ms and ref else "-"
                    cells.append(f"{_fmt(ms):>{10 if key == 'fwd' else 12}s}{tflops:>9s}{ratio:>7s}")
                    table[-1].update({f"{key}_ms": ms, f"{key}_tflops": work / ms / 1e9 if ms else None,
                                      f"{key}_x_xla": ref / ms if ms and ref else None})
                print("".join(cells), flush=True)
    print("x xla: speed-up over the XLA reference (xla time / impl time); '-' where a path failed (e.g. OOM).")
    return {"device": f"{device.platform} ({device.device_kind})", "tokens": args.tokens, "width": args.width,
            "iters": args.iters, "warmup": args.warmup, "impls": impls, "rows": table}


def _measure(impl, B, T, H, K, args):
    """Median milliseconds of forward and forward+backward; a key is missing where the path fails."""
    G = max(H // 4, 1)
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, T, H, K), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, T, G, K), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, T, G, K), jnp.bfloat16)
    dout = jax.random.normal(keys[3], (B, T, H, K), jnp.bfloat16)

    def forward(q, k, v, dout):
        return attention(q, k, v, causal=True, impl=impl)

    def forward_backward(q, k, v, dout):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, causal=True, impl=impl), q, k, v)
        return out, vjp(dout)

    row = {}
    for key, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
        try:
            compiled = jax.jit(fn).lower(q, k, v, dout).compile()
            row[key] = median_ms(compiled, (q, k, v, dout), args.warmup, args.iters)
        except Exception as e:  # out of memory for the reference at long T, cuDNN unavailable, ...
            print(f"  {impl} K={K} T={T} {key}: failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    return row


def _fmt(x):
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
