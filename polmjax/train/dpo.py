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
can be the base itself with the adapters off (`reference_params(...)`): no copy at all.

Every pair weighs 1 / (pairs in the global batch), fixed before the batch is split into micro-batches
(`polmjax.train.step.update`), so gradient accumulation is exact. Metrics use TRL's names.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import optax

from polmjax.losses import PREFERENCE_LOSSES, implicit_rewards, sft_loss
from polmjax.losses.segments import pair_sums
from polmjax.models.config import ModelConfig
from polmjax.models.decoder import forward_hidden, target_logprobs
from polmjax.train.state import TrainState
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
    fn = PREFERENCE_LOSSES[loss]
    reference = frozen.get("reference")
    needs_reference = any(name.startswith("ref_") for name in inspect.signature(fn).parameters)
    if needs_reference and reference is None:
        raise ValueError(f"loss {loss!r} needs a reference model; frozen['reference'] is None")
    ref_cfg = model_cfg.replace(lora=None) if reference is not None and not _has_lora(reference) else model_cfg
    kwargs = {"beta": beta, **(loss_kwargs or {})}
    kwargs = {k: v for k, v in kwargs.items() if k in inspect.signature(fn).parameters}

    n_c, n_r = pair_sums(jnp.ones(batch["loss_mask"].shape, jnp.float32), batch["segment_ids"],
                         batch["loss_mask"], pairs_per_row)
    pair_weight = 1.0 / jnp.maximum(((n_c > 0) & (n_r > 0)).sum(), 1).astype(jnp.float32)
    chosen_mask = batch["loss_mask"].astype(jnp.float32) * batch["is_chosen"]
    micro = dict(batch, nll_weights=chosen_mask / jnp.maximum(chosen_mask.sum(), 1.0))

    def logprobs(cfg, params, mb, dropout_rng=None):
        hidden_BTD, _ = forward_hidden(cfg, params, mb["input_ids"], mb["positions"], mb["segment_ids"],
                                       mesh=mesh, rules=rules, dropout_rng=dropout_rng)
        return target_logprobs(cfg, params, hidden_BTD, mb["targets"], mesh=mesh)

    def micro_loss(params, mb, rng):
        dropout = model_cfg.lora is not None and model_cfg.lora.dropout > 0
        lp_BT = logprobs(model_cfg, params, mb, rng if dropout else None)
        seqs = _sequence_logprobs(lp_BT, mb, pairs_per_row, "")
        if needs_reference:
            seqs.update(_sequence_logprobs(jax.lax.stop_gradient(logprobs(ref_cfg, reference, mb)), mb,
                                           pairs_per_row, "ref_"))
        valid_BP = seqs.pop("valid")
        args = {name: seqs[name] for name in inspect.signature(fn).parameters if name in seqs}
        per_pair_BP = fn(**args, **kwargs)
        w_BP = valid_BP * pair_weight
        total = (per_pair_BP * w_BP).sum()
        metrics = {"logps/chosen": (seqs["chosen"] * w_BP).sum(), "logps/rejected": (seqs["rejected"] * w_BP).sum()}
        if needs_reference:
            r_c, r_r = implicit_rewards(seqs["chosen"], seqs["rejected"], seqs["ref_chosen"], seqs["ref_rejected"],
                                        beta)
            metrics.update({"rewards/chosen": (r_c * w_BP).sum(), "rewards/rejected": (r_r * w_BP).sum(),
                            "rewards/accuracies": ((r_c > r_r) * w_BP).sum(),
                            "rewards/margins": ((r_c - r_r) * w_BP).sum()})
        if nll_weight:
            nll = sft_loss(lp_BT, mb["nll_weights"]).sum()
            metrics["nll"] = nll
            total = total + nll_weight * nll
        return total, metrics

    state, metrics = update(state, frozen.get("base", {}), micro, micro_loss=micro_loss, optimizer=optimizer,
                            grad_accum=grad_accum, schedule=schedule)
    return state, {**metrics, "pairs": 1.0 / pair_weight}


def reference_params(trainable: dict, base: dict, lora: bool) -> dict:
    """The reference model's parameters at the start: the LoRA base with the adapters off (the same
    arrays, no copy), or a copy of the initial policy for full fine-tuning."""
    if lora:
        return base
    return jax.tree.map(jnp.copy, trainable)


def _sequence_logprobs(lp_BT, mb, pairs_per_row: int, prefix: str) -> dict:
    """{chosen, rejected, chosen_avg, rejected_avg} [B, P] (names prefixed), and `valid` slots."""
    chosen, rejected = pair_sums(lp_BT, mb["segment_ids"], mb["loss_mask"], pairs_per_row)
    n_c, n_r = pair_sums(jnp.ones(lp_BT.shape, jnp.float32), mb["segment_ids"], mb["loss_mask"], pairs_per_row)
    out = {f"{prefix}chosen": chosen, f"{prefix}rejected": rejected,
           f"{prefix}chosen_avg": chosen / jnp.maximum(n_c, 1.0), f"{prefix}rejected_avg": rejected / jnp.maximum(n_r, 1.0)}
    if not prefix:
        out["valid"] = ((n_c > 0) & (n_r > 0)).astype(jnp.float32)
    return out


def _has_lora(params: dict) -> bool:
    return any(k.endswith(("_lora_a", "_lora_b")) for k in params.get("layers", {}))
