"""Reward modelling: a scalar head on the decoder, trained with the Bradley-Terry loss on preference pairs.

    state, metrics = rm_step(state, frozen, batch, model_cfg=cfg, optimizer=opt, pairs_per_row=P, pad_id=0)
    rewards_N = score(model, tokenizer, prompts, completions)          # float32 [N], e.g. as an RL reward

The model is an HF-style `*ForSequenceClassification` (`ModelConfig.num_labels == 1`: the decoder plus
`score` [D, 1], no lm_head): loaded with its head, or a causal LM given a new head
(`polmjax.models.from_pretrained(path, num_labels=1)`); `RMExperiment` does that through
`model.num_labels`. A sequence's reward is the head on the final hidden state of its last token that
is not the pad id, which is where `transformers` pools (the rightmost non-pad token) and what
`trl.RewardTrainer` trains, so an exported model scores the same in `transformers`. (When the pad id is
the EOS id, as TRL sets it for tokenizers without a pad token, that is the token before a final EOS.)

`batch` is a `polmjax.data.PreferencePipeline` batch: pair k of a row is segments 2k+1 (prompt +
chosen) and 2k+2 (prompt + rejected), so both go through one forward and a pair never straddles
micro-batches or devices. Every pair weighs 1 / (valid pairs in the global batch), fixed before the
batch is split into micro-batches (`polmjax.train.step.update`), so gradient accumulation is exact.
Loss: `polmjax.losses.bradley_terry`, −log σ(r_c − r_r − m) with the pair's margin m from the data's
`margin` column (as TRL's RewardTrainer; the pipeline needs it on every row or on none, and m = 0
without the column, which is the margin-free loss), plus `center_rewards` (TRL's
`center_rewards_coefficient`). Metrics use TRL's names (accuracy, margin,
mean_reward) plus rewards/chosen and rewards/rejected.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from polmjax import config as config_lib
from polmjax.data import DataConfig, PreferencePipeline, pairs_per_row, tokenize_unpaired, toy
from polmjax.losses import bradley_terry, center_rewards
from polmjax.losses.segments import pair_sums
from polmjax.models.config import LoraConfig, ModelConfig
from polmjax.models.decoder import Decoder, forward_hidden, score_from_hidden
from polmjax.train import run as run_lib
from polmjax.train.config import MeshConfig, ModelSource, TrainConfig
from polmjax.train.loop import LoopResult
from polmjax.train.optim import OptimConfig
from polmjax.train.state import TrainState, combine_params
from polmjax.train.step import update

BATCH_KEYS = ("input_ids", "loss_mask", "positions", "segment_ids")
# the pair's margin m in -log sigma(r_c - r_r - m) on the tokens of its sequences (PreferencePipeline),
# read at the chosen sequence's pooled token; optional for rm_step, always in a run's batches (0 by default)
MARGIN_KEY = "margin"


def rm_step(state: TrainState, frozen: dict, batch: dict, *, model_cfg: ModelConfig,
            optimizer: optax.GradientTransformation, pairs_per_row: int, pad_id: int | None = None,
            center_rewards_coefficient: float | None = None, schedule: optax.Schedule | None = None,
            grad_accum: int = 1, mesh=None, rules=None) -> tuple[TrainState, dict]:
    """One optimizer update of the Bradley-Terry loss on a global batch ([B, T] arrays `BATCH_KEYS`,
    optionally `margin`). pad_id: the id HF's classifier skips when it pools (`reward_pad_id`)."""
    n_c, n_r = pair_sums(jnp.ones(batch["loss_mask"].shape, jnp.float32), batch["segment_ids"],
                         batch["loss_mask"], pairs_per_row)
    pair_weight = 1.0 / jnp.maximum(((n_c > 0) & (n_r > 0)).sum(), 1).astype(jnp.float32)
    micro = {k: batch[k] for k in (*BATCH_KEYS, MARGIN_KEY) if k in batch}
    dropout = model_cfg.lora is not None and model_cfg.lora.dropout > 0

    def micro_loss(params, mb, rng):
        sums = pair_loss_sums(model_cfg, params, mb, pairs_per_row=pairs_per_row, pad_id=pad_id,
                              pair_weight=pair_weight, center_rewards_coefficient=center_rewards_coefficient,
                              mesh=mesh, rules=rules, dropout_rng=rng if dropout else None)
        return sums.pop("loss"), sums

    state, metrics = update(state, frozen, micro, micro_loss=micro_loss, optimizer=optimizer,
                            grad_accum=grad_accum, schedule=schedule)
    return state, {**metrics, "pairs": 1.0 / pair_weight}


def pair_loss_sums(model_cfg: ModelConfig, params: dict, mb: dict, *, pairs_per_row: int, pad_id: int | None,
                   pair_weight, center_rewards_coefficient: float | None = None, mesh=None, rules=None,
                   dropout_rng=None) -> dict:
    """Sums over the pairs of one (micro-)batch, each pair weighted `pair_weight`: loss, accuracy,
    margin, mean_reward, rewards/chosen, rewards/rejected."""
    r_c, r_r, valid_BP = pair_rewards(model_cfg, params, mb, pairs_per_row=pairs_per_row, pad_id=pad_id,
                                      mesh=mesh, rules=rules, dropout_rng=dropout_rng)
    margin_BP = None
    if MARGIN_KEY in mb:
        last_BT = last_token_mask(mb["input_ids"], mb["segment_ids"], pad_id)
        margin_BP, _ = pair_sums(mb[MARGIN_KEY], mb["segment_ids"], last_BT, pairs_per_row)
    per_pair_BP = bradley_terry(r_c, r_r, margin_BP)
    if center_rewards_coefficient is not None:
        per_pair_BP = per_pair_BP + center_rewards(r_c, r_r, center_rewards_coefficient)
    w_BP = valid_BP * pair_weight
    return {"loss": (per_pair_BP * w_BP).sum(), "accuracy": ((r_c > r_r) * w_BP).sum(),
            "margin": ((r_c - r_r) * w_BP).sum(), "mean_reward": ((r_c + r_r) / 2 * w_BP).sum(),
            "rewards/chosen": (r_c * w_BP).sum(), "rewards/rejected": (r_r * w_BP).sum()}


def pair_rewards(model_cfg: ModelConfig, params: dict, mb: dict, *, pairs_per_row: int, pad_id: int | None,
                 mesh=None, rules=None, dropout_rng=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(chosen_BP, rejected_BP, valid_BP) float32 [B, pairs_per_row]: each sequence's reward (the
    head on its last non-pad token) and 1 where the slot holds a pair."""
    hidden_BTD, _ = forward_hidden(model_cfg, params, mb["input_ids"], mb["positions"], mb["segment_ids"],
                                   mesh=mesh, rules=rules, dropout_rng=dropout_rng)
    scores_BT = score_from_hidden(model_cfg, params, hidden_BTD)[..., 0]
    last_BT = last_token_mask(mb["input_ids"], mb["segment_ids"], pad_id)
    r_c, r_r = pair_sums(scores_BT, mb["segment_ids"], last_BT, pairs_per_row)
    n_c, n_r = pair_sums(jnp.ones(scores_BT.shape, jnp.float32), mb["segment_ids"], mb["loss_mask"], pairs_per_row)
    return r_c, r_r, ((n_c > 0) & (n_r > 0)).astype(jnp.float32)


def last_token_mask(input_ids_BT: jax.Array, segment_ids_BT: jax.Array, pad_id: int | None = None) -> jax.Array:
    """float32 [B, T]: 1 at the last token of each segment (> 0) whose id is not pad_id, else 0.

    Where HF's `*ForSequenceClassification` pools a right-padded sequence (the rightmost non-pad token).
    """
    B, T = input_ids_BT.shape
    valid_BT = segment_ids_BT > 0
    if pad_id is not None:
        valid_BT = valid_BT & (input_ids_BT != pad_id)
    t_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    seg_BT = jnp.where(valid_BT, segment_ids_BT, 0).astype(jnp.int32)
    last_BS = jax.vmap(lambda t, s: jax.ops.segment_max(t, s, num_segments=T + 1))(jnp.where(valid_BT, t_BT, -1),
                                                                                   seg_BT)
    return (valid_BT & (t_BT == jnp.take_along_axis(last_BS, seg_BT, axis=1))).astype(jnp.float32)


def reward_pad_id(tokenizer) -> int | None:
    """The id a reward model's pooling skips: the tokenizer's pad, else its EOS (TRL's RewardTrainer rule);
    exports write it as config.json's pad_token_id, where `transformers` reads it."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def score(model: Decoder, tokenizer, prompts: Sequence, completions: Sequence, *, batch_size: int = 32,
          max_len: int | None = None) -> np.ndarray:
    """Rewards float32 [N] (or [N, num_labels]) of prompt + completion pairs.

    Tokenised as the preference pipeline does (`tokenize_unpaired`: chat template for conversational
    prompts / completions, BOS and EOS by the same rules; cut to max_len by the same rule), right-padded
    into batches whose length is rounded up to a multiple of 64 (few compiled shapes), scored at each
    sequence's last non-pad token.
    """
    cfg = model.config
    if not cfg.num_labels:
        raise ValueError("score: the model has no score head (ModelConfig.num_labels == 0); load a reward model")
    if len(prompts) != len(completions):
        raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
    pad = reward_pad_id(tokenizer)
    limit = max_len or 2**62
    seqs = []
    for p, c in zip(prompts, completions):
        ids = tokenize_unpaired({"prompt": p, "completion": c, "label": True}, tokenizer, max_len=limit)
        seqs.append(np.concatenate([ids["prompt_ids"], ids["completion_ids"]]))
    out = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        T = -(-max(len(s) for s in chunk) // 64) * 64
        ids_BT = np.full((batch_size, T), 0 if pad is None else pad, np.int32)
        seg_BT = np.zeros((batch_size, T), np.int32)
        for i, s in enumerate(chunk):
            ids_BT[i, :len(s)], seg_BT[i, :len(s)] = s, 1
        out.append(np.asarray(_score_batch(cfg, model.params(), ids_BT, seg_BT, pad))[:len(chunk)])
    scores = np.concatenate(out) if out else np.zeros((0, cfg.num_labels), np.float32)
    return scores[:, 0] if cfg.num_labels == 1 else scores


@functools.partial(jax.jit, static_argnames=("cfg", "pad_id"))
def _score_batch(cfg, params, ids_BT, seg_BT, pad_id):
    hidden_BTD, _ = forward_hidden(cfg, params, ids_BT, None, seg_BT)
    last_BT = last_token_mask(ids_BT, seg_BT, pad_id)
    return jnp.einsum("btc,bt->bc", score_from_hidden(cfg, params, hidden_BTD), last_BT)


# ----------------------------------------------------------------------------------------------
# The experiment and the algorithm the shared run (polmjax.train.run) needs


@dataclasses.dataclass(frozen=True)
class RMExperiment:
    """`polmjax rm experiments/rm/<name>.py`: a reward model trained on preference pairs.

    The model is a reward model: `model.num_labels` 0 (the default) becomes 1, so `model.path` may be
    a causal LM (a new head) or a `*ForSequenceClassification` checkpoint (its head).
    center_rewards_coefficient: TRL's reward centring (Eisenstein et al. 2023); None = off.
    lora: adapters on the decoder, with the score head trained whole (PEFT's SEQ_CLS `modules_to_save`);
    the export holds the merged `*ForSequenceClassification` and the PEFT adapter with the head.
    """

    model: ModelSource
    data: DataConfig
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    lora: LoraConfig | None = None
    center_rewards_coefficient: float | None = None

    def __post_init__(self):
        if self.model.num_labels == 0:
            object.__setattr__(self, "model", dataclasses.replace(self.model, num_labels=1))

    def validate(self):
        if self.model.num_labels != 1:
            raise ValueError(f"model.num_labels={self.model.num_labels}: a reward model has one output (1)")
        if self.train.sample_prompts:
            raise ValueError("train.sample_prompts: a reward model does not generate text; leave it empty")
        if self.train.eval_every and not self.data.eval_fraction:
            raise ValueError("train.eval_every > 0 needs data.eval_fraction > 0 (a held-out split)")


def run(exp: RMExperiment, *, allow_config_change: bool = False) -> LoopResult:
    """`polmjax rm`: the shared run (`polmjax.train.run`) with the reward-model algorithm."""
    config_lib.validate(exp)  # also when called from Python: e.g. no sample generation for a reward model
    return run_lib.run(exp, ALGORITHM, allow_config_change=allow_config_change)


def pipeline(exp: RMExperiment, data_cfg: DataConfig, tokenizer, split: str) -> PreferencePipeline:
    return PreferencePipeline(data_cfg, tokenizer, global_batch=exp.train.global_batch, seq_len=exp.train.seq_len,
                              split=split, process_index=jax.process_index(), process_count=jax.process_count(),
                              margin_default=0.0)


def jit_step(exp: RMExperiment, model_cfg, optimizer, schedule, mesh, state_shardings, frozen_shardings,
             batch_shardings):
    step = functools.partial(rm_step, model_cfg=model_cfg, optimizer=optimizer, schedule=schedule,
                             pairs_per_row=pairs_per_row(exp.train.seq_len), pad_id=_pad_id(exp),
                             center_rewards_coefficient=exp.center_rewards_coefficient,
                             grad_accum=exp.train.grad_accum, mesh=mesh)
    return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))


def eval_sums(exp: RMExperiment, model_cfg, mesh):
    """(params, frozen, batch) -> sums over the batch's pairs: loss, accuracy, margin, pairs."""
    P, pad_id = pairs_per_row(exp.train.seq_len), _pad_id(exp)

    def sums(params, frozen, batch):
        out = pair_loss_sums(model_cfg, combine_params(params, frozen), batch, pairs_per_row=P, pad_id=pad_id,
                             pair_weight=1.0, center_rewards_coefficient=exp.center_rewards_coefficient, mesh=mesh)
        n_c, n_r = pair_sums(jnp.ones(batch["loss_mask"].shape, jnp.float32), batch["segment_ids"],
                             batch["loss_mask"], P)
        return {k: out[k] for k in ("loss", "accuracy", "margin")} | {"pairs": ((n_c > 0) & (n_r > 0)).sum()}

    return sums


def eval_metrics(sums: dict) -> dict:
    """Held-out means over pairs: loss, accuracy (r_chosen > r_rejected), margin."""
    n = max(sums["pairs"], 1.0)
    return {"loss": sums["loss"] / n, "accuracy": sums["accuracy"] / n, "margin": sums["margin"] / n,
            "pairs": sums["pairs"]}


def _pad_id(exp: RMExperiment) -> int | None:
    """The pad id of the run's tokenizer (already built in run_dir for the toy tokenizer)."""
    return reward_pad_id(run_lib.load_tokenizer(exp.model, exp.train.run_dir))


ALGORITHM = run_lib.Algorithm(
    name="rm", batch_keys=(*BATCH_KEYS, MARGIN_KEY), pipeline=pipeline, jit_step=jit_step, eval_sums=eval_sums,
    eval_metrics=eval_metrics, toy_data={"toy:preference": ("preference", toy.write_toy_preference_dataset)},
)
