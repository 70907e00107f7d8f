"""Direct preference optimisation and its family: the pure step over packed preference batches.

    state, metrics = dpo_step(state, frozen, batch, model_cfg=cfg, optimizer=opt, loss="sigmoid", beta=0.1)

`batch` is a `polmjax.data.PreferencePipeline` batch: each pair is two segments of one row (2k+1 =
prompt + chosen, 2k+2 = prompt + rejected), so chosen and rejected go through ONE forward, and a pair
never straddles micro-batches or devices. Per-sequence log-prob sums come from
`polmjax.losses.segments.pair_sums`; the loss is any entry of `polmjax.losses.PREFERENCE_LOSSES` (TRL's
`loss_type` names), called with the log-probs its arguments name (`chosen`, `ref_rejected_avg`, ...).

`frozen = {"base": ..., "reference": ...}`: `base` holds the frozen part of the policy (the LoRA base;
{} for full fine-tuning); `reference` the reference model's parameters, a separate non-donated
argument that gets no gradient (None for reference-free losses such as SimPO). With LoRA the reference
can be the base itself with the adapters off (`reference_params(...)`): no copy at all. Or the batch
carries the reference's per-token log-probs, computed once before training (`ref_logps`, see
`polmjax.train.reference`), and `reference` is None: no reference forward at all.

Every pair weighs 1 / (pairs in the global batch), fixed before the batch is split into micro-batches
(`polmjax.train.step.update`), so gradient accumulation is exact. Metrics use TRL's names.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import optax

from polmjax.data import DataConfig, PreferencePipeline, pairs_per_row, toy
from polmjax.losses import PREFERENCE_LOSSES, implicit_rewards, sft_loss
from polmjax.losses.segments import pair_sums
from polmjax.models.config import LoraConfig, ModelConfig
from polmjax.models.decoder import forward_hidden, target_logprobs
from polmjax.models.lora import has_adapters
from polmjax.mesh import make_mesh
from polmjax.train import reference as reference_lib
from polmjax.train import run as run_lib
from polmjax.train.config import MeshConfig, ModelSource, TrainConfig
from polmjax.train.loop import LoopResult
from polmjax.train.optim import OptimConfig
from polmjax.train.state import TrainState, combine_params
from polmjax.train.step import update

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids", "is_chosen")
# hyperparameters a loss may take, by name (each loss takes the ones its signature names)
HYPERPARAMETERS = ("beta", "label_smoothing", "gamma", "tau", "delta")


def dpo_step(state: TrainState, frozen: dict, batch: dict, *, model_cfg: ModelConfig,
             optimizer: optax.GradientTransformation, loss: str = "sigmoid", beta: float = 0.1,
             loss_kwargs: dict | None = None, nll_weight: float = 0.0, pairs_per_row: int,
             schedule: optax.Schedule | None = None, grad_accum: int = 1, mesh=None,
             rules=None) -> tuple[TrainState, dict]:
    """One optimizer update of a preference loss on a global batch (keys `BATCH_KEYS`, [B, T] each).

    nll_weight: adds that weight x the token-mean NLL of the chosen responses over the global batch
    (RPO's `rpo_alpha`, TRL's "sft" loss type; ORPO uses 1).
    """
    terms = PairTerms(model_cfg, loss, beta, loss_kwargs, pairs_per_row, reference=frozen.get("reference"),
                      precomputed="ref_logps" in batch, mesh=mesh, rules=rules)
    n_c, n_r = pair_sums(jnp.ones(batch["loss_mask"].shape, jnp.float32), batch["segment_ids"],
                         batch["loss_mask"], pairs_per_row)
    pair_weight = 1.0 / jnp.maximum(((n_c > 0) & (n_r > 0)).sum(), 1).astype(jnp.float32)
    chosen_mask = batch["loss_mask"].astype(jnp.float32) * batch["is_chosen"]
    micro = dict(batch, nll_weights=chosen_mask / jnp.maximum(chosen_mask.sum(), 1.0))
    dropout = model_cfg.lora is not None and model_cfg.lora.dropout > 0

    def micro_loss(params, mb, rng):
        per_pair_BP, valid_BP, metrics_BP, lp_BT = terms(params, mb, rng if dropout else None)
        w_BP = valid_BP * pair_weight
        metrics = {k: (v * w_BP).sum() for k, v in metrics_BP.items()}
        total = (per_pair_BP * pair_weight).sum()  # per_pair_BP is 0 on empty slots
        if nll_weight:
            nll = sft_loss(lp_BT, mb["nll_weights"]).sum()
            metrics["nll"] = nll
            total = total + nll_weight * nll
        return total, metrics

    state, metrics = update(state, frozen.get("base", {}), micro, micro_loss=micro_loss, optimizer=optimizer,
                            grad_accum=grad_accum, schedule=schedule)
    return state, {**metrics, "pairs": 1.0 / pair_weight}


class PairTerms:
    """Per-pair losses, valid slots and TRL's metrics of one (micro-)batch: the part of the DPO family
    that training and held-out evaluation share.

    terms(params, mb, dropout_rng) -> (loss_BP, valid_BP, metrics_BP, policy_logps_BT), every [B, P]
    array per pair slot (P = pairs_per_row); loss_BP is 0 on empty slots; metrics are TRL's `logps/*` and `rewards/*` (implicit
    rewards beta * (policy - reference) log-ratios; beta * mean log-prob for reference-free losses),
    plus `logps/accuracies`: the policy's own ranking (chosen log-prob sum > rejected's).
    """

    def __init__(self, model_cfg: ModelConfig, loss: str, beta: float, loss_kwargs: dict | None, pairs_per_row: int,
                 *, reference=None, precomputed: bool = False, mesh=None, rules=None):
        if loss not in PREFERENCE_LOSSES:
            raise ValueError(f"loss={loss!r}; expected one of {', '.join(sorted(PREFERENCE_LOSSES))}")
        self.fn = PREFERENCE_LOSSES[loss]
        params = inspect.signature(self.fn).parameters
        self.arg_names = tuple(params)
        self.needs_reference = any(name.startswith("ref_") for name in params)
        if self.needs_reference and reference is None and not precomputed:
            raise ValueError(f"loss {loss!r} needs a reference model; frozen['reference'] is None and the batch "
                             "has no precomputed 'ref_logps'")
        if reference is not None and precomputed:
            raise ValueError("both a reference model and precomputed 'ref_logps' given; pass one")
        self.reference = reference if self.needs_reference else None
        self.precomputed = precomputed
        self.model_cfg, self.beta, self.pairs_per_row, self.mesh, self.rules = model_cfg, beta, pairs_per_row, mesh, rules
        self.ref_cfg = (model_cfg.replace(lora=None) if reference is not None and not has_adapters(reference)
                        else model_cfg)
        kwargs = {"beta": beta, **(loss_kwargs or {})}
        self.kwargs = {k: v for k, v in kwargs.items() if k in params}

    def logprobs(self, cfg, params, mb, dropout_rng=None):
        hidden_BTD, _ = forward_hidden(cfg, params, mb["input_ids"], mb["positions"], mb["segment_ids"],
                                       mesh=self.mesh, rules=self.rules, dropout_rng=dropout_rng)
        return target_logprobs(cfg, params, hidden_BTD, mb["targets"], mesh=self.mesh)

    def __call__(self, params, mb, dropout_rng=None):
        lp_BT = self.logprobs(self.model_cfg, params, mb, dropout_rng)
        seqs = _sequence_logprobs(lp_BT, mb, self.pairs_per_row, "")
        if self.needs_reference:
            ref_BT = mb["ref_logps"] if self.precomputed else self.logprobs(self.ref_cfg, self.reference, mb)
            ref_BT = jax.lax.stop_gradient(ref_BT)
            seqs.update(_sequence_logprobs(ref_BT, mb, self.pairs_per_row, "ref_"))
        valid_BP = seqs.pop("valid")
        args = {name: seqs[name] for name in self.arg_names if name in seqs}
        if self.fn in SORTING_LOSSES:
            per_pair_BP = _sorted_over_valid_pairs(self.fn, args, valid_BP, self.kwargs)
        else:
            per_pair_BP = self.fn(**args, **self.kwargs) * valid_BP
        metrics = {"logps/chosen": seqs["chosen"], "logps/rejected": seqs["rejected"],
                   # not TRL's: does the policy itself give the chosen response the higher likelihood?
                   "logps/accuracies": (seqs["chosen"] > seqs["rejected"]).astype(jnp.float32)}
        if self.needs_reference:
            r_c, r_r = implicit_rewards(seqs["chosen"], seqs["rejected"], seqs["ref_chosen"], seqs["ref_rejected"],
                                        self.beta)
        else:  # reference-free (SimPO, ORPO): the length-normalised policy log-probs rank the pair
            r_c, r_r = self.beta * seqs["chosen_avg"], self.beta * seqs["rejected_avg"]
        metrics.update({"rewards/chosen": r_c, "rewards/rejected": r_r,
                        "rewards/accuracies": (r_c > r_r).astype(jnp.float32), "rewards/margins": r_c - r_r})
        return per_pair_BP, valid_BP, metrics, lp_BT


# Losses over batch quantiles (AOT): their i-th value belongs to the i-th quantile, not to pair i.
SORTING_LOSSES = (PREFERENCE_LOSSES["aot"], PREFERENCE_LOSSES["aot_unpaired"])
_SENTINEL = 1e6  # larger than any |log-prob difference|, exact in float32


def _sorted_over_valid_pairs(fn, args: dict, valid_BP, kwargs: dict):
    """A quantile loss over the valid pair slots of the whole (micro-)batch: [B, P] flattened to one
    axis, empty slots given values that sort last in every difference AOT sorts (chosen - rejected,
    ref_chosen - ref_rejected, chosen - ref_chosen, rejected - ref_rejected all equal _SENTINEL), so
    the first n_valid quantiles are the valid pairs'; those carry the loss, the rest 0."""
    fill = {"chosen": 2 * _SENTINEL, "rejected": _SENTINEL, "ref_chosen": _SENTINEL, "ref_rejected": 0.0}
    valid = valid_BP.reshape(1, -1) > 0
    flat = {k: jnp.where(valid, v.reshape(1, -1), fill[k]) for k, v in args.items()}
    loss = fn(**flat, **kwargs)
    first = (jnp.arange(valid.size) < valid.sum()).reshape(1, -1)
    return jnp.where(first, loss, 0.0).reshape(valid_BP.shape)


def reference_params(trainable: dict, base: dict, lora: bool) -> dict:
    """The reference model's parameters at the start: the LoRA base with the adapters off (the same
    arrays, no copy), or a frozen copy of the whole initial policy (base and adapters combined)."""
    if lora:
        return base
    return jax.tree.map(jnp.copy, combine_params(trainable, base))


def _sequence_logprobs(lp_BT, mb, pairs_per_row: int, prefix: str) -> dict:
    """{chosen, rejected, chosen_avg, rejected_avg} [B, P] (names prefixed), and `valid` slots."""
    chosen, rejected = pair_sums(lp_BT, mb["segment_ids"], mb["loss_mask"], pairs_per_row)
    n_c, n_r = pair_sums(jnp.ones(lp_BT.shape, jnp.float32), mb["segment_ids"], mb["loss_mask"], pairs_per_row)
    out = {f"{prefix}chosen": chosen, f"{prefix}rejected": rejected,
           f"{prefix}chosen_avg": chosen / jnp.maximum(n_c, 1.0), f"{prefix}rejected_avg": rejected / jnp.maximum(n_r, 1.0)}
    if not prefix:
        out["valid"] = ((n_c > 0) & (n_r > 0)).astype(jnp.float32)
    return out


# ----------------------------------------------------------------------------------------------
# The experiment and the algorithm the shared run (polmjax.train.run) needs

REFERENCES = ("auto", "copy", "base", "precomputed", "none")


@dataclasses.dataclass(frozen=True)
class DPOExperiment:
    """`polmjax dpo experiments/dpo/<name>.py`: a preference loss on prompt/chosen/rejected data.

    loss: a `polmjax.losses.PREFERENCE_LOSSES` name (TRL's `loss_type`s, plus simpo and orpo).
    loss_kwargs: the loss's other hyperparameters by name (label_smoothing, gamma, tau, delta).
    nll_weight: weight of the chosen responses' token-mean NLL (RPO's rpo_alpha; 1 for ORPO as in its paper).
    reference: "auto" = the LoRA base with the adapters off for LoRA runs (no copy), else "copy" (a
      frozen copy of the initial policy, sharded like it); "precomputed": the initial model's log-probs
      computed once over the data and cached in run_dir/reference_logps (`polmjax.train.reference`;
      one process); "none" for reference-free losses.
    """

    model: ModelSource
    data: DataConfig
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    lora: LoraConfig | None = None
    loss: str = "sigmoid"
    beta: float = 0.1
    loss_kwargs: dict = dataclasses.field(default_factory=dict)
    nll_weight: float = 0.0
    reference: str = "auto"

    def validate(self):
        if self.loss not in PREFERENCE_LOSSES:
            raise ValueError(f"loss={self.loss!r}: expected one of {', '.join(sorted(PREFERENCE_LOSSES))}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference={self.reference!r}: expected one of {', '.join(REFERENCES)}")
        if self.reference == "base" and self.lora is None:
            raise ValueError("reference='base' is the LoRA base with the adapters off; it needs lora (or use 'copy')")
        allowed = set(inspect.signature(PREFERENCE_LOSSES[self.loss]).parameters) & set(HYPERPARAMETERS)
        unknown = set(self.loss_kwargs) - allowed
        if unknown:
            raise ValueError(f"loss_kwargs {sorted(unknown)}: loss {self.loss!r} takes {sorted(allowed - {'beta'})}")
        if not _needs_reference(self.loss) and self.reference == "precomputed":
            raise ValueError(f"loss={self.loss!r} uses no reference model; reference='precomputed' has nothing to do")
        if _needs_reference(self.loss) and self.reference == "none":
            raise ValueError(f"loss={self.loss!r} needs a reference model; reference='none' is for simpo / orpo")
        if self.train.eval_every and not self.data.eval_fraction:
            raise ValueError("train.eval_every > 0 needs data.eval_fraction > 0 (a held-out split)")


def run(exp: DPOExperiment, *, allow_config_change: bool = False) -> LoopResult:
    """`polmjax dpo`: the shared run (`polmjax.train.run`) with the DPO algorithm."""
    return run_lib.run(exp, ALGORITHM, allow_config_change=allow_config_change)


def pipeline(exp: DPOExperiment, data_cfg: DataConfig, tokenizer, split: str) -> PreferencePipeline:
    kw = dict(global_batch=exp.train.global_batch, seq_len=exp.train.seq_len, split=split,
              process_index=jax.process_index(), process_count=jax.process_count())
    if exp.reference == "precomputed":
        mesh = make_mesh(exp.mesh.data, exp.mesh.fsdp, exp.mesh.tensor)
        cache = reference_lib.reference_logps(exp, data_cfg, tokenizer, split, mesh)
        return reference_lib.ReferencePipeline(data_cfg, tokenizer, ref_logps=cache, **kw)
    return PreferencePipeline(data_cfg, tokenizer, **kw)


def batch_keys(exp: DPOExperiment) -> tuple[str, ...]:
    return (*BATCH_KEYS, "ref_logps") if exp.reference == "precomputed" else BATCH_KEYS


def frozen_inputs(exp: DPOExperiment, trainable: dict, base: dict) -> dict:
    """The step's `frozen` argument: the LoRA base and the reference (None when the loss needs none)."""
    kind = exp.reference
    if kind == "auto":
        kind = "none" if not _needs_reference(exp.loss) else "base" if exp.lora else "copy"
    reference = None if kind in ("none", "precomputed") else reference_params(trainable, base, lora=kind == "base")
    return {"base": base, "reference": reference}


def jit_step(exp: DPOExperiment, model_cfg, optimizer, schedule, mesh, state_shardings, frozen_shardings,
             batch_shardings):
    step = functools.partial(dpo_step, model_cfg=model_cfg, optimizer=optimizer, loss=exp.loss, beta=exp.beta,
                             loss_kwargs=dict(exp.loss_kwargs), nll_weight=exp.nll_weight,
                             pairs_per_row=pairs_per_row(exp.train.seq_len), schedule=schedule,
                             grad_accum=exp.train.grad_accum, mesh=mesh)
    return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))


def eval_sums(exp: DPOExperiment, model_cfg, mesh):
    """(params, frozen, batch) -> sums over the batch's pairs of the loss and TRL's reward metrics."""

    def sums(params, frozen, batch):
        terms = PairTerms(model_cfg, exp.loss, exp.beta, dict(exp.loss_kwargs), pairs_per_row(exp.train.seq_len),
                          reference=frozen["reference"], precomputed="ref_logps" in batch, mesh=mesh)
        loss_BP, valid_BP, metrics_BP, _ = terms(combine_params(params, frozen["base"]), batch)
        out = {k: (v * valid_BP).sum() for k, v in metrics_BP.items()}
        return {**out, "loss": loss_BP.sum(), "pairs": valid_BP.sum()}

    return sums


def eval_metrics(sums: dict) -> dict:
    """Held-out means per pair: loss, rewards/accuracies (the preference accuracy), margins, log-probs."""
    n = max(sums["pairs"], 1.0)
    return {**{k: v / n for k, v in sums.items() if k != "pairs"}, "pairs": sums["pairs"]}


def _needs_reference(loss: str) -> bool:
    return any(name.startswith("ref_") for name in inspect.signature(PREFERENCE_LOSSES[loss]).parameters)


ALGORITHM = run_lib.Algorithm(
    name="dpo", batch_keys=batch_keys, pipeline=pipeline, jit_step=jit_step, eval_sums=eval_sums,
    eval_metrics=eval_metrics, frozen=frozen_inputs,
    toy_data={"toy:preference": ("preference", toy.write_toy_preference_dataset)},
)
