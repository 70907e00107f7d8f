"""Does experiment X fit on TPU slice Y (or GPU node Y)? Compile its train step ahead of time from a CPU host.

Works for an experiment of any algorithm (SFT, DPO family, reward model, ...: the one whose experiment
class it is, `polmjax.cli.ALGORITHMS`). Builds the model config (from `model.init`, or the `config.json`
of `model.path`, which must be a local directory or already in the HF cache: no weights are read),
places abstract parameters, optimizer state, the step's frozen argument (LoRA base, DPO's reference
model) and the algorithm's batch with the run's shardings on the compile-only devices of the target
(`polmjax.aot`, `polmjax.train.abstract`), and runs the real XLA:TPU (or XLA:GPU + Triton) compiler on
`algorithm.jit_step`. Prints the per-device memory the compiler reports and whether it fits.

An RL experiment (GRPO family: an algorithm with a rollout) runs more programs than its update, and the
train state and frozen inputs stay resident through all of them: the sampler's prefill and decode
(`polmjax.rl.sampler`, as `polmjax.train.grpo.Rollout` calls them: prompts_per_step prompts at the
longest prompt bucket, num_generations samples of max_completion_len tokens each, the experiment's
cache dtype) and, off-policy or with a KL term, the log-prob forward over the whole rollout. Each is
compiled too; its peak is what stays resident (state + frozen inputs) plus its own other inputs,
temporaries and outputs, and the experiment fits when the largest of the step and these peaks does.

    pip install "jax[tpu]"                                  # libtpu: the TPU compiler, usable on a CPU host
    pip install "jax[cuda12-local]" nvidia-cuda-nvcc-cu12   # XLA:GPU for GPU targets (h100, h200, a100)
    JAX_PLATFORMS=cpu python tpu/aot_compile.py experiments/sft/tiny.py --target v5e:2x2
    JAX_PLATFORMS=cpu python tpu/aot_compile.py experiments/sft/tiny.py --target h100:8
    JAX_PLATFORMS=cpu python tpu/aot_compile.py experiments/sft/qwen3_1p7b_tulu3.py --target v5p:4x4x2 \
        --set model.path=/path/to/Qwen3-1.7B
    JAX_PLATFORMS=cpu python tpu/aot_compile.py experiments/dpo/qwen3_1p7b_ultrafeedback.py --target v5p:2x2x1 \
        --set model.path=/path/to/Qwen3-1.7B   # a directory with only its config.json is enough
    JAX_PLATFORMS=cpu python tpu/aot_compile.py experiments/grpo/qwen3_1p7b_gsm8k.py --target v5p:2x2x1 \
        --set model.path=/path/to/Qwen3-1.7B   # the step, the sampler and the rollout's log-prob forward
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment")
    parser.add_argument("--target", "--topology", dest="target", required=True,
                        help="a TPU slice (v5e:2x2, v5p:2x2x1, v6e:2x2) or GPUs (h100:8, h200:1, a100:4)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        report = compile_step(args.experiment, args.target, args.overrides)
    except DoesNotFit as e:
        print(f"does not fit on {args.target}: {e}")
        return 1
    for k, v in report.items():
        print(f"{k:>24}: {v}")
    return 0 if report["fits"] else 1


class DoesNotFit(Exception):
    """The compiler ran out of device memory for one of the experiment's programs (named in the message)."""


def compile_step(experiment: str, target: str, overrides=()) -> dict:
    """Compile the train step of the experiment's algorithm (SFT, DPO, ... by its experiment class) for
    `target`; returns the compiler's memory numbers per device."""
    from polmjax import aot
    from polmjax import config as config_lib
    from polmjax import mesh as mesh_lib
    from polmjax.train.abstract import abstract_step

    exp = config_lib.load_experiment(experiment, list(overrides))
    algorithm = algorithm_of(exp)
    devices = aot.devices(target)
    mesh = mesh_lib.make_mesh(exp.mesh.data, exp.mesh.fsdp, exp.mesh.tensor, devices=devices)
    cfg = _model_config(exp)
    step, (state, frozen, batch) = abstract_step(exp, algorithm, cfg, mesh)
    start = time.perf_counter()
    compiled = _compile(step.lower(state, frozen, batch), "the train step")
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    hbm = aot.memory_bytes(target)
    hlo = compiled.as_text()
    B, T = exp.train.global_batch, exp.train.seq_len
    report = {
        "algorithm": algorithm.name + _variant(exp),
        "target": f"{target} ({len(devices)} devices, {devices[0].device_kind})",
        "mesh": dict(mesh.shape),
        "model": f"{cfg.family} {cfg.num_params() / 1e9:.3f}B params, lora={exp.lora is not None}",
        "batch": f"{B} x {T}, grad_accum {exp.train.grad_accum}"
                 + (f", mini_batches {exp.mini_batches}" if hasattr(exp, "mini_batches") else ""),
        "frozen_GiB": round(_bytes_per_device(frozen) / 2**30, 3),
        "arguments_GiB": round(mem.argument_size_in_bytes / 2**30, 3),
        "temp_GiB": round(mem.temp_size_in_bytes / 2**30, 3),
        "total_per_device_GiB": round(total / 2**30, 3),
        "hbm_GiB": None if hbm is None else round(hbm / 2**30, 1),
        "fits": hbm is None or total <= hbm,
        "compile_s": round(compile_s, 1),
        "bytes": {"arguments": mem.argument_size_in_bytes, "temp": mem.temp_size_in_bytes, "total": total,
                  "frozen": _bytes_per_device(frozen)},
        "pallas_kernel_calls": hlo.count('custom_call_target="tpu_custom_call"')
        + hlo.count('custom_call_target="__gpu$xla.gpu.triton"'),
    }
    if algorithm.rollout is not None:
        # resident through the rollout: the train state and the frozen inputs (the step's arguments but its batch)
        resident = mem.argument_size_in_bytes - _bytes_per_device(batch)
        programs = compile_rollout(exp, cfg, mesh, state, frozen)
        peak = max(total, *(resident + p["extra"] for p in programs.values()))
        report.update(_rollout_report(exp, programs, resident, peak, hbm))
        report["bytes"].update({"resident": resident, "peak": peak,
                                **{f"{name}_extra": p["extra"] for name, p in programs.items()}})
    return report


def compile_rollout(exp, cfg, mesh, state, frozen) -> dict:
    """Compile the programs of an RL step besides the update, with the inputs `Rollout` gives them:

    prefill  `sampler.prefill_prompts`: prompts_per_step left-padded prompts of bucket(max_prompt_len)
             tokens (host arrays: replicated) into a prompt-sized cache;
    decode   `sampler.decode` of that: num_generations rows per prompt, max_completion_len new tokens;
    old_logps / ref_logps  `grpo.policy_logprobs` over the whole rollout (global_batch x seq_len), when
             the step is off-policy (iterations or mini_batches > 1) / has a KL term (beta > 0).

    The parameters are the live ones (`combine_params(state.params, base)`, or the reference), already
    resident. Returns {name: {"extra": bytes per device beyond the resident state and frozen inputs (the
    program's other inputs, temporaries and outputs), "memory": memory_analysis(), "compile_s": ...}}.
    Stop sequences (a [rows, longest] id table) are left out: they need the tokenizer.
    """
    import functools

    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from polmjax.models.lora import has_adapters
    from polmjax.rl import sampler as sampler_lib
    from polmjax.train import grpo
    from polmjax.train.abstract import abstract_batch
    from polmjax.train.state import combine_params

    params = combine_params(state.params, frozen.get("base", {}))
    replicated = NamedSharding(mesh, PartitionSpec())
    B, P = exp.prompts_per_step, sampler_lib.bucket(exp.max_prompt_len)
    prompts = jax.ShapeDtypeStruct((B, P), np.int32, sharding=replicated)
    cache_dtype = jnp.dtype(exp.cache_dtype) if exp.cache_dtype else None
    programs = {}

    start = time.perf_counter()
    prefill = _compile(sampler_lib.prefill_prompts.lower(cfg, params, prompts, prompts, mesh=mesh,
                                                         cache_dtype=cache_dtype), "the sampler's prefill")
    programs["prefill"] = _program(prefill, 2 * _bytes_per_device(prompts), start)

    start = time.perf_counter()
    logits, cache, pos = prefill.out_info
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=replicated)
    sampled = exp.temperature > 0
    decode = _compile(sampler_lib.decode.lower(
        cfg, params, logits, cache, pos, key, n=exp.num_generations, max_new_tokens=exp.max_completion_len,
        eos=() if exp.ignore_eos else (0,), stops=(), temperature=float(exp.temperature),
        top_k=exp.top_k if sampled else None, top_p=exp.top_p if sampled else None,
        min_p=exp.min_p if sampled else None, pad_id=0, mesh=mesh), "the sampler's decode")
    programs["decode"] = _program(decode, prefill.memory_analysis().output_size_in_bytes, start)

    forwards = {"old_logps": (params, cfg)} if not exp.on_policy else {}
    if exp.beta:
        ref = frozen["reference"]
        forwards["ref_logps"] = (ref, cfg if has_adapters(ref) else cfg.replace(lora=None))
    if forwards:
        rollout = abstract_batch(("input_ids", "targets", "positions", "segment_ids"), exp.train.global_batch,
                                 exp.train.seq_len, mesh)
    for name, (p, model_cfg) in forwards.items():
        start = time.perf_counter()
        fn = jax.jit(functools.partial(grpo.policy_logprobs, model_cfg, temperature=exp.temperature, mesh=mesh))
        compiled = _compile(fn.lower(p, rollout), f"the rollout's {name} forward")
        programs[name] = _program(compiled, _bytes_per_device(rollout), start)
    return programs


def _compile(lowered, what: str):
    """`lowered.compile()`, an out-of-memory error raised as DoesNotFit naming `what` ran out."""
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise DoesNotFit(f"{what}: {e}") from None


def _program(compiled, other_inputs: int, start: float) -> dict:
    """A rollout program's bytes beyond what is resident: its non-parameter inputs (`other_inputs`),
    temporaries and outputs (nothing is donated)."""
    mem = compiled.memory_analysis()
    extra = other_inputs + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    return {"extra": extra, "memory": mem, "compile_s": time.perf_counter() - start,
            "pallas_kernel_calls": compiled.as_text().count('custom_call_target="tpu_custom_call"')}


def _rollout_report(exp, programs: dict, resident: int, peak: int, hbm: int | None) -> dict:
    from polmjax.rl.sampler import bucket

    gib = lambda b: round(b / 2**30, 3)  # noqa: E731
    B, P = exp.prompts_per_step, bucket(exp.max_prompt_len)
    decode = programs["decode"]
    out = {
        "sampler": f"{B} prompts x {P} tokens -> {exp.num_generations} x {exp.max_completion_len} new tokens "
                   f"({B * exp.num_generations} rows), cache {exp.cache_dtype or 'compute dtype'}",
        "resident_GiB": gib(resident),
        "sampler_temp_GiB": gib(decode["memory"].temp_size_in_bytes),
        "sampler_peak_GiB": gib(resident + max(programs["prefill"]["extra"], decode["extra"])),
    }
    for name in ("old_logps", "ref_logps"):
        if name in programs:
            out[f"{name}_peak_GiB"] = gib(resident + programs[name]["extra"])
    out.update({"peak_per_device_GiB": gib(peak), "fits": hbm is None or peak <= hbm,
                "rollout_compile_s": round(sum(p["compile_s"] for p in programs.values()), 1)})
    return out


compile_sft_step = compile_step  # the name the SFT-only version had


def algorithm_of(exp):
    """The `polmjax.train.run.Algorithm` of an experiment, by its class (`polmjax.cli.ALGORITHMS`)."""
    import importlib

    from polmjax.cli import ALGORITHMS

    for module, cls_name, _ in ALGORITHMS.values():
        if type(exp).__module__ == module and type(exp).__name__ == cls_name:
            return importlib.import_module(module).ALGORITHM
    known = ", ".join(f"{module}.{cls}" for module, cls, _ in ALGORITHMS.values())
    raise ValueError(f"{type(exp).__module__}.{type(exp).__name__}: not an experiment of a known algorithm ({known})")


def _variant(exp) -> str:
    """The DPO family's loss and reference, which change what the step holds and computes."""
    if not hasattr(exp, "reference"):
        return ""
    return f" (loss {exp.loss}, reference {exp.reference})"


def _bytes_per_device(tree) -> int:
    """Bytes of the frozen inputs (LoRA base, reference model) one device holds."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard)) * x.dtype.itemsize
    return total


def _model_config(exp):
    from polmjax import models
    from polmjax.models.hf import resolve_model_path

    src = exp.model
    if src.path:
        cfg = models.from_hf_config(resolve_model_path(src.path), param_dtype=src.dtype,
                                    compute_dtype=src.compute_dtype, **src.execution)
    else:
        init = src.init if src.init.vocab_size else src.init.replace(vocab_size=512)  # ~ the toy tokenizer
        cfg = init.replace(param_dtype=src.dtype, compute_dtype=src.compute_dtype, **src.execution)
    return cfg.replace(lora=exp.lora, num_labels=src.num_labels or cfg.num_labels)


if __name__ == "__main__":
    sys.exit(main())
