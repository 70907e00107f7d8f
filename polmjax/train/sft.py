"""Supervised fine-tuning: the pure step, and the run that wires model, data, optimizer and loop.

`sft_step(state, frozen, batch, ...)` is a module-level pure function: jit it once at the call site with
in/out shardings and `donate_argnums=0`; a test can call it un-jitted on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from polmjax import config as config_lib
from polmjax import mesh as mesh_lib
from polmjax.checkpoint import CheckpointError, Checkpointer
from polmjax.data import DataConfig, SFTPipeline, stop_token_ids, toy
from polmjax.generate import generate, left_pad
from polmjax.logging import MetricsLogger, device_peak_flops, train_flops_per_token
from polmjax.losses import sft_loss, token_weights
from polmjax.mesh import initialize_distributed, make_mesh
from polmjax.models import lora as lora_lib
from polmjax.models.config import LoraConfig, ModelConfig
from polmjax.models.decoder import Decoder, create, forward_hidden, target_logprobs
from polmjax.models.hf import from_pretrained, resolve_model_path, save_pretrained, write_generation_config
from polmjax.train.config import MeshConfig, ModelSource, TrainConfig
from polmjax.train.loop import LoopResult, train_loop
from polmjax.train import rundir
from polmjax.train.optim import OptimConfig, make_optimizer
from polmjax.train.state import TrainState, combine_params, init_state_sharded, state_shardings

log = logging.getLogger("polmjax")

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")


def sft_step(
    state: TrainState,
    frozen: dict,
    batch: dict,
    *,
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule | None = None,
    reduction: str = "token",
    grad_accum: int = 1,
    mesh=None,
    rules=None,
) -> tuple[TrainState, dict]:
    """One optimizer update on a global batch of [B, T] arrays (see `polmjax.data` for the keys).

    The batch is split into `grad_accum` micro-batches scanned in sequence; loss weights are normalised
    over the whole batch first, so the update equals that of one big batch. Gradients accumulate in
    float32. Returns the new state and scalar metrics (loss, grad_norm, tokens, learning_rate).
    """
    weights_BT = token_weights(batch["loss_mask"], batch["segment_ids"], reduction)
    B = weights_BT.shape[0]
    if B % grad_accum:
        raise ValueError(f"global batch {B} is not divisible by grad_accum={grad_accum}")
    micro = {k: _micro(batch[k], grad_accum) for k in ("input_ids", "targets", "positions", "segment_ids")}
    micro["weights"] = _micro(weights_BT, grad_accum)
    key = state.step_key()

    def loss_fn(params, mb, index):
        rng = jax.random.fold_in(key, index) if model_cfg.lora and model_cfg.lora.dropout else None
        return micro_batch_loss(model_cfg, combine_params(params, frozen), mb, mesh=mesh, rules=rules,
                                dropout_rng=rng)

    grad_fn = jax.value_and_grad(loss_fn)

    def accumulate(carry, xs):
        loss_sum, grad_sum = carry
        mb, index = xs
        loss, grads = grad_fn(state.params, mb, index)
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
        return (loss_sum + loss, grad_sum), None

    if grad_accum == 1:  # no accumulator buffers: one params-sized read and write fewer per step
        loss, grads = grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), 0)
    else:
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                        (micro, jnp.arange(grad_accum)))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "tokens": batch["loss_mask"].astype(jnp.float32).sum(),
    }
    if schedule is not None:
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    return TrainState(state.step + 1, params, opt_state, state.rng), metrics


def micro_batch_loss(model_cfg: ModelConfig, params: dict, mb: dict, *, mesh=None, rules=None,
                     dropout_rng=None) -> jax.Array:
    """sum_t w_t * (-log p(target_t)) over one micro-batch, from hidden states through `token_logprobs`."""
    hidden_BTD, _ = forward_hidden(model_cfg, params, mb["input_ids"], mb["positions"], mb["segment_ids"],
                                   mesh=mesh, rules=rules, dropout_rng=dropout_rng)
    lp_BT = target_logprobs(model_cfg, params, hidden_BTD, mb["targets"], mesh=mesh)
    return sft_loss(lp_BT, mb["weights"]).sum()


def _micro(x, n):
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])


def jit_sft_step(state_shardings, frozen_shardings, batch_sharding, **static):
    """`sft_step` jitted once with explicit shardings and the state donated."""
    batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
    return jax.jit(
        functools.partial(sft_step, **static),
        in_shardings=(state_shardings, frozen_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )


# ----------------------------------------------------------------------------------------------
# The run: experiment config -> trained model in run_dir


@dataclasses.dataclass(frozen=True)
class SFTExperiment:
    """`polmjax sft experiments/sft/<name>.py`: everything an SFT run needs."""

    model: ModelSource
    data: DataConfig
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    lora: LoraConfig | None = None
    reduction: str = "token"  # token | sequence (see polmjax.losses.sft)

    def validate(self):
        if self.reduction not in ("token", "sequence"):
            raise ValueError(f"reduction={self.reduction!r}; expected token or sequence")
        if self.train.eval_every and not self.data.eval_fraction:
            raise ValueError("train.eval_every > 0 needs data.eval_fraction > 0 (a held-out split)")


def run(exp: SFTExperiment, *, allow_config_change: bool = False) -> LoopResult:
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
    data_cfg = resolve_toy_data(exp.data, tc.run_dir, tc.seed)
    cfg, state, frozen, optimizer, schedule = initial_state(exp, tokenizer, mesh)

    pipe = SFTPipeline(data_cfg, tokenizer, global_batch=tc.global_batch, seq_len=tc.seq_len, split="train",
                       process_index=jax.process_index(), process_count=jax.process_count())
    batch_sharding = mesh_lib.named_sharding(mesh, ("act_batch", "act_len"), (tc.global_batch, tc.seq_len))
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    step_fn = jit_sft_step(state_shardings(state), frozen_shardings, batch_sharding, model_cfg=cfg,
                           optimizer=optimizer, schedule=schedule, reduction=exp.reduction,
                           grad_accum=tc.grad_accum, mesh=mesh)

    def put_batch(batch):
        return {k: jax.make_array_from_process_local_data(batch_sharding, batch[k]) for k in BATCH_KEYS}

    eval_fn = None
    if tc.eval_every:
        eval_pipe = SFTPipeline(data_cfg, tokenizer, global_batch=tc.global_batch, seq_len=tc.seq_len,
                                split="eval", process_index=jax.process_index(),
                                process_count=jax.process_count())
        eval_fn = functools.partial(evaluate, pipe=eval_pipe, frozen=frozen, put_batch=put_batch,
                                    max_batches=tc.eval_batches,
                                    eval_step=jax.jit(functools.partial(eval_nll, model_cfg=cfg, mesh=mesh)))

    logger = MetricsLogger(tc.run_dir, total_steps=tc.steps, use_tensorboard=tc.tensorboard,
                           wandb_project=tc.wandb_project, config=config_lib.to_dict(exp), is_writer=is_writer)
    checkpointer = Checkpointer(os.path.abspath(os.path.join(tc.run_dir, "checkpoints")),
                                save_every=tc.save_every, keep=tc.keep, async_save=tc.async_save)
    try:
        result = train_loop(
            state=state, step_fn=lambda s, b: step_fn(s, frozen, b), batches=iter(pipe), put_batch=put_batch,
            total_steps=tc.steps, checkpointer=checkpointer, logger=logger, log_every=tc.log_every,
            eval_every=tc.eval_every, eval_fn=eval_fn, tokens_per_step=tc.global_batch * tc.seq_len,
            flops_per_step=train_flops_per_token(cfg, tc.seq_len) * tc.global_batch * tc.seq_len,
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
        checkpointer.close()
        logger.close()


def initial_state(exp: SFTExperiment, tokenizer, mesh):
    """(model config, train state, frozen params, optimizer, schedule) before any training."""
    model = load_model(exp.model, exp.lora, tokenizer, mesh, exp.train.seed)
    params = model.params()
    trainable, frozen = lora_lib.split(params) if exp.lora else (params, {})
    optimizer, schedule = make_optimizer(exp.optim, exp.optim.horizon(exp.train.steps))
    state = init_state_sharded(trainable, optimizer, exp.train.seed, mesh)
    return model.config, state, frozen, optimizer, schedule


def export_run(run_dir: str, step: int | None = None, out: str | None = None) -> str:
    """Export checkpoint `step` (default: the newest readable) of an SFT run directory as an HF model
    (and the PEFT adapter for LoRA runs) into `out` (default run_dir/export/step_<step>)."""
    exp = config_lib.load_run_config(run_dir)
    if not isinstance(exp, SFTExperiment):
        raise config_lib.ConfigError(f"{run_dir} is a {type(exp).__name__} run, not SFT")
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


def evaluate(state, *, pipe, frozen, put_batch, max_batches, eval_step) -> dict:
    """Token-mean loss over the first `max_batches` batches of the held-out split."""
    nll, tokens = 0.0, 0.0
    for i, batch in enumerate(iter(pipe)):
        if i == max_batches:
            break
        n, t = jax.device_get(eval_step(state.params, frozen, put_batch(batch)))
        nll, tokens = nll + float(n), tokens + float(t)
    return {"loss": nll / max(tokens, 1.0), "tokens": tokens}


def eval_nll(params, frozen, batch, *, model_cfg, mesh=None):
    """(sum of -log p over loss tokens, number of loss tokens) of one batch."""
    mb = dict(batch, weights=batch["loss_mask"].astype(jnp.float32))
    return micro_batch_loss(model_cfg, combine_params(params, frozen), mb, mesh=mesh), mb["weights"].sum()


def load_tokenizer(src: ModelSource, run_dir: str):
    import transformers

    if src.tokenizer == "toy":
        path = os.path.join(run_dir, "tokenizer")
        if os.path.exists(os.path.join(path, "tokenizer.json")):  # resuming / exporting: the same tokenizer
            return transformers.AutoTokenizer.from_pretrained(path)
        return toy.build_tokenizer(path)
    return transformers.AutoTokenizer.from_pretrained(resolve_model_path(src.tokenizer or src.path))


def resolve_toy_data(data: DataConfig, run_dir: str, seed: int) -> DataConfig:
    """`path="toy:sft"` (or "toy:sft_prompt_completion") writes the offline toy dataset into run_dir/data."""
    if not data.path.startswith("toy:"):
        return data
    kind = data.path[4:]
    fmt = {"sft": "messages", "sft_prompt_completion": "prompt_completion"}.get(kind)
    if fmt is None:
        raise config_lib.ConfigError(f"data.path={data.path!r}: toy datasets are toy:sft and toy:sft_prompt_completion")
    path = os.path.join(run_dir, "data", f"{kind}.jsonl")
    if jax.process_index() == 0 and not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        toy.write_toy_sft_dataset(path, n=4000, seed=seed, format=fmt)
    return dataclasses.replace(data, path=path)


def load_model(src: ModelSource, lora: LoraConfig | None, tokenizer, mesh, seed: int) -> Decoder:
    if src.path:
        return from_pretrained(src.path, dtype=jnp.dtype(src.dtype), mesh=mesh, compute_dtype=jnp.dtype(src.compute_dtype),
                               lora=lora, lora_seed=seed, **src.execution)
    init = src.init
    if init.vocab_size == 0:
        init = init.replace(vocab_size=len(tokenizer))
    if init.vocab_size < len(tokenizer):
        raise config_lib.ConfigError(f"model.init.vocab_size={init.vocab_size} is smaller than the tokenizer "
                                     f"({len(tokenizer)})", hint="0 takes the tokenizer's size")
    cfg = init.replace(param_dtype=src.dtype, compute_dtype=src.compute_dtype, **src.execution)
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
                            pad_token_id=tokenizer.pad_token_id,
                            base_dir=resolve_model_path(base_path) if base_path else None)
    if jax.process_index() == 0:
        tokenizer.save_pretrained(hf_dir)
    log.info("exported %s", hf_dir)


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
