"""Does experiment X fit on TPU slice Y (or GPU node Y)? Compile its train step ahead of time from a CPU host.

Builds the experiment's model config (from `model.init`, or the `config.json` of `model.path`, which must
be a local directory or already in the HF cache: no weights are read), places abstract parameters,
optimizer state and a batch with the experiment's shardings on the compile-only devices of the target
(`polmjax.aot`), and runs the real XLA:TPU (or XLA:GPU + Triton) compiler on the SFT step. Prints the
per-device memory the compiler reports and whether it fits.

    pip install "jax[tpu]"                                  # libtpu: the TPU compiler, usable on a CPU host
    pip install "jax[cuda12-local]" nvidia-cuda-nvcc-cu12   # XLA:GPU for GPU targets (h100, h200, a100)
    JAX_PLATFORMS=cpu python tpu/aot_compile.py experiments/sft/tiny.py --target v5e:2x2
    JAX_PLATFORMS=cpu python tpu/aot_compile.py experiments/sft/tiny.py --target h100:8
    JAX_PLATFORMS=cpu python tpu/aot_compile.py experiments/sft/qwen3_1p7b_tulu3.py --target v5p:4x4x2 \
        --set model.path=/path/to/Qwen3-1.7B
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment")
    parser.add_argument("--target", "--topology", dest="target", required=True,
                        help="a TPU slice (v5e:2x2, v5p:2x2x1, v6e:2x2) or GPUs (h100:8, h200:1, a100:4)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    report = compile_sft_step(args.experiment, args.target, args.overrides)
    for k, v in report.items():
        print(f"{k:>24}: {v}")
    return 0 if report["fits"] else 1


def compile_sft_step(experiment: str, target: str, overrides=()) -> dict:
    """Compile the experiment's SFT step for `target`; returns the compiler's memory numbers per device."""
    from polmjax import aot
    from polmjax import config as config_lib
    from polmjax import mesh as mesh_lib
    from polmjax import models
    from polmjax.models import lora as lora_lib
    from polmjax.train.optim import make_optimizer
    from polmjax.train.sft import jit_sft_step
    from polmjax.train.state import state_shardings_for

    exp = config_lib.load_experiment(experiment, list(overrides))
    devices = aot.devices(target)
    mesh = mesh_lib.make_mesh(exp.mesh.data, exp.mesh.fsdp, exp.mesh.tensor, devices=devices)
    cfg = _model_config(exp)
    shardings = models.param_shardings(cfg, mesh)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0))), shardings)
    trainable, frozen = lora_lib.split(params) if exp.lora else (params, {})
    optimizer, schedule = make_optimizer(exp.optim, exp.train.steps)
    state_sh = state_shardings_for(trainable, optimizer, mesh)
    abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  jax.eval_shape(lambda p: _init(p, optimizer), trainable), state_sh)
    B, T = exp.train.global_batch, exp.train.seq_len
    batch_sh = mesh_lib.named_sharding(mesh, ("act_batch", "act_len"), (B, T))
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.float32 if k == "loss_mask" else jnp.int32, sharding=batch_sh)
             for k in ("input_ids", "targets", "loss_mask", "positions", "segment_ids")}
    step = jit_sft_step(state_sh, jax.tree.map(lambda x: x.sharding, frozen), batch_sh, model_cfg=cfg,
                        optimizer=optimizer, schedule=schedule, reduction=exp.reduction,
                        grad_accum=exp.train.grad_accum, mesh=mesh)
    compiled = step.lower(abstract_state, frozen, batch).compile()
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    hbm = aot.memory_bytes(target)
    hlo = compiled.as_text()
    return {
        "target": f"{target} ({len(devices)} devices, {devices[0].device_kind})",
        "mesh": dict(mesh.shape),
        "model": f"{cfg.family} {cfg.num_params() / 1e9:.3f}B params, lora={exp.lora is not None}",
        "batch": f"{B} x {T}, grad_accum {exp.train.grad_accum}",
        "arguments_GiB": round(mem.argument_size_in_bytes / 2**30, 3),
        "temp_GiB": round(mem.temp_size_in_bytes / 2**30, 3),
        "total_per_device_GiB": round(total / 2**30, 3),
        "hbm_GiB": None if hbm is None else round(hbm / 2**30, 1),
        "fits": hbm is None or total <= hbm,
        "pallas_kernel_calls": hlo.count('custom_call_target="tpu_custom_call"')
        + hlo.count('custom_call_target="__gpu$xla.gpu.triton"'),
    }


def _init(params, optimizer):
    from polmjax.train.state import init_state

    return init_state(params, optimizer, 0)


def _model_config(exp):
    from polmjax import models
    from polmjax.models.hf import resolve_model_path

    src = exp.model
    if src.path:
        cfg = models.from_hf_config(resolve_model_path(src.path), param_dtype=src.dtype,
                                    compute_dtype=src.compute_dtype, **src.execution)
    else:
        init = src.init if src.init.vocab_size else src.init.replace(vocab_size=512)
        cfg = init.replace(param_dtype=src.dtype, compute_dtype=src.compute_dtype, **src.execution)
    return cfg.replace(lora=exp.lora)


if __name__ == "__main__":
    sys.exit(main())
