"""Kernel benchmarks in one run: attention TFLOP/s (ours vs XLA vs cuDNN) and token_logprobs time and
memory (ours vs naive log_softmax(h @ W)). The GPU check of issue 4; prints both tables.

    python experiments/benchmarks/kernels.py            # GPU or TPU: the full shapes of the issue
    python experiments/benchmarks/kernels.py --small    # CPU smoke run
    python experiments/benchmarks/kernels.py --small --json kernels.json   # also both tables as JSON

On the lent H200 (device tool): `bash experiments/benchmarks/gpu_check.sh` also runs the kernel tests.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernels_attention  # noqa: E402
import kernels_logprobs  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="CPU-sized shapes for both benchmarks")
    p.add_argument("--json", default="", help="also write both tables' rows here (JSON)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    small = ["--small"] if args.small else []
    print("=" * 30, "attention", "=" * 30, flush=True)
    attention = kernels_attention.main(small)
    print("=" * 30, "token_logprobs (N=16384, D=2048, V=131072, bf16)", "=" * 30, flush=True)
    logprobs = kernels_logprobs.main(small)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "kernels", "settings": {"small": args.small}, "attention": attention,
                       "logprobs": logprobs}, f, indent=1)


if __name__ == "__main__":
    main()
