"""Supervised fine-tuning: the experiment, the batch schema, the micro-batch loss and the step.

`sft_step(state, frozen, batch, ...)` is a module-level pure function (SFT's loss handed to the shared
`polmjax.train.step.update`): jit it once at the call site with in/out shardings and `donate_argnums=0`;
a test can call it un-jitted on CPU. `run(exp)` is the shared run (`polmjax.train.run`) with `ALGORITHM`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from polmjax.data import DataConfig, SFTPipeline, toy
from polmjax.losses import sft_loss, token_weights
from polmjax.models.config import LoraConfig, ModelConfig
from polmjax.models.decoder import forward_hidden, target_logprobs
from polmjax.train import run as run_lib
from polmjax.train.config import MeshConfig, ModelSource, TrainConfig
from polmjax.train.loop import LoopResult
from polmjax.train.optim import OptimConfig
from polmjax.train.state import TrainState, combine_params
from polmjax.train.step import update

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

    Loss weights are normalised over the whole batch (`token_weights`), then `polmjax.train.step.update`
    splits it into `grad_accum` scanned micro-batches, so the update equals that of one big batch.
    Returns the new state and scalar metrics (loss, grad_norm, tokens, learning_rate).
    """
    micro = {k: batch[k] for k in ("input_ids", "targets", "positions", "segment_ids")}
    micro["weights"] = token_weights(batch["loss_mask"], batch["segment_ids"], reduction)
    dropout = model_cfg.lora is not None and model_cfg.lora.dropout > 0

    def micro_loss(params, mb, rng):
        loss = micro_batch_loss(model_cfg, params, mb, mesh=mesh, rules=rules, dropout_rng=rng if dropout else None)
        return loss, {}

    state, metrics = update(state, frozen, micro, micro_loss=micro_loss, optimizer=optimizer,
                            grad_accum=grad_accum, schedule=schedule)
    return state, {**metrics, "tokens": batch["loss_mask"].astype(jnp.float32).sum()}


def micro_batch_loss(model_cfg: ModelConfig, params: dict, mb: dict, *, mesh=None, rules=None,
                     dropout_rng=None) -> jax.Array:
    """sum_t w_t * (-log p(target_t)) over one micro-batch, from hidden states through `token_logprobs`."""
    hidden_BTD, _ = forward_hidden(model_cfg, params, mb["input_ids"], mb["positions"], mb["segment_ids"],
                                   mesh=mesh, rules=rules, dropout_rng=dropout_rng)
    lp_BT = target_logprobs(model_cfg, params, hidden_BTD, mb["targets"], mesh=mesh)
    return sft_loss(lp_BT, mb["weights"]).sum()


def jit_sft_step(state_shardings, frozen_shardings, batch_sharding, **static):
    """`sft_step` jitted once with explicit shardings and the state donated; `batch_sharding` is one
    sharding for every batch array or a dict by key."""
    batch_shardings = batch_sharding if isinstance(batch_sharding, dict) else {k: batch_sharding for k in BATCH_KEYS}
    return jax.jit(
        functools.partial(sft_step, **static),
        in_shardings=(state_shardings, frozen_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )


# ----------------------------------------------------------------------------------------------
# The experiment and the algorithm the shared run (polmjax.train.run) needs


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
    """`polmjax sft`: the shared run (`polmjax.train.run`) with the SFT algorithm."""
    return run_lib.run(exp, ALGORITHM, allow_config_change=allow_config_change)


def pipeline(exp: SFTExperiment, data_cfg: DataConfig, tokenizer, split: str) -> SFTPipeline:
    return SFTPipeline(data_cfg, tokenizer, global_batch=exp.train.global_batch, seq_len=exp.train.seq_len,
                       split=split, process_index=jax.process_index(), process_count=jax.process_count())


def jit_step(exp: SFTExperiment, model_cfg, optimizer, schedule, mesh, state_shardings, frozen_shardings,
             batch_shardings):
    return jit_sft_step(state_shardings, frozen_shardings, batch_shardings, model_cfg=model_cfg,
                        optimizer=optimizer, schedule=schedule, reduction=exp.reduction,
                        grad_accum=exp.train.grad_accum, mesh=mesh)


def eval_sums(exp: SFTExperiment, model_cfg, mesh):
    """(params, frozen, batch) -> {"nll": sum of -log p over loss tokens, "tokens": their number}."""

    def sums(params, frozen, batch):
        mb = dict(batch, weights=batch["loss_mask"].astype(jnp.float32))
        nll = micro_batch_loss(model_cfg, combine_params(params, frozen), mb, mesh=mesh)
        return {"nll": nll, "tokens": mb["weights"].sum()}

    return sums


def eval_metrics(sums: dict) -> dict:
    """Held-out token-mean loss."""
    return {"loss": sums["nll"] / max(sums["tokens"], 1.0), "tokens": sums["tokens"]}


ALGORITHM = run_lib.Algorithm(
    name="sft", batch_keys=BATCH_KEYS, pipeline=pipeline, jit_step=jit_step, eval_sums=eval_sums,
    eval_metrics=eval_metrics,
    toy_data={"toy:sft": ("messages", toy.write_toy_sft_dataset),
              "toy:sft_prompt_completion": ("prompt_completion", toy.write_toy_sft_dataset)},
)

# The run's pieces, under the names SFT users already import from here.
export_run, load_model, load_tokenizer, initial_state = (run_lib.export_run, run_lib.load_model,
                                                        run_lib.load_tokenizer, run_lib.initial_state)
