"""Policy-gradient losses for RL on completions (GRPO family, PPO actor): per-token pure functions.

Inputs are per-token log-probs [B, T] of the completion tokens under the policy being trained
(`logps`, with gradient), under the policy that sampled them (`old_logps`, constants: the trainer's
log-probs at sampling time) and a loss mask [B, T] (1 on completion tokens that are trained). `adv_B`
is one advantage per completion (`polmjax.rl.advantages`). Every loss in `POLICY_LOSSES` has the
signature `(logps_BT, old_logps_BT, adv_B, mask_BT, **hyperparameters) -> (loss_BT, stats)`:

- `loss_BT` float32 [B, T], zero outside the mask: the per-token loss, reduced by the caller with
  `aggregation_weights` (DAPO token mean, GRPO sequence mean, Dr. GRPO constant normaliser);
- `stats` a dict of per-token float32 [B, T] indicators (0 outside the mask), e.g. `clip_low`: the
  caller reduces them with the token-mean weights, so fractions stay exact under micro-batching:
  `clip_low_fraction = sum(stats["clip_low"] * aggregation_weights(mask, "token_mean"))`.

The log-ratio log ρ = logps − old_logps is set to 0 outside the mask (padding may hold anything) and
clamped to [−20, 20] before the exponential, as verl's `compute_policy_loss` does.

Micro-batching: the trainer splits the global batch into micro-batches and sums their gradients.
`aggregate` on a micro-batch would normalise by that micro-batch's token or sequence count; instead
compute `w_BT = aggregation_weights(mask_BT, mode)` once on the global batch, put it in the batch, and
each micro-batch adds `sum(loss_BT * w_BT)`: the total is exactly the global-batch loss (the contract
of `polmjax.train.step.update`, like `losses.token_weights` for SFT).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
CORRECTION_LEVELS = ("token", "sequence", "geometric")
CORRECTION_MODES = ("tis", "mask", "reject")
_LOG_RATIO_CLAMP = 20.0


def clipped_policy(logps_BT, old_logps_BT, adv_B, mask_BT, *, epsilon_low: float, epsilon_high: float,
                   dual_clip: float | None = None):
    """PPO's clipped surrogate, per token (Schulman et al. 2017, arXiv:1707.06347), as used by GRPO.

        ρ_t = π_θ(y_t | ·) / π_old(y_t | ·)
        L_t = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A)

    ε_high > ε_low is DAPO's clip-higher (Yu et al. 2025, arXiv:2503.14476: ε_low = 0.2, ε_high = 0.28).
    `dual_clip = c > 1` bounds the loss of negative-advantage tokens, whose ratio is otherwise
    unbounded (dual-clip PPO, Ye et al. 2020, arXiv:1912.09729; verl's `clip_ratio_c`, default 3):

        L_t = min(L_t, −c·A)   where A < 0

    Stats: `clip_low` (ρ < 1 − ε_low and A < 0) and `clip_high` (ρ > 1 + ε_high and A > 0), the tokens
    whose gradient the clip removes, as TRL's `clip_ratio/low_mean` and `clip_ratio/high_mean`
    (grpo_trainer.py:3274-3275); with `dual_clip`, `clip_dual` (A < 0 and the −c·A bound active,
    verl's `pg_clipfrac_lower`).
    """
    log_ratio_BT = _log_ratio(logps_BT, old_logps_BT, mask_BT)
    return _clipped_surrogate(log_ratio_BT, adv_B, mask_BT, epsilon_low, epsilon_high, dual_clip)


def gspo(logps_BT, old_logps_BT, adv_B, mask_BT, *, epsilon_low: float, epsilon_high: float):
    """GSPO, sequence-level importance ratio (Zheng et al. 2025, arXiv:2507.18071), token form.

        s_i     = exp( (1/|y_i|) Σ_t (log π_θ(y_t) − log π_old(y_t)) )
        s_{i,t} = sg[s_i] · π_θ(y_t) / sg[π_θ(y_t)]                     (GSPO-token, Eq. 13)
        L_t     = −min(s_{i,t} A, clip(s_{i,t}, 1 − ε_low, 1 + ε_high) A)

    s_{i,t} has the value s_i on every token of sequence i, so the clip acts on whole sequences; its
    gradient is sg[s_i] ∇log π_θ(y_t). With one advantage per sequence and `seq_mean_token_mean`
    aggregation, value and gradient equal TRL's `importance_sampling_level="sequence"`
    (grpo_trainer.py:3086-3088, the mean log-ratio with gradient, broadcast over the tokens); the token
    form also composes with token-level weights (rollout correction, `token_mean`). The paper uses
    ε_low = 3e-4, ε_high = 4e-4. Stats as `clipped_policy` (per token, equal along a sequence).
    """
    mask = mask_BT.astype(jnp.float32)
    log_ratio_BT = _log_ratio(logps_BT, old_logps_BT, mask_BT)
    seq_B1 = log_ratio_BT.sum(axis=1, keepdims=True) / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
    logps = logps_BT.astype(jnp.float32)
    token_grad_BT = jnp.where(mask_BT > 0, logps - jax.lax.stop_gradient(logps), 0.0)
    return _clipped_surrogate(token_grad_BT + jax.lax.stop_gradient(seq_B1), adv_B, mask_BT,
                              epsilon_low, epsilon_high, None)


def cispo(logps_BT, old_logps_BT, adv_B, mask_BT, *, epsilon_high: float, epsilon_low: float | None = None):
    """CISPO: clipped importance-sampling-weight policy optimisation (MiniMax-M1, arXiv:2506.13585, Eq. 4-5).

        r̂_t = clip(ρ_t, 1 − ε_low, 1 + ε_high)
        L_t = −sg[r̂_t] · A · log π_θ(y_t)

    The IS weight is clipped and detached instead of the update, so every token keeps a gradient
    (A ∇log π scaled by at most 1 + ε_high). MiniMax-M1 sets no lower bound: `epsilon_low=None` gives
    r̂ = min(ρ, 1 + ε_high). TRL's `loss_type="cispo"` clamps at `epsilon_high` itself
    (grpo_trainer.py:3110, ScaleRL's ε_max = 5.0): TRL's ε_max is our 1 + epsilon_high.
    Stats: `clip_high` (ρ > 1 + ε_high) and `clip_low` (ρ < 1 − ε_low), the tokens whose weight was
    clipped, of either advantage sign (TRL's `cispo_clip_ratio` counts A > 0 only).
    """
    mask = mask_BT.astype(jnp.float32)
    ratio_BT = jnp.exp(_log_ratio(logps_BT, old_logps_BT, mask_BT))
    low = 0.0 if epsilon_low is None else 1.0 - epsilon_low
    weight_BT = jax.lax.stop_gradient(jnp.clip(ratio_BT, low, 1.0 + epsilon_high))
    logps = jnp.where(mask_BT > 0, logps_BT.astype(jnp.float32), 0.0)
    adv_B1 = jnp.asarray(adv_B, jnp.float32)[:, None]
    loss_BT = -weight_BT * adv_B1 * logps * mask
    stats = {"clip_low": (ratio_BT < low), "clip_high": (ratio_BT > 1.0 + epsilon_high)}
    return loss_BT, {k: v.astype(jnp.float32) * mask for k, v in stats.items()}


POLICY_LOSSES = {
    "clipped": clipped_policy,
    "gspo": gspo,
    "cispo": cispo,
}


def kl(logps_BT, ref_logps_BT, estimator: str = "k3"):
    """Per-token estimate [B, T] of KL(π_θ ‖ π_ref) from tokens sampled from π_θ (Schulman 2020,
    "Approximating KL Divergence"), with δ = log π_ref − log π_θ:

        k1 = −δ                 (unbiased, high variance, can be negative)
        k2 = δ² / 2             (biased, low variance; its gradient is the on-policy gradient of KL)
        k3 = exp(δ) − δ − 1     (unbiased, ≥ 0; GRPO's, TRL grpo_trainer.py:3100-3102)

    Not masked: multiply by the mask or the aggregation weights.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl: estimator={estimator!r}; expected one of {KL_ESTIMATORS}")
    delta = ref_logps_BT.astype(jnp.float32) - logps_BT.astype(jnp.float32)
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta**2
    return jnp.exp(delta) - delta - 1.0


def aggregation_weights(mask_BT, mode: str, max_len: int | None = None):
    """Per-token weights [B, T] float32 such that sum(loss_BT * w_BT) is the batch loss; computed on
    the global batch they make micro-batched sums exact.

        token_mean               w = m / Σ_{b,t} m                 (DAPO; TRL "dapo"/"bnpo"; verl token-mean)
        seq_mean_token_mean      w = m / (|y_b| · N)               (GRPO; TRL "grpo"; verl seq-mean-token-mean)
        seq_mean_token_sum       w = m / B                         (verl seq-mean-token-sum)
        seq_mean_token_sum_norm  w = m / (B · max_len)             (Dr. GRPO; TRL "dr_grpo", verl -norm)

    m is the mask, |y_b| row b's token count, B the number of rows and N the number of rows with at
    least one token (TRL divides by B; the two agree unless a row is fully masked, e.g. padding rows
    or DAPO's masked truncated completions, which then do not dilute the mean). `max_len` is Dr.
    GRPO's constant (the generation budget), required for that mode.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation mode {mode!r}; expected one of {AGGREGATIONS}")
    mask = mask_BT.astype(jnp.float32)
    B = mask.shape[0]
    if mode == "token_mean":
        return mask / jnp.maximum(mask.sum(), 1.0)
    if mode == "seq_mean_token_mean":
        lengths_B1 = mask.sum(axis=1, keepdims=True)
        rows = jnp.maximum((lengths_B1 > 0).sum(), 1).astype(jnp.float32)
        return mask / jnp.maximum(lengths_B1, 1.0) / rows
    if mode == "seq_mean_token_sum":
        return mask / B
    if max_len is None or max_len < 1:
        raise ValueError(f"aggregation seq_mean_token_sum_norm needs max_len (Dr. GRPO's constant normaliser, "
                         f"the completion token budget), got {max_len!r}")
    return mask / (B * float(max_len))


def aggregate(loss_BT, mask_BT, mode: str, max_len: int | None = None):
    """The scalar batch loss sum(loss_BT · aggregation_weights(mask_BT, mode, max_len)), for one batch."""
    return (loss_BT.astype(jnp.float32) * aggregation_weights(mask_BT, mode, max_len)).sum()


def rollout_correction(trainer_logps_BT, sampler_logps_BT, mask_BT, *, level: str = "token", mode: str = "tis",
                       cap: float | None = 2.0, low: float | None = None, high: float | None = None):
    """Importance weights [B, T] that correct for the sampler ≠ trainer mismatch, and mismatch metrics.

    The sampler's log-probs of the tokens it drew and the trainer's log-probs of the same tokens
    (old_logps, before any update) differ (bf16 KV cache, other kernels). With
    r = π_trainer / π_sampler the loss of each token is multiplied by a weight w from r at `level`:

        token       r_t = exp(log π_trainer(y_t) − log π_sampler(y_t))
        sequence    r_t = exp(Σ_t ...)  for every token of the sequence (TRL's sequence_* modes)
        geometric   r_t = exp(mean_t ...)  (verl rollout_rs "geometric": length-independent)

    and `mode`:

        tis     w = clip(r, low, cap): truncated importance sampling (Yao et al. 2025, "Your efficient
                RL framework secretly brings you off-policy RL training"; cap 2; TRL *_truncate)
        mask    w = r if low ≤ r ≤ high else 0: IcePop (Ling team 2025; TRL *_mask)
        reject  w = 1 if low ≤ r ≤ high else 0: rejection without reweighting (verl rollout_rs)

    (`low`/`high` None: unbounded on that side.) Weights carry no gradient and are 0 outside the mask;
    the trainer multiplies the per-token loss by them (TRL grpo_trainer.py:3146-3147).

    Metrics (scalars over the mask): `k3_kl` and `k1_kl`, estimates of KL(π_sampler ‖ π_trainer)
    from the sampled tokens (k3 = r − 1 − log r per token); `ratio_mean`, `ratio_max`, `ratio_min` of r
    at `level` (log r clamped to ±20); `masked_fraction` (weight set to 0 by mask/reject),
    `truncated_fraction` (weight clipped by tis), `weight_mean`.
    """
    if level not in CORRECTION_LEVELS:
        raise ValueError(f"rollout_correction: level={level!r}; expected one of {CORRECTION_LEVELS}")
    if mode not in CORRECTION_MODES:
        raise ValueError(f"rollout_correction: mode={mode!r}; expected one of {CORRECTION_MODES}")
    if mode == "tis" and cap is None:
        raise ValueError("rollout_correction: mode='tis' needs cap (the truncation bound, e.g. 2.0)")
    if mode != "tis" and low is None and high is None:
        raise ValueError(f"rollout_correction: mode={mode!r} needs low and/or high (the kept ratio range)")
    valid = mask_BT > 0
    mask = mask_BT.astype(jnp.float32)
    trainer = jax.lax.stop_gradient(trainer_logps_BT.astype(jnp.float32))
    sampler = jax.lax.stop_gradient(sampler_logps_BT.astype(jnp.float32))
    log_r_BT = jnp.where(valid, trainer - sampler, 0.0)
    if level == "token":
        log_w_BT = log_r_BT
    else:
        log_w_B1 = log_r_BT.sum(axis=1, keepdims=True)
        if level == "geometric":
            log_w_B1 = log_w_B1 / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        log_w_BT = jnp.broadcast_to(log_w_B1, log_r_BT.shape)
    ratio_BT = jnp.exp(jnp.clip(log_w_BT, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    lo = -jnp.inf if low is None else low
    if mode == "tis":
        weight_BT = jnp.clip(ratio_BT, lo, cap)
        truncated_BT, masked_BT = (ratio_BT > cap) | (ratio_BT < lo), jnp.zeros_like(valid)
    else:
        hi = jnp.inf if high is None else high
        keep_BT = (ratio_BT >= lo) & (ratio_BT <= hi)
        weight_BT = jnp.where(keep_BT, ratio_BT if mode == "mask" else 1.0, 0.0)
        truncated_BT, masked_BT = jnp.zeros_like(valid), ~keep_BT
    weight_BT = weight_BT * mask

    n = jnp.maximum(mask.sum(), 1.0)

    def mean(x):
        return (x.astype(jnp.float32) * mask).sum() / n

    log_r = jnp.clip(log_r_BT, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    metrics = {
        "k3_kl": mean(jnp.exp(log_r) - 1.0 - log_r),
        "k1_kl": mean(-log_r),
        "ratio_mean": mean(ratio_BT),
        "ratio_max": jnp.where(valid, ratio_BT, -jnp.inf).max(),
        "ratio_min": jnp.where(valid, ratio_BT, jnp.inf).min(),
        "masked_fraction": mean(masked_BT),
        "truncated_fraction": mean(truncated_BT),
        "weight_mean": mean(weight_BT),
    }
    return weight_BT, metrics


def _log_ratio(logps_BT, old_logps_BT, mask_BT):
    log_ratio = logps_BT.astype(jnp.float32) - jax.lax.stop_gradient(old_logps_BT.astype(jnp.float32))
    return jnp.clip(jnp.where(mask_BT > 0, log_ratio, 0.0), -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)


def _clipped_surrogate(log_ratio_BT, adv_B, mask_BT, epsilon_low, epsilon_high, dual_clip):
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"clipped_policy: dual_clip must be > 1 (verl's clip_ratio_c, e.g. 3.0), got {dual_clip}")
    mask = mask_BT.astype(jnp.float32)
    adv_B1 = jnp.asarray(adv_B, jnp.float32)[:, None]
    ratio_BT = jnp.exp(log_ratio_BT)
    clipped_BT = jnp.clip(ratio_BT, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss_BT = -jnp.minimum(ratio_BT * adv_B1, clipped_BT * adv_B1)
    stats = {"clip_low": (ratio_BT < 1.0 - epsilon_low) & (adv_B1 < 0),
             "clip_high": (ratio_BT > 1.0 + epsilon_high) & (adv_B1 > 0)}
    if dual_clip is not None:
        bound_BT = -dual_clip * adv_B1
        stats["clip_dual"] = (adv_B1 < 0) & (loss_BT > bound_BT)
        loss_BT = jnp.where(adv_B1 < 0, jnp.minimum(loss_BT, bound_BT), loss_BT)
    return loss_BT * mask, {k: v.astype(jnp.float32) * mask for k, v in stats.items()}
