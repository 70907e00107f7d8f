"""Decode roofline without hardware: bytes one KV-cache decode step moves on a TPU, against the physical minimum.

A decode step is memory-bound: it must read every weight and the whole KV cache once and write the new
token's keys and values; anything more (a copy of the cache, a relayout of the weights) is waste. This
compiles one step of a Qwen3-0.6B-shaped model (bf16, batch 64, cache length 2048) ahead of time for a TPU
v5e chip from this host (libtpu's compiler, nothing runs) and prints XLA's "bytes accessed" for the step
against that minimum, and the step time the chip's HBM bandwidth then allows.

Rows: the weights in the layout XLA picks for decode (inside `generate` that relayout is loop-invariant,
done once before the decode loop, and the cache never leaves the loop) and in the default row-major layout
(a step called from Python, `model(ids, cache=...)`, relayouts them every call). Unrolled layers: XLA's cost
analysis counts a loop body once, so a layer scan's bytes cannot be read off it (tests/test_decode_cache.py
checks the scan's program for cache copies instead).

    .venv/bin/python experiments/benchmarks/decode_roofline.py
    .venv/bin/python experiments/benchmarks/decode_roofline.py --batch 8 --cache-len 4096 --layers 4

Needs libtpu (`pip install "jax[tpu]"`). Compiling takes about a minute a row on a laptop-class CPU.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices; nothing runs on a TPU
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental.layout import Format, Layout  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from polmjax import aot, models  # noqa: E402
from polmjax import mesh as mesh_lib  # noqa: E402
from polmjax.models.decoder import (  # noqa: E402
    CACHE_AXES,
    KVCache,
    flatten,
    forward_hidden,
    logits_from_hidden,
    param_shardings,
    unflatten,
)

HBM_BYTES_PER_S = {"v5e": 819e9, "v5p": 2765e9, "v6e": 1640e9, "v4": 1200e9}


def qwen3_0_6b(layers: int = 28, scan_layers: bool = False) -> models.ModelConfig:
    """Qwen3-0.6B's shapes (its config.json), bf16 weights and compute."""
    return models.ModelConfig(
        family="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=layers,
        num_heads=16, num_kv_heads=8, head_dim=128, qk_norm=True, tie_embeddings=True,
        rope=models.RopeConfig(theta=1e6), param_dtype="bfloat16", compute_dtype="bfloat16",
        scan_layers=scan_layers)


def tpu_devices(target: str) -> list:
    """Compile-only devices of a TPU slice; "v5e:1x1" is one chip (libtpu needs its host bounds spelt out)."""
    if not target.endswith(":1x1"):
        return aot.devices(target)
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=target,
                                                 chips_per_host_bounds=(1, 1, 1)).devices)
    except Exception as err:
        raise RuntimeError(f"cannot build TPU topology {target!r} (install libtpu: pip install 'jax[tpu]'): "
                           f"{err}") from err


def compile_decode_step(cfg: models.ModelConfig, batch: int, cache_len: int, target: str = "v5e:1x1",
                        weight_layout: str = "auto"):
    """One decode step (cache donated) compiled for `target`, batch split over its chips; with the abstract
    parameters and cache it was compiled for. weight_layout: "auto" (XLA chooses) or "default" (row-major)."""
    devices = tpu_devices(target)
    mesh = Mesh(np.array(devices).reshape(len(devices), 1, 1), ("data", "fsdp", "tensor"))
    shardings = flatten(param_shardings(cfg, mesh))
    params = unflatten({name: jax.ShapeDtypeStruct(spec.shape, jnp.dtype(cfg.param_dtype), sharding=shardings[name])
                        for name, spec in models.param_specs(cfg).items()})
    cache = jax.eval_shape(lambda: KVCache.create(cfg, batch, cache_len))

    def sds(x, axes):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=mesh_lib.named_sharding(mesh, axes, x.shape))

    cache = KVCache(*(jax.tree.map(lambda c: sds(c, CACHE_AXES[-c.ndim:]), kv) for kv in (cache.k, cache.v)),
                    sds(cache.segment_ids, ("act_batch", "cache_len")),
                    jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec())))
    tok_B1 = sds(jax.ShapeDtypeStruct((batch, 1), jnp.int32), ("act_batch", "act_len"))

    def step(params, tok_B1, cache):
        hidden, cache = forward_hidden(cfg, params, tok_B1, None, None, cache, mesh=mesh)
        return jnp.argmax(logits_from_hidden(cfg, params, hidden, mesh)[:, -1], axis=-1), cache

    in_params = jax.tree.map(lambda p: Format(Layout.AUTO, p.sharding) if weight_layout == "auto" else p.sharding,
                             params)
    in_cache = jax.tree.map(lambda c: c.sharding, cache)
    compiled = jax.jit(step, donate_argnums=2, in_shardings=(in_params, tok_B1.sharding, in_cache),
                       out_shardings=(None, in_cache)).lower(params, tok_B1, cache).compile()
    return compiled, params, cache


def decode_step_bytes(cfg: models.ModelConfig, batch: int, cache_len: int, target: str = "v5e:1x1",
                      weight_layout: str = "auto") -> dict:
    """Bytes accessed by one compiled decode step per chip, the physical minimum, their ratio, HBM used.

    Unrolled layers only: XLA's cost analysis counts a loop body once, so a layer scan would be undercounted.
    """
    if cfg.scan_layers:
        raise ValueError("decode_step_bytes: cost analysis counts a scan's body once; pass an unrolled config")
    t0 = time.perf_counter()
    compiled, params, cache = compile_decode_step(cfg, batch, cache_len, target, weight_layout)
    seconds = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n = cache.index.sharding.mesh.size
    weights = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(params)) * jnp.dtype(cfg.param_dtype).itemsize
    cache_bytes = sum(int(np.prod(c.shape)) * c.dtype.itemsize for c in jax.tree.leaves((cache.k, cache.v)))
    new_entries = cache_bytes // cache_len
    minimum = weights + (cache_bytes + new_entries) / n  # each chip reads all weights and its share of the cache
    accessed = float(cost["bytes accessed"])
    mem = compiled.memory_analysis()
    return dict(bytes=accessed, minimum=minimum, ratio=accessed / minimum, weights=weights, cache=cache_bytes,
                new=new_entries, devices=n, compile_s=seconds,
                hbm_used=mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                + mem.temp_size_in_bytes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="v5e:1x1", help="TPU slice, e.g. v5e:1x1 (one chip) or v5e:2x2 (batch over 4)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cache-len", type=int, default=2048)
    p.add_argument("--layers", type=int, default=28)
    args = p.parse_args(argv)
    cfg = qwen3_0_6b(args.layers)
    generation = args.target.split(":")[0]
    bandwidth = HBM_BYTES_PER_S[generation]
    rows = [(layout, decode_step_bytes(cfg, args.batch, args.cache_len, args.target, layout))
            for layout in ("auto", "default")]
    r = rows[0][1]
    gb = 1e9
    print(f"Decode step roofline: Qwen3-0.6B shapes ({args.layers} layers, {cfg.num_params() / 1e6:.0f}M params, "
          f"bf16), "
          f"batch {args.batch}, cache length {args.cache_len}, {args.target} ({r['devices']} chip(s), "
          f"{bandwidth / gb:.0f} GB/s HBM each), compiled ahead of time with jax {jax.__version__}\n")
    print(f"physical minimum per chip = weights {r['weights'] / gb:.3f} GB + KV cache read once "
          f"{r['cache'] / r['devices'] / gb:.3f} GB + new entries {r['new'] / r['devices'] / 2**20:.1f} MiB "
          f"= {r['minimum'] / gb:.3f} GB\n")
    print("| weights' layout | bytes accessed / step (GB) | minimum (GB) | ratio | step at HBM roofline | "
          "decode tokens/s | HBM used | compile |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for layout, r in rows:
        step_s = r["bytes"] / bandwidth
        name = {"auto": "XLA's choice (as in `generate`)", "default": "row-major (`model(ids, cache=)`)"}[layout]
        print(f"| {name} | {r['bytes'] / gb:.3f} | {r['minimum'] / gb:.3f} | {r['ratio']:.3f}x | "
              f"{step_s * 1e3:.2f} ms | {args.batch / step_s:,.0f} | {r['hbm_used'] / 2**30:.2f} GiB | "
              f"{r['compile_s']:.0f} s |")


if __name__ == "__main__":
    main()
