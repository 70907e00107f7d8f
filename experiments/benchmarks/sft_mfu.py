"""SFT step throughput and MFU of a Qwen3-0.6B-shaped model on this machine's accelerator, per kernel choice.

The same random model, packed batch and AdamW step (`jit_sft_step`, bf16 compute over fp32 master
weights, remat `dots_no_batch`) timed with each (attention_impl, logprob_impl) pair, so the rows show what
the Pallas kernels buy end to end. On a GPU, cuDNN attention is a row too (the packed documents reach
it as a dense [B, 1, T, T] mask). MFU = analytic training FLOPs (`polmjax.logging.train_flops_per_token`)
x tokens/s / the device's peak bf16 FLOP/s. A benchmark: meaningful on a GPU or TPU.

    python experiments/benchmarks/sft_mfu.py                       # GPU / TPU: batch 8 x 4096
    python experiments/benchmarks/sft_mfu.py --small               # CPU smoke run: 2 layers, 4 x 256
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from polmjax import mesh as mesh_lib
from polmjax import models
from polmjax.logging import device_peak_flops, train_flops_per_token
from polmjax.train.optim import OptimConfig, make_optimizer
from polmjax.train.sft import BATCH_KEYS, jit_sft_step
from polmjax.train.state import init_state_sharded, state_shardings

# Qwen3-0.6B's shape (hidden 1024, 28 layers, 16 q / 8 kv heads of 128, MLP 3072, vocab 151936, tied).
QWEN3_0P6B = dict(family="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
                  num_heads=16, num_kv_heads=8, head_dim=128, qk_norm=True, tie_embeddings=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="CPU-sized model and batch")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--docs-per-row", type=int, default=4, help="packed documents per row (segment ids)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pairs", nargs="+", default=None, metavar="ATTENTION:LOGPROBS",
                   help="rows to time, e.g. xla:xla pallas_gpu:pallas_gpu (default: every pair for this platform)")
    args = p.parse_args(argv)
    device = jax.devices()[0]
    platform = device.platform
    shape = dict(QWEN3_0P6B)
    if args.small:
        shape.update(num_layers=2, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2,
                     head_dim=32, vocab_size=4096)
        args.batch, args.seq_len, args.steps = 4, 256, 3
    pallas = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform)
    rows = [("xla", "xla")] + ([(pallas, pallas), ("xla", pallas), (pallas, "xla")] if pallas else [])
    if platform == "gpu":
        rows.append(("cudnn", pallas))
    if args.pairs:
        rows = [tuple(pair.split(":")) for pair in args.pairs]
    peak = device_peak_flops(device.device_kind)
    B, T = args.batch, args.seq_len
    batch = _packed_batch(B, T, args.docs_per_row, shape["vocab_size"])
    print(f"{platform} ({device.device_kind}), {B} x {T} tokens packed {args.docs_per_row} docs/row, "
          f"median of {args.steps} steps after {args.warmup}")
    print(f"{'attention':>11s} {'logprobs':>11s} {'s/step':>8s} {'tokens/s':>10s} {'MFU':>6s} {'loss':>8s}")
    for attn, lp in rows:
        cfg = models.ModelConfig(**shape, param_dtype="float32", compute_dtype="bfloat16", remat="dots_no_batch",
                                 scan_layers=True, attention_impl=attn, logprob_impl=lp)
        try:
            seconds, loss = _time_step(cfg, batch, args)
        except Exception as err:  # e.g. cuDNN rejects a shape: report the row, keep going
            print(f"{attn:>11s} {lp:>11s}  failed: {type(err).__name__}: {str(err)[:120]}")
            continue
        tokens_per_s = B * T / seconds
        mfu = f"{train_flops_per_token(cfg, T) * tokens_per_s / peak:6.1%}" if peak else "     -"
        print(f"{attn:>11s} {lp:>11s} {seconds:8.4f} {tokens_per_s:10,.0f} {mfu} {loss:8.4f}", flush=True)


def _packed_batch(B, T, docs, vocab):
    """Random tokens in `docs` documents per row: positions restart and segment ids change at each one."""
    rs = np.random.RandomState(0)
    tokens = rs.randint(0, vocab, (B, T + 1)).astype(np.int32)
    starts = np.sort(rs.choice(np.arange(1, T), size=(B, docs - 1)), axis=1) if docs > 1 else np.zeros((B, 0), int)
    segment_ids = np.stack([np.searchsorted(s, np.arange(T), side="right") + 1 for s in starts]).astype(np.int32)
    first = np.concatenate([np.zeros((B, 1), int), starts], axis=1)
    positions = np.arange(T)[None, :] - np.take_along_axis(first, segment_ids - 1, axis=1)
    loss_mask = np.ones((B, T), np.float32)
    loss_mask[:, :-1] *= segment_ids[:, 1:] == segment_ids[:, :-1]  # no target across a document boundary
    return {"input_ids": tokens[:, :T], "targets": tokens[:, 1:], "loss_mask": loss_mask,
            "positions": positions.astype(np.int32), "segment_ids": segment_ids}


def _time_step(cfg, batch, args):
    mesh = mesh_lib.make_mesh(1, -1, 1)
    optimizer, schedule = make_optimizer(OptimConfig(lr=1e-5, schedule="constant", clip_norm=1.0),
                                         args.warmup + args.steps)
    state = init_state_sharded(models.create(cfg, seed=0, mesh=mesh).params(), optimizer, 0, mesh)
    B, T = batch["input_ids"].shape
    batch_sharding = mesh_lib.named_sharding(mesh, ("act_batch", "act_len"), (B, T))
    step = jit_sft_step(state_shardings(state), {}, batch_sharding, model_cfg=cfg, optimizer=optimizer,
                        schedule=schedule, mesh=mesh)
    on_device = {k: jax.device_put(batch[k], batch_sharding) for k in BATCH_KEYS}
    times, loss = [], None
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, {}, on_device)
        loss = float(jax.block_until_ready(metrics)["loss"])
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return float(np.median(times)), loss


if __name__ == "__main__":
    main()
