"""KTO (Ethayarajh et al. 2024) and unpaired APO-zero: the pure step over packed unpaired batches.

    state, metrics = kto_step(state, frozen, batch, model_cfg=cfg, optimizer=opt, loss="kto", beta=0.1,
                              slots_per_row=pairs_per_row(seq_len))

`batch` is a `polmjax.data.UnpairedPipeline` batch. For "kto" (kl_pairs=True) each example is two
segments of one row: 2k+1 = prompt + its completion, 2k+2 = the same prompt + a mismatched completion
(the KL baseline), so `pair_sums` gives (example, KL) log-prob sums per slot; "apo_zero_unpaired" has
no KL term and one segment per example. The loss is an entry of `polmjax.losses.KTO_LOSSES` (TRL's
`KTOConfig.loss_type`), and `frozen = {"base": LoRA base or {}, "reference": reference parameters}` as
in `polmjax.train.dpo`.

Exact accumulation. Every example weighs 1 / (valid examples in the global batch), fixed before the
batch is split (`polmjax.train.step.update`). KTO's reference point z = max(mean over the batch of
(policy - reference) KL-sequence log-prob sums, 0) is a no-gradient function of the WHOLE batch (TRL:
the per-device batch, gathered over processes, kto_trainer.py:1442-1444), so it must be known before
any micro-batch's loss. With grad_accum = 1 the step takes it from the policy's own forward (the KL
segments ride in the same rows, stop-gradient). With grad_accum > 1 a first pass over the micro-batches
(`lax.map`, no gradient) runs the policy and reference forwards, z is averaged over the global batch,
and `update` then runs only the policy forward and backward; the reference's per-slot sums from that
pass are handed on, so the reference still runs once. Dropout (LoRA dropout) is off in that first
pass. Both paths give the same numbers (tested). Cost, in forward-pass units of one example's tokens
(backward = 2): TRL 6 (policy KL forward 1, policy example forward + backward 3, reference 2); here 8
with grad_accum = 1 (the KL tokens also go through the backward, where their gradient is zero: the
price of one dense packed layout) and 10 with grad_accum > 1 (plus the first policy pass).

Metrics use TRL's KTOTrainer names: `kl`, `rewards/chosen` and `logps/chosen` (means over desirable
examples), `rewards/rejected` and `logps/rejected` (over undesirable ones), `rewards/margins`. Not
logged: TRL's `logits/*` and `entropy` (they need the full-vocabulary logits, which polmjax never
materialises). Added: `rewards/accuracies`, the fraction of examples whose implicit reward
β (policy − reference) has their label's sign (> 0 desirable, < 0 undesirable), and the counts.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import optax

from polmjax.data import DataConfig, UnpairedPipeline, examples_per_row, pairs_per_row, toy
from polmjax.losses import KTO_LOSSES
from polmjax.losses.segments import pair_sums, sequence_sums
from polmjax.models.config import LoraConfig, ModelConfig
from polmjax.models.decoder import forward_hidden, target_logprobs
from polmjax.models.lora import has_adapters
from polmjax.train import run as run_lib
from polmjax.train.dpo import reference_params
from polmjax.train.config import MeshConfig, ModelSource, TrainConfig
from polmjax.train.loop import LoopResult
from polmjax.train.optim import OptimConfig
from polmjax.train.state import TrainState, combine_params
from polmjax.train.step import update

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids", "desirable")


def kto_step(state: TrainState, frozen: dict, batch: dict, *, model_cfg: ModelConfig,
             optimizer: optax.GradientTransformation, loss: str = "kto", beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, slots_per_row: int,
             schedule: optax.Schedule | None = None, grad_accum: int = 1, mesh=None,
             rules=None) -> tuple[TrainState, dict]:
    """One optimizer update of an unpaired loss on a global batch (keys `BATCH_KEYS`, [B, T] each).

    slots_per_row: pairs_per_row(seq_len) for "kto" (example + KL segments), examples_per_row(seq_len)
    for "apo_zero_unpaired"; `slots_per_row(loss, seq_len)` gives it.
    """
    terms = ExampleTerms(model_cfg, loss, beta, desirable_weight, undesirable_weight, slots_per_row,
                         reference=frozen.get("reference"), mesh=mesh, rules=rules)
    valid_BS, desirable_BS = terms.slots(batch)
    n = jnp.maximum(valid_BS.sum(), 1.0)
    chosen_BS, rejected_BS = valid_BS * desirable_BS, valid_BS * (1.0 - desirable_BS)
    n_d, n_u = chosen_BS.sum(), rejected_BS.sum()
    micro = dict(batch, desirable_BS=desirable_BS, weight_BS=valid_BS / n,
                 chosen_BS=chosen_BS / jnp.maximum(n_d, 1.0), rejected_BS=rejected_BS / jnp.maximum(n_u, 1.0))
    z = None
    if grad_accum > 1:  # the first pass: reference sums for every slot, and z over the global batch
        policy = combine_params(state.params, frozen.get("base", {}))
        first = _micro_map(lambda mb: terms.first_pass(policy, mb), batch, grad_accum)
        micro.update(ref_BS=first["ref"])
        if terms.kl:
            z = ((first["kl"] - first["ref_kl"]) * valid_BS).sum() / n
    dropout = model_cfg.lora is not None and model_cfg.lora.dropout > 0

    def micro_loss(params, mb, rng):
        lp_BT = terms.logprobs(terms.model_cfg, params, mb, rng if dropout else None)
        policy_BS, kl_BS = terms.sums(lp_BT, mb)
        if "ref_BS" in mb:
            ref_BS = mb["ref_BS"]
        else:
            ref_lp_BT = jax.lax.stop_gradient(terms.logprobs(terms.ref_cfg, terms.reference, mb))
            ref_BS, ref_kl_BS = terms.sums(ref_lp_BT, mb)
        metrics = {}
        z_mb = z
        if terms.kl and z_mb is None:  # grad_accum == 1: this micro-batch is the global batch
            z_mb = jax.lax.stop_gradient(((kl_BS - ref_kl_BS) * mb["weight_BS"]).sum())
            metrics["kl"] = jnp.maximum(z_mb, 0.0)
        loss_BS, metrics_BS = terms(policy_BS, ref_BS, mb["desirable_BS"], z_mb)
        metrics.update(_weighted(metrics_BS, mb))
        return (loss_BS * mb["weight_BS"]).sum(), metrics

    state, metrics = update(state, frozen.get("base", {}), micro, micro_loss=micro_loss, optimizer=optimizer,
                            grad_accum=grad_accum, schedule=schedule)
    if z is not None:
        metrics["kl"] = jnp.maximum(z, 0.0)
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return state, {**metrics, "examples": valid_BS.sum(), "desirable": n_d, "undesirable": n_u}


class ExampleTerms:
    """What training and held-out evaluation share: per-slot log-prob sums, the per-example loss and
    TRL's per-example metrics. Slots are [B, S] arrays (S = slots_per_row)."""

    def __init__(self, model_cfg: ModelConfig, loss: str, beta: float, desirable_weight: float,
                 undesirable_weight: float, slots_per_row: int, *, reference=None, mesh=None, rules=None):
        if loss not in KTO_LOSSES:
            raise ValueError(f"loss={loss!r}; expected one of {', '.join(sorted(KTO_LOSSES))}")
        if reference is None:
            raise ValueError(f"loss {loss!r} needs a reference model; frozen['reference'] is None")
        self.fn, self.kl = KTO_LOSSES[loss], needs_kl(loss)
        self.model_cfg, self.reference, self.beta, self.slots_per_row = model_cfg, reference, beta, slots_per_row
        self.ref_cfg = model_cfg if has_adapters(reference) else model_cfg.replace(lora=None)
        self.kwargs = {"beta": beta, "desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight}
        self.mesh, self.rules = mesh, rules

    def logprobs(self, cfg, params, mb, dropout_rng=None):
        hidden_BTD, _ = forward_hidden(cfg, params, mb["input_ids"], mb["positions"], mb["segment_ids"],
                                       mesh=self.mesh, rules=self.rules, dropout_rng=dropout_rng)
        return target_logprobs(cfg, params, hidden_BTD, mb["targets"], mesh=self.mesh)

    def sums(self, values_BT, mb):
        """(example_BS, kl_BS): per-slot sums of values over the completion tokens (kl_BS None without KL)."""
        if self.kl:
            return pair_sums(values_BT, mb["segment_ids"], mb["loss_mask"], self.slots_per_row)
        return sequence_sums(values_BT, mb["segment_ids"], mb["loss_mask"], self.slots_per_row + 1)[:, 1:], None

    def slots(self, mb):
        """(valid_BS, desirable_BS) as float32: the slot holds an example; the example is desirable."""
        count_BS, _ = self.sums(jnp.ones(mb["loss_mask"].shape, jnp.float32), mb)
        ones_BT = jnp.ones(mb["loss_mask"].shape, jnp.float32)
        if self.kl:
            label_BS, _ = pair_sums(mb["desirable"], mb["segment_ids"], ones_BT, self.slots_per_row)
        else:
            label_BS = sequence_sums(mb["desirable"], mb["segment_ids"], ones_BT, self.slots_per_row + 1)[:, 1:]
        return (count_BS > 0).astype(jnp.float32), (label_BS > 0).astype(jnp.float32)

    def first_pass(self, policy, mb) -> dict:
        """No-gradient per-slot sums of a micro-batch: reference (example, KL) and the policy's KL."""
        ref_BS, ref_kl_BS = self.sums(self.logprobs(self.ref_cfg, self.reference, mb), mb)
        out = {"ref": ref_BS}
        if self.kl:
            _, kl_BS = self.sums(self.logprobs(self.model_cfg, policy, mb), mb)
            out.update(kl=kl_BS, ref_kl=ref_kl_BS)
        return jax.lax.stop_gradient(out)

    def __call__(self, policy_BS, ref_BS, desirable_BS, z=None):
        """(loss_BS, metrics_BS): the per-example loss with reference point z, and TRL's metrics per example."""
        desirable = desirable_BS > 0
        extra = {"kl": z} if self.kl else {}
        loss_BS = self.fn(policy_BS, ref_BS, desirable, **extra, **self.kwargs)
        reward_BS = jax.lax.stop_gradient(self.beta * (policy_BS - ref_BS))
        correct = jnp.where(desirable, reward_BS > 0, reward_BS < 0).astype(jnp.float32)
        return loss_BS, {"reward": reward_BS, "logp": jax.lax.stop_gradient(policy_BS), "correct": correct}


def needs_kl(loss: str) -> bool:
    """Whether a KTO_LOSSES entry takes the KL reference point (its batches then carry KL sequences)."""
    return "kl" in inspect.signature(KTO_LOSSES[loss]).parameters


def slots_per_row(loss: str, seq_len: int) -> int:
    """Example slots per row of the loss's batch layout (module docstring)."""
    return pairs_per_row(seq_len) if needs_kl(loss) else examples_per_row(seq_len)


def _weighted(metrics_BS: dict, mb: dict) -> dict:
    """Metric sums whose totals over the micro-batches are the global means (TRL's reductions)."""
    return {"rewards/chosen": (metrics_BS["reward"] * mb["chosen_BS"]).sum(),
            "rewards/rejected": (metrics_BS["reward"] * mb["rejected_BS"]).sum(),
            "logps/chosen": (metrics_BS["logp"] * mb["chosen_BS"]).sum(),
            "logps/rejected": (metrics_BS["logp"] * mb["rejected_BS"]).sum(),
            "rewards/accuracies": (metrics_BS["correct"] * mb["weight_BS"]).sum()}


def _micro_map(fn, batch: dict, grad_accum: int):
    """fn over the grad_accum micro-batches in sequence (lax.map: one micro-batch's activations live at
    a time), outputs concatenated back along the batch axis."""
    B = batch["input_ids"].shape[0]
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, B // grad_accum, *x.shape[1:]), batch)
    out = jax.lax.map(fn, micro)
    return jax.tree.map(lambda x: x.reshape(B, *x.shape[2:]), out)


# ----------------------------------------------------------------------------------------------
# The experiment and the algorithm the shared run (polmjax.train.run) needs

REFERENCES = ("auto", "copy", "base")


@dataclasses.dataclass(frozen=True)
class KTOExperiment:
    """`polmjax kto experiments/kto/<name>.py`: an unpaired loss on prompt/completion/label data.

    loss: "kto" (Ethayarajh et al. 2024; estimates the KL reference point from mismatched pairs) or
      "apo_zero_unpaired" (D'Oosterlinck et al. 2024; no KL term): TRL's KTOConfig.loss_type.
    beta, desirable_weight, undesirable_weight: TRL's KTOConfig fields of the same names (the KTO
      paper suggests weights with w_d n_d / (w_u n_u) in [1, 4/3] for n_d desirable, n_u undesirable).
    reference: "auto" = the LoRA base with the adapters off for LoRA runs (no copy), else "copy" (a
      frozen copy of the initial policy, sharded like it).
    """

    model: ModelSource
    data: DataConfig
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    lora: LoraConfig | None = None
    loss: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference: str = "auto"

    def validate(self):
        if self.loss not in KTO_LOSSES:
            raise ValueError(f"loss={self.loss!r}: expected one of {', '.join(sorted(KTO_LOSSES))}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference={self.reference!r}: expected one of {', '.join(REFERENCES)}")
        if self.reference == "base" and self.lora is None:
            raise ValueError("reference='base' is the LoRA base with the adapters off; it needs lora (or use 'copy')")
        if self.beta <= 0 or self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ValueError(f"beta={self.beta} must be > 0 and desirable_weight={self.desirable_weight}, "
                             f"undesirable_weight={self.undesirable_weight} >= 0")
        if needs_kl(self.loss) and self.train.global_batch < 2:
            raise ValueError(f"loss={self.loss!r} estimates the KL term from mismatched pairs within a batch: "
                             f"train.global_batch must be >= 2, got {self.train.global_batch}")
        if self.train.eval_every and not self.data.eval_fraction:
            raise ValueError("train.eval_every > 0 needs data.eval_fraction > 0 (a held-out split)")


def run(exp: KTOExperiment, *, allow_config_change: bool = False) -> LoopResult:
    """`polmjax kto`: the shared run (`polmjax.train.run`) with the KTO algorithm."""
    return run_lib.run(exp, ALGORITHM, allow_config_change=allow_config_change)


def pipeline(exp: KTOExperiment, data_cfg: DataConfig, tokenizer, split: str) -> UnpairedPipeline:
    return UnpairedPipeline(data_cfg, tokenizer, global_batch=exp.train.global_batch, seq_len=exp.train.seq_len,
                            split=split, process_index=jax.process_index(), process_count=jax.process_count(),
                            kl_pairs=needs_kl(exp.loss))


def frozen_inputs(exp: KTOExperiment, trainable: dict, base: dict) -> dict:
    """The step's `frozen` argument: the LoRA base, and the reference (the base itself for LoRA runs with
    reference auto/base; else a copy of the whole initial policy)."""
    lora = exp.reference == "base" or (exp.reference == "auto" and exp.lora is not None)
    return {"base": base, "reference": reference_params(trainable, base, lora=lora)}


def jit_step(exp: KTOExperiment, model_cfg, optimizer, schedule, mesh, state_shardings, frozen_shardings,
             batch_shardings):
    step = functools.partial(kto_step, model_cfg=model_cfg, optimizer=optimizer, loss=exp.loss, beta=exp.beta,
                             desirable_weight=exp.desirable_weight, undesirable_weight=exp.undesirable_weight,
                             slots_per_row=slots_per_row(exp.loss, exp.train.seq_len), schedule=schedule,
                             grad_accum=exp.train.grad_accum, mesh=mesh)
    return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))


def eval_sums(exp: KTOExperiment, model_cfg, mesh):
    """(params, frozen, batch) -> sums over one held-out batch: the loss (z from this batch, as TRL's
    evaluation does per batch), the KL log-ratio, rewards, log-probs and sign accuracy, and the counts."""

    def sums(params, frozen, batch):
        terms = ExampleTerms(model_cfg, exp.loss, exp.beta, exp.desirable_weight, exp.undesirable_weight,
                             slots_per_row(exp.loss, exp.train.seq_len), reference=frozen["reference"], mesh=mesh)
        valid_BS, desirable_BS = terms.slots(batch)
        policy_BS, kl_BS = terms.sums(terms.logprobs(model_cfg, combine_params(params, frozen["base"]), batch), batch)
        ref_BS, ref_kl_BS = terms.sums(terms.logprobs(terms.ref_cfg, terms.reference, batch), batch)
        out = {"examples": valid_BS.sum(), "desirable": (valid_BS * desirable_BS).sum()}
        z = None
        if terms.kl:
            out["kl_logratio"] = ((kl_BS - ref_kl_BS) * valid_BS).sum()
            z = out["kl_logratio"] / jnp.maximum(out["examples"], 1.0)
        loss_BS, m = terms(policy_BS, ref_BS, desirable_BS, z)
        chosen_BS, rejected_BS = valid_BS * desirable_BS, valid_BS * (1.0 - desirable_BS)
        return {**out, "loss": (loss_BS * valid_BS).sum(), "rewards/accuracies": (m["correct"] * valid_BS).sum(),
                "rewards/chosen": (m["reward"] * chosen_BS).sum(), "rewards/rejected": (m["reward"] * rejected_BS).sum(),
                "logps/chosen": (m["logp"] * chosen_BS).sum(), "logps/rejected": (m["logp"] * rejected_BS).sum()}

    return sums


def eval_metrics(sums: dict) -> dict:
    """Held-out means: loss, kl (max(mean KL log-ratio, 0) over all held-out examples), rewards/accuracies
    (labels' sign), rewards and log-probs per desirable / undesirable example, and the counts."""
    n, n_d = max(sums["examples"], 1.0), sums["desirable"]
    n_u = sums["examples"] - n_d
    out = {"loss": sums["loss"] / n, "rewards/accuracies": sums["rewards/accuracies"] / n,
           "examples": sums["examples"], "desirable": n_d, "undesirable": n_u}
    for kind, count in (("chosen", n_d), ("rejected", n_u)):
        for name in ("rewards", "logps"):
            out[f"{name}/{kind}"] = sums[f"{name}/{kind}"] / max(count, 1.0)
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    if "kl_logratio" in sums:
        out["kl"] = max(sums["kl_logratio"] / n, 0.0)
    return out


ALGORITHM = run_lib.Algorithm(
    name="kto", batch_keys=BATCH_KEYS, pipeline=pipeline, jit_step=jit_step, eval_sums=eval_sums,
    eval_metrics=eval_metrics, frozen=frozen_inputs,
    toy_data={"toy:unpaired": ("unpaired", toy.write_toy_preference_dataset)},
)
