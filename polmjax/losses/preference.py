"""Preference losses (DPO family, SimPO, ORPO, KTO): small pure functions over per-sequence log-probs.

Every input is a float32 [B] log-prob of a completion given its prompt, summed over the completion
tokens; an argument named `*_avg` is the per-token mean instead (the sum over the number of completion
tokens). `ref_*` are the frozen reference model's, over the same tokens. Each loss returns per-pair
(KTO: per-example) losses [B] float32 and leaves the reduction, a mean over the global batch, to the
caller. With the policy-minus-reference log-ratios of the chosen and rejected completions,

    Δ = (chosen − ref_chosen) − (rejected − ref_rejected),

and β the inverse temperature (TRL's `beta`). `PREFERENCE_LOSSES` maps TRL's `DPOConfig.loss_type`
names (plus CPO's "simpo" and "orpo") to the functions and `KTO_LOSSES` maps `KTOConfig.loss_type`'s;
the argument names are the contract: a trainer passes each function the log-probs it names and the
hyperparameters it takes. A new loss is one function and one entry. TRL's "sft" loss type (RPO,
MPO) is a token-level NLL, not a per-pair loss: see `combine`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dpo(chosen, rejected, ref_chosen, ref_rejected, *, beta, label_smoothing=0.0):
    """DPO (Rafailov et al. 2023, arXiv:2305.18290); ε > 0 is conservative DPO (cDPO, Mitchell 2023).

        L = −(1−ε) log σ(βΔ) − ε log σ(−βΔ)

    TRL "sigmoid". TRL 1.16 ignores `label_smoothing` there (plain DPO, dpo_trainer.py:1387-1388);
    ε > 0 is the cDPO of earlier TRL releases.
    """
    z = beta * _delta(chosen, rejected, ref_chosen, ref_rejected)
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def robust_dpo(chosen, rejected, ref_chosen, ref_rejected, *, beta, label_smoothing):
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409), unbiased under label flips with rate ε < 1/2.

        L = (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε)

    TRL "robust".
    """
    z = beta * _delta(chosen, rejected, ref_chosen, ref_rejected)
    clean = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z)
    return (clean + label_smoothing * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * label_smoothing)


def ipo(chosen_avg, rejected_avg, ref_chosen_avg, ref_rejected_avg, *, beta):
    """IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17; β is the paper's τ).

        L = (Δ̄ − 1/(2β))²

    with Δ̄ the Δ of per-token mean log-probs, as TRL "ipo" (dpo_trainer.py:1393-1404): TRL divides
    each summed policy−reference log-ratio by its completion's token count (at least 1), which is the
    log-ratio of the `_avg` inputs when the reference is averaged over the same tokens.
    """
    return (_delta(chosen_avg, rejected_avg, ref_chosen_avg, ref_rejected_avg) - 1.0 / (2.0 * beta)) ** 2


def hinge(chosen, rejected, ref_chosen, ref_rejected, *, beta):
    """SLiC-HF hinge loss (Zhao et al. 2023, arXiv:2305.10425) on the DPO margin.

        L = max(0, 1 − βΔ)

    TRL "hinge".
    """
    return jax.nn.relu(1.0 - beta * _delta(chosen, rejected, ref_chosen, ref_rejected))


def exo_pair(chosen, rejected, ref_chosen, ref_rejected, *, beta, label_smoothing):
    """EXO-pref (Ji et al. 2024, arXiv:2402.00856, Eq. 16): KL(q ‖ p) over the pair, with
    q = (σ(βΔ), σ(−βΔ)) and the smoothed label p = (1−ε, ε), ε > 0 (the paper recommends 1e-3).

        L = σ(βΔ) (log σ(βΔ) − log(1−ε)) + σ(−βΔ) (log σ(−βΔ) − log ε)

    TRL "exo_pair".
    """
    if not label_smoothing > 0.0:
        raise ValueError(f"exo_pair: label_smoothing must be > 0 (the paper uses 1e-3), got {label_smoothing}")
    z = beta * _delta(chosen, rejected, ref_chosen, ref_rejected)
    win = jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-label_smoothing))
    return win + jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - jnp.log(label_smoothing))


def nca_pair(chosen, rejected, ref_chosen, ref_rejected, *, beta):
    """NCA (Chen et al. 2024, arXiv:2402.05369), pairwise, with rewards r = β (policy − ref):

        L = −log σ(r_c) − ½ log σ(−r_c) − ½ log σ(−r_r)

    TRL "nca_pair".
    """
    r_c, r_r = (beta * x for x in _logratios(chosen, rejected, ref_chosen, ref_rejected))
    return -jax.nn.log_sigmoid(r_c) - 0.5 * jax.nn.log_sigmoid(-r_c) - 0.5 * jax.nn.log_sigmoid(-r_r)


def bco_pair(chosen, rejected, ref_chosen, ref_rejected, *, beta, delta=0.0):
    """BCO (Jung et al. 2024, arXiv:2404.04656), pairwise: a binary classifier of chosen vs rejected
    on the rewards r = β (policy − ref), shifted by δ.

        L = −log σ(r_c − δ) − log σ(−(r_r − δ))

    δ is the paper's running mean of the rewards, state the trainer keeps outside the loss (a constant
    here). TRL 1.16 "bco_pair" uses δ = 0 (dpo_trainer.py:1433-1436), the default; earlier TRL kept
    the running mean.
    """
    r_c, r_r = (beta * x for x in _logratios(chosen, rejected, ref_chosen, ref_rejected))
    return -jax.nn.log_sigmoid(r_c - delta) - jax.nn.log_sigmoid(-(r_r - delta))


def sppo_hard(chosen, rejected, ref_chosen, ref_rejected, *, beta):
    """SPPO (Wu et al. 2024, arXiv:2405.00675, Eq. 4.7) with hard win probabilities (1 for chosen, 0 for
    rejected): squared distances of the log-ratios from ±1/(2β).

        L = (chosen − ref_chosen − 1/(2β))² + (rejected − ref_rejected + 1/(2β))²

    TRL "sppo_hard".
    """
    lr_c, lr_r = _logratios(chosen, rejected, ref_chosen, ref_rejected)
    return (lr_c - 0.5 / beta) ** 2 + (lr_r + 0.5 / beta) ** 2


def aot(chosen, rejected, ref_chosen, ref_rejected, *, beta, label_smoothing=0.0):
    """AOT, paired (Melnyk et al. 2024, arXiv:2406.05882): DPO's loss on the sorted batch quantiles,
    d = sort(chosen − rejected) − sort(ref_chosen − ref_rejected).

        L_i = −(1−ε) log σ(β d_i) − ε log σ(−β d_i)

    TRL "aot". The i-th loss belongs to the i-th quantile, not to pair i; only the mean means anything,
    and it equals TRL's only when the sort sees the whole batch (one micro-batch).
    """
    d = jnp.sort(_f32(chosen) - _f32(rejected)) - jnp.sort(_f32(ref_chosen) - _f32(ref_rejected))
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * d) - label_smoothing * jax.nn.log_sigmoid(-beta * d)


def aot_unpaired(chosen, rejected, ref_chosen, ref_rejected, *, beta, label_smoothing=0.0):
    """AOT, unpaired (Melnyk et al. 2024, arXiv:2406.05882): the chosen and rejected log-ratio
    distributions compared by quantile, d = sort(chosen − ref_chosen) − sort(rejected − ref_rejected).

        L_i = −(1−ε) log σ(β d_i) − ε log σ(−β d_i)

    TRL "aot_unpaired" (older TRL's "aot_pair"). Per quantile, as `aot`.
    """
    lr_c, lr_r = _logratios(chosen, rejected, ref_chosen, ref_rejected)
    d = jnp.sort(lr_c) - jnp.sort(lr_r)
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * d) - label_smoothing * jax.nn.log_sigmoid(-beta * d)


def apo_zero(chosen, rejected, ref_chosen, ref_rejected, *, beta):
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7): raise chosen, lower rejected, for
    chosen outputs better than the model's own.

        L = 1 − σ(β (chosen − ref_chosen)) + σ(β (rejected − ref_rejected))

    TRL "apo_zero".
    """
    lr_c, lr_r = _logratios(chosen, rejected, ref_chosen, ref_rejected)
    return 1.0 - jax.nn.sigmoid(beta * lr_c) + jax.nn.sigmoid(beta * lr_r)


def apo_down(chosen, rejected, ref_chosen, ref_rejected, *, beta):
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8): lower both, rejected more, for
    chosen outputs worse than the model's own.

        L = σ(β (chosen − ref_chosen)) + 1 − σ(βΔ)

    TRL "apo_down".
    """
    lr_c, lr_r = _logratios(chosen, rejected, ref_chosen, ref_rejected)
    return jax.nn.sigmoid(beta * lr_c) + 1.0 - jax.nn.sigmoid(beta * (lr_c - lr_r))


def discopop(chosen, rejected, ref_chosen, ref_rejected, *, beta, tau=0.05):
    """DiscoPOP, the log-ratio modulated loss (Lu et al. 2024, arXiv:2406.08414, Eq. 5), with x = βΔ:

        L = (1 − σ(x/τ)) (−log σ(x)) + σ(x/τ) exp(−x)

    TRL "discopop" (`discopop_tau`, default 0.05). exp(−x) σ(x/τ) is computed as exp(−x + log σ(x/τ)),
    finite for very negative x where TRL's product overflows.
    """
    x = beta * _delta(chosen, rejected, ref_chosen, ref_rejected)
    mix = jax.nn.sigmoid(x / tau)
    return -(1.0 - mix) * jax.nn.log_sigmoid(x) + jnp.exp(jax.nn.log_sigmoid(x / tau) - x)


def sigmoid_norm(chosen_avg, rejected_avg, ref_chosen_avg, ref_rejected_avg, *, beta):
    """Length-normalised DPO (as in Tülu 3, Lambert et al. 2024, arXiv:2411.15124): DPO on the Δ̄ of
    per-token mean log-probs (TRL averages as for `ipo`).

        L = −log σ(βΔ̄)

    TRL "sigmoid_norm".
    """
    return -jax.nn.log_sigmoid(beta * _delta(chosen_avg, rejected_avg, ref_chosen_avg, ref_rejected_avg))


def simpo(chosen_avg, rejected_avg, *, beta, gamma):
    """SimPO (Meng et al. 2024, arXiv:2405.14734): no reference, per-token mean log-probs, margin γ.

        L = −log σ(β (chosen_avg − rejected_avg) − γ)

    TRL's CPOTrainer `loss_type="simpo"` (trl/experimental/cpo/cpo_trainer.py:715-722): γ is
    CPOConfig's `simpo_gamma`, which TRL divides by β before multiplying by β again (the SimPO
    repository's `gamma_beta_ratio` is γ/β). CPO-SimPO adds `cpo_alpha` × the chosen NLL in the trainer.
    """
    return -jax.nn.log_sigmoid(beta * (_f32(chosen_avg) - _f32(rejected_avg)) - gamma)


def orpo(chosen_avg, rejected_avg):
    """ORPO's odds-ratio term (Hong et al. 2024, arXiv:2403.07691, Eqs. 4 and 7), on per-token mean
    log-probs ℓ, with log-odds(ℓ) = ℓ − log(1 − exp(ℓ)):

        L = −log σ(log-odds(chosen_avg) − log-odds(rejected_avg))

    The trainer minimises NLL(chosen) + λ·L (TRL's ORPOConfig `beta` is λ; ORPOTrainer.odds_ratio_loss
    returns −λ·L). ℓ is capped at −(float32 eps): odds are infinite at ℓ = 0 and differences below the
    float32 resolution of a log-softmax are noise.
    """
    return -jax.nn.log_sigmoid(_log_odds(chosen_avg) - _log_odds(rejected_avg))


def kto(policy, ref, desirable, kl, *, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 7), per unpaired example, r = policy − ref:

        L = w_d (1 − σ(β (r − z)))   where desirable
        L = w_u (1 − σ(β (z − r)))   elsewhere

    with the reference point z = max(kl, 0) held constant (no gradient). The trainer estimates `kl`
    as the batch mean of policy − ref log-probs of mismatched prompt/completion pairs (completions
    shifted within the batch), as the paper and TRL's KTOTrainer do (kto_trainer.py:1442-1444).
    TRL KTOConfig `loss_type="kto"`.
    """
    r = _f32(policy) - _f32(ref)
    z = jax.lax.stop_gradient(jnp.maximum(_f32(kl), 0.0))
    return jnp.where(desirable, desirable_weight * (1.0 - jax.nn.sigmoid(beta * (r - z))),
                     undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z - r))))


def apo_zero_unpaired(policy, ref, desirable, *, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """APO-zero for unpaired data (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7), r = policy − ref:

        L = w_d (1 − σ(βr))   where desirable
        L = w_u σ(βr)          elsewhere

    TRL KTOConfig `loss_type="apo_zero_unpaired"`.
    """
    r = _f32(policy) - _f32(ref)
    return jnp.where(desirable, desirable_weight * (1.0 - jax.nn.sigmoid(beta * r)),
                     undesirable_weight * jax.nn.sigmoid(beta * r))


def implicit_rewards(chosen, rejected, ref_chosen, ref_rejected, beta):
    """DPO's implicit rewards (β (chosen − ref_chosen), β (rejected − ref_rejected)), no gradient.

    TRL logs their batch means as `rewards/chosen` and `rewards/rejected`, the mean of r_c > r_r as
    `rewards/accuracies` and the mean of r_c − r_r as `rewards/margins`.
    """
    lr_c, lr_r = _logratios(chosen, rejected, ref_chosen, ref_rejected)
    return jax.lax.stop_gradient(beta * lr_c), jax.lax.stop_gradient(beta * lr_r)


def combine(losses: dict[str, jax.Array], weights: dict[str, float] | None = None) -> jax.Array:
    """Weighted sum [B] of per-pair losses, TRL's `loss_type=[...]` with `loss_weights=[...]` (default 1).

    TRL sums weight × batch mean of each loss: the batch mean of this sum. MPO (Wang et al. 2024,
    arXiv:2411.10442) is {"sigmoid": 0.8, "bco_pair": 0.2} plus "sft" with weight 1. TRL's "sft" term
    (also RPO's NLL on chosen, Pang et al. 2024, arXiv:2404.19733: TRL 1.16's
    `loss_type=["sigmoid", "sft"]`, `loss_weights=[1, rpo_alpha]`) is not per pair: it is the mean
    negative log-likelihood over all chosen completion tokens of the batch (dpo_trainer.py:1495-1502),
    i.e. `sft_loss(chosen_logprobs_BT, token_weights(chosen_mask_BT)).sum()`, which the trainer adds,
    times its weight, to the batch mean of this sum.
    """
    weights = {name: 1.0 for name in losses} if weights is None else weights
    if set(weights) != set(losses):
        raise ValueError(f"combine: loss weights {sorted(weights)} do not match the losses {sorted(losses)}")
    return sum(weights[name] * _f32(loss) for name, loss in losses.items())


def dpo_offset(chosen, rejected, ref_chosen, ref_rejected, *, beta, gamma=0.0):
    """DPO with a target margin γ on the implicit reward (ODPO's offset, Amini et al. 2024,
    arXiv:2402.10571, with a constant offset instead of a per-pair one).

        L = −log σ(βΔ − γ)

    The README's "fork it" example of a new loss: this function and its entry below are all it takes.
    """
    return -jax.nn.log_sigmoid(beta * _delta(chosen, rejected, ref_chosen, ref_rejected) - gamma)


PREFERENCE_LOSSES = {
    "sigmoid": dpo,
    "robust": robust_dpo,
    "ipo": ipo,
    "hinge": hinge,
    "exo_pair": exo_pair,
    "nca_pair": nca_pair,
    "bco_pair": bco_pair,
    "sppo_hard": sppo_hard,
    "aot": aot,
    "aot_unpaired": aot_unpaired,
    "apo_zero": apo_zero,
    "apo_down": apo_down,
    "discopop": discopop,
    "sigmoid_norm": sigmoid_norm,
    "dpo_offset": dpo_offset,
    "simpo": simpo,
    "orpo": orpo,
}

KTO_LOSSES = {"kto": kto, "apo_zero_unpaired": apo_zero_unpaired}


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _logratios(chosen, rejected, ref_chosen, ref_rejected):
    return _f32(chosen) - _f32(ref_chosen), _f32(rejected) - _f32(ref_rejected)


def _delta(chosen, rejected, ref_chosen, ref_rejected):
    lr_c, lr_r = _logratios(chosen, rejected, ref_chosen, ref_rejected)
    return lr_c - lr_r


def _log_odds(avg_logprob):
    """log(p / (1 − p)) for p = exp(ℓ), with log(1 − exp(ℓ)) split at −ln 2 to avoid cancellation."""
    x = jnp.minimum(_f32(avg_logprob), -jnp.finfo(jnp.float32).eps)
    log1mexp = jnp.where(x < -jnp.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))
    return x - log1mexp
