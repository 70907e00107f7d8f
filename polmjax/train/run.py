"""The algorithm-independent run: experiment config -> trained model in run_dir.

    result = run(exp, sft.ALGORITHM)          # what `polmjax sft EXPERIMENT.py` does

Everything here is shared by every algorithm: the run-directory contract, mesh, tokenizer, model
(incl. LoRA), train state, data pipeline, logger, checkpointer, the loop, held-out evaluation, export
and samples. An algorithm (`polmjax/train/<algo>.py`) contributes an `Algorithm`: its pipeline, its
pure step and its evaluation; its experiment dataclass has the fields `model`, `data`, `train`,
`optim`, `mesh`, `lora` that this module reads. `export_run` works for a run of any algorithm.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from polmjax import config as config_lib
from polmjax import mesh as mesh_lib
from polmjax.checkpoint import CheckpointError, Checkpointer
from polmjax.data import DataConfig, stop_token_ids, toy
from polmjax.generate import generate, left_pad
from polmjax.logging import MetricsLogger, device_peak_flops, train_flops_per_token
from polmjax.mesh import initialize_distributed, make_mesh
from polmjax.models import lora as lora_lib
from polmjax.models.config import LoraConfig, ModelConfig
from polmjax.models.decoder import Decoder, create
from polmjax.models.hf import from_pretrained, resolve_model_path, save_pretrained, write_generation_config
from polmjax.train import rundir
from polmjax.train.config import ModelSource
from polmjax.train.loop import LoopResult, train_loop
from polmjax.train.optim import make_optimizer
from polmjax.train.state import combine_params, init_state_sharded, state_shardings

log = logging.getLogger("polmjax")


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """What one algorithm adds to the shared run.

    name: the CLI command and the log name ("sft").
    batch_keys: the [B, T] host arrays of a batch (sharded over ("act_batch", "act_len")), or
      batch_keys(exp) -> them when the experiment decides.
    pipeline(exp, data_cfg, tokenizer, split): a resumable source of host batches (`iter()` gives an
      iterator with get_state/set_state), split "train" or "eval".
    jit_step(exp, model_cfg, optimizer, schedule, mesh, state_shardings, frozen_shardings, batch_shardings):
      the pure step jitted once: step(state, frozen, batch) -> (state, metrics).
    eval_sums(exp, model_cfg, mesh): fn(params, frozen, batch) -> dict of sums over one batch;
    eval_metrics(summed dict) -> the logged held-out metrics.
    toy_data: {"toy:<kind>": (format, writer(path, n=, seed=, format=))} for offline datasets.
    frozen(exp, trainable, base): the `frozen` argument of the step and eval, built once from the
      initial trainable parameters and the frozen LoRA base (default: the base itself). DPO puts its
      reference model here.
    rollout(exp, model_cfg, tokenizer, mesh, step_fn, frozen, batches): for RL, an object whose
      `step(state, host_batch) -> (state, metrics)` replaces the jitted step in the loop: it generates
      its training batch from the current state (and may draw more from `batches`) and calls `step_fn`;
      `evaluate(params, eval_pipeline) -> metrics` replaces eval_sums; `close()` at the end.
    updates_per_step(exp): optimizer updates per loop step (RL: iterations x mini-batches), for the
      learning-rate schedule's horizon (default 1).
    """

    name: str
    batch_keys: tuple[str, ...] | Callable
    pipeline: Callable
    jit_step: Callable
    eval_sums: Callable
    eval_metrics: Callable
    toy_data: dict = dataclasses.field(default_factory=dict)
    frozen: Callable | None = None
    rollout: Callable | None = None
    updates_per_step: Callable | None = None


def run(exp: Any, algorithm: Algorithm, *, allow_config_change: bool = False) -> LoopResult:
    """Train, checkpointing and resuming in exp.train.run_dir; export and print samples at the end.

    A run directory that already holds a run is continued only with a compatible config (see
    `polmjax.train.rundir`); `allow_config_change` overrides that check.
    """
    initialize_distributed()
    exp = rundir.prepare(exp, allow_config_change=allow_config_change)
    tc = exp.train
    is_writer = jax.process_index() == 0
    mesh = make_mesh(exp.mesh.data, exp.mesh.fsdp, exp.mesh.tensor)
    tokenizer = load_tokenizer(exp.model, tc.run_dir)
    data_cfg = resolve_toy_data(exp.data, tc.run_dir, tc.seed, algorithm.toy_data)
    updates = algorithm.updates_per_step(exp) if algorithm.updates_per_step else 1
    cfg, state, frozen, optimizer, schedule = initial_state(exp, tokenizer, mesh, updates_per_step=updates)
    step_frozen = algorithm.frozen(exp, state.params, frozen) if algorithm.frozen else frozen

    pipe = algorithm.pipeline(exp, data_cfg, tokenizer, "train")
    batch_sharding = mesh_lib.named_sharding(mesh, ("act_batch", "act_len"), (tc.global_batch, tc.seq_len))
    keys = algorithm.batch_keys(exp) if callable(algorithm.batch_keys) else algorithm.batch_keys
    batch_shardings = {k: batch_sharding for k in keys}
    frozen_shardings = jax.tree.map(lambda x: x.sharding, step_frozen)
    step_fn = algorithm.jit_step(exp, cfg, optimizer, schedule, mesh, state_shardings(state), frozen_shardings,
                                 batch_shardings)
    batches = iter(pipe)

    def put_batch(batch):
        return {k: jax.make_array_from_process_local_data(batch_sharding, batch[k]) for k in keys}

    def step(state, batch):
        return step_fn(state, step_frozen, batch)

    rollout = None
    if algorithm.rollout is not None:  # RL: the step generates its own batch from the current state
        rollout = algorithm.rollout(exp, cfg, tokenizer, mesh, step_fn, step_frozen, batches)
        step, put_batch = rollout.step, _host_batch

    eval_fn = None
    if tc.eval_every:
        eval_pipe = algorithm.pipeline(exp, data_cfg, tokenizer, "eval")
        if rollout is not None:
            def eval_fn(state):
                return rollout.evaluate(state.params, eval_pipe)
        else:
            eval_sums = jax.jit(algorithm.eval_sums(exp, cfg, mesh))

            def eval_fn(state):
                return algorithm.eval_metrics(evaluate(state.params, step_frozen, eval_pipe, put_batch,
                                                       tc.eval_batches, eval_sums))

    logger = MetricsLogger(tc.run_dir, total_steps=tc.steps, use_tensorboard=tc.tensorboard,
                           wandb_project=tc.wandb_project, config=config_lib.to_dict(exp), is_writer=is_writer)
    checkpointer = Checkpointer(os.path.abspath(os.path.join(tc.run_dir, "checkpoints")),
                                save_every=tc.save_every, keep=tc.keep, async_save=tc.async_save)
    try:
        tokens = 0 if rollout is not None else tc.global_batch * tc.seq_len  # RL logs its own rates
        result = train_loop(
            state=state, step_fn=step, batches=batches, put_batch=put_batch,
            total_steps=tc.steps, checkpointer=checkpointer, logger=logger, log_every=tc.log_every,
            eval_every=tc.eval_every, eval_fn=eval_fn, tokens_per_step=tokens,
            flops_per_step=train_flops_per_token(cfg, tc.seq_len) * tokens,
            peak_flops=device_peak_flops(jax.devices()[0].device_kind),
        )
        if not result.preempted:
            final = combine_params(result.state.params, frozen)
            final_model = Decoder(cfg, final, mesh=mesh, hf_config=hf_config_of(exp.model, cfg))
            if tc.export_hf:
                export(final_model, tokenizer, tc.run_dir, exp.model.path)
            if tc.sample_prompts:
                show_samples(final_model, tokenizer, tc.sample_prompts, tc.max_new_tokens, tc.run_dir, is_writer)
        return result
    finally:
        if rollout is not None:
            rollout.close()
        checkpointer.close()
        logger.close()


def _host_batch(batch):
    return batch


def evaluate(params, frozen, pipe, put_batch, max_batches: int, eval_sums) -> dict:
    """The algorithm's per-batch sums added up over the first `max_batches` batches of the held-out split."""
    total: dict = {}
    for i, batch in enumerate(iter(pipe)):
        if i == max_batches:
            break
        for k, v in jax.device_get(eval_sums(params, frozen, put_batch(batch))).items():
            total[k] = total.get(k, 0.0) + float(v)
    return total


def initial_state(exp: Any, tokenizer, mesh, updates_per_step: int = 1):
    """(model config, train state, frozen params, optimizer, schedule) before any training; the schedule
    spans the run's optimizer updates (`updates_per_step` per step)."""
    model = load_model(exp.model, exp.lora, tokenizer, mesh, exp.train.seed)
    params = model.params()
    trainable, frozen = lora_lib.split(params) if exp.lora else (params, {})
    optimizer, schedule = make_optimizer(exp.optim, exp.optim.horizon(exp.train.steps) * updates_per_step)
    state = init_state_sharded(trainable, optimizer, exp.train.seed, mesh)
    return model.config, state, frozen, optimizer, schedule


def export_run(run_dir: str, step: int | None = None, out: str | None = None) -> str:
    """Export checkpoint `step` (default: the newest readable) of a run directory of any algorithm as an
    HF model (and the PEFT adapter for LoRA runs) into `out` (default run_dir/export/step_<step>)."""
    exp = config_lib.load_run_config(run_dir)
    exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, run_dir=run_dir))
    mesh = make_mesh(exp.mesh.data, exp.mesh.fsdp, exp.mesh.tensor)
    tokenizer = load_tokenizer(exp.model, run_dir)
    cfg, state, frozen, _, _ = initial_state(exp, tokenizer, mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    with Checkpointer(os.path.abspath(os.path.join(run_dir, "checkpoints")), async_save=False) as ckpt:
        restored = ckpt.restore(abstract, step=step)
    if restored is None:
        raise CheckpointError(f"{run_dir}: no checkpoints to export",
                              hint="a run saves every train.save_every steps and at its end")
    step, state, _ = restored
    out = out or os.path.join(run_dir, "export", f"step_{step}")
    model = Decoder(cfg, combine_params(state.params, frozen), mesh=mesh, hf_config=hf_config_of(exp.model, cfg))
    export(model, tokenizer, out, exp.model.path, subdirs=False)
    return out


def load_tokenizer(src: ModelSource, run_dir: str):
    import transformers

    if src.tokenizer == "toy":
        path = os.path.join(run_dir, "tokenizer")
        if os.path.exists(os.path.join(path, "tokenizer.json")):  # resuming / exporting: the same tokenizer
            return transformers.AutoTokenizer.from_pretrained(path)
        return toy.build_tokenizer(path)
    return transformers.AutoTokenizer.from_pretrained(resolve_model_path(src.tokenizer or src.path))


def resolve_toy_data(data: DataConfig, run_dir: str, seed: int, toy_data: dict) -> DataConfig:
    """`path="toy:<kind>"` writes the algorithm's offline toy dataset (`Algorithm.toy_data`) into run_dir/data."""
    if not data.path.startswith("toy:"):
        return data
    if data.path not in toy_data:
        raise config_lib.ConfigError(f"data.path={data.path!r}: the toy datasets here are {', '.join(sorted(toy_data))}")
    fmt, write = toy_data[data.path]
    path = os.path.join(run_dir, "data", f"{data.path[4:]}.jsonl")
    if jax.process_index() == 0 and not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write(path, n=4000, seed=seed, format=fmt)
    return dataclasses.replace(data, path=path)


def load_model(src: ModelSource, lora: LoraConfig | None, tokenizer, mesh, seed: int) -> Decoder:
    if src.path:
        return from_pretrained(src.path, dtype=jnp.dtype(src.dtype), mesh=mesh, compute_dtype=jnp.dtype(src.compute_dtype),
                               lora=lora, lora_seed=seed, num_labels=src.num_labels, head_seed=seed, **src.execution)
    init = src.init
    if init.vocab_size == 0:
        init = init.replace(vocab_size=len(tokenizer))
    if init.vocab_size < len(tokenizer):
        raise config_lib.ConfigError(f"model.init.vocab_size={init.vocab_size} is smaller than the tokenizer "
                                     f"({len(tokenizer)})", hint="0 takes the tokenizer's size")
    cfg = init.replace(param_dtype=src.dtype, compute_dtype=src.compute_dtype,
                       num_labels=src.num_labels or init.num_labels, **src.execution)
    model = create(cfg, seed=seed, mesh=mesh)
    return lora_lib.add_adapters(model, lora, seed=seed) if lora else model


def hf_config_of(src: ModelSource, cfg: ModelConfig) -> dict | None:
    if not src.path:
        return None
    with open(os.path.join(resolve_model_path(src.path), "config.json")) as f:
        return json.load(f)


def export(model: Decoder, tokenizer, run_dir: str, base_path: str, subdirs: bool = True) -> None:
    """HF model (adapters merged) + tokenizer into <run_dir>/export/hf, PEFT adapter into export/adapter.

    subdirs=False: `run_dir` is the output directory itself (HF model there, adapter in adapter/)."""
    out = os.path.join(run_dir, "export") if subdirs else run_dir
    hf_dir = os.path.join(out, "hf") if subdirs else out
    if model.config.lora is not None:
        lora_lib.save_peft_adapter(model, os.path.join(out, "adapter"), base_model_name_or_path=base_path)
    save_pretrained(model, hf_dir)  # merges adapters
    write_generation_config(hf_dir, bos_token_id=tokenizer.bos_token_id, eos_token_ids=stop_token_ids(tokenizer),
                            pad_token_id=_pad_token_id(model.config, tokenizer),
                            base_dir=resolve_model_path(base_path) if base_path else None)
    if jax.process_index() == 0:
        tokenizer.save_pretrained(hf_dir)
    log.info("exported %s", hf_dir)


def _pad_token_id(cfg: ModelConfig, tokenizer) -> int | None:
    """config.json's pad_token_id: a sequence classifier pools the last token that is not it, and needs
    one to score batches; without a pad token, EOS (as TRL's RewardTrainer and our pipelines pad)."""
    if cfg.num_labels and tokenizer.pad_token_id is None:
        return tokenizer.eos_token_id
    return tokenizer.pad_token_id


def show_samples(model: Decoder, tokenizer, prompts, max_new_tokens, run_dir, is_writer) -> list[str]:
    """Greedy generations for chat prompts; printed and written to run_dir/samples.jsonl."""
    encoded = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for p in prompts]
    encoded = [list(e["input_ids"]) if isinstance(e, dict) else list(e) for e in encoded]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad(encoded, pad)
    tokens, valid = generate(model.config, model.params(), ids, mask, max_new_tokens=max_new_tokens,
                             eos_id=stop_token_ids(tokenizer), pad_id=pad)
    outs = []
    for p, t, v in zip(prompts, np.asarray(tokens), np.asarray(valid)):
        text = tokenizer.decode(t[v], skip_special_tokens=True)
        outs.append(text)
        if is_writer:
            print(f"  sample  {p!r} -> {text!r}", flush=True)
    if is_writer:
        with open(os.path.join(run_dir, "samples.jsonl"), "w") as f:
            for p, o in zip(prompts, outs):
                f.write(json.dumps({"prompt": p, "completion": o}) + "\n")
    return outs
