"""GRPO and its family: sample from the live policy, score with verifiable rewards, clipped policy-gradient updates.

    polmjax grpo experiments/grpo/tiny.py                       # GRPO
    polmjax grpo experiments/grpo/tiny_dapo.py                  # a variant is a config

One training step, all in this one program on one mesh (no second engine, no weight sync):

  1. `Rollout.step` draws `global_batch / num_generations` prompts (the shared loop's batch) and samples
     `num_generations` completions of each from the current parameters (`polmjax.rl.sampler`: one prefill
     per prompt, a while-loop decode that stops when every row has);
  2. scores them (`polmjax.rl.rewards.score`: verifiers in a process pool with timeouts);
     with `dynamic_sampling` (DAPO) groups whose rewards are all equal are dropped and more prompts are
     drawn until the batch is full (at most `max_sampling_rounds` rounds);
  3. computes one advantage per completion (`polmjax.rl.advantages`) on the whole batch;
  4. lays each prompt + completion out as one right-padded row of `train.seq_len` tokens, with the
     sampler's log-probs, the loss mask and the aggregation weights (`losses.policy.aggregation_weights`,
     normalised over each mini-batch so gradient accumulation stays exact);
  5. runs `iterations` (μ) passes over `mini_batches` mini-batches, one optimizer update each
     (`grpo_step`, the jitted pure step). On-policy (μ = 1, one mini-batch) the old log-probs are the
     current ones with the gradient stopped, as TRL does: no extra forward. Otherwise one jitted forward
     computes them before the first update. With `beta > 0` the reference's log-probs come from one
     forward per rollout (the LoRA base with the adapters off for LoRA runs, else a frozen copy).

Log-probs are those of the policy at the sampling temperature (softmax(logits / T), TRL's convention),
so the importance ratio compares like with like. The rollout mismatch (sampler vs trainer log-probs of
the same tokens, `mismatch/*`) is logged every step; `rollout_correction` reweights or masks by it.

The loop is the shared one (`polmjax.train.run`): resume, logging, checkpoints and preemption work as for
every algorithm, and the prompt stream's position is checkpointed with the state, so a killed run resumes
exactly (the sampling key is a function of the seed, the step and the round).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from polmjax import mesh as mesh_lib
from polmjax.data import DataConfig, toy
from polmjax.data.prompts import Prompt, PromptSource
from polmjax.losses.policy import (
    AGGREGATIONS,
    CORRECTION_LEVELS,
    CORRECTION_MODES,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    aggregation_weights,
    kl,
    rollout_correction,
)
from polmjax.models.config import LoraConfig, ModelConfig
from polmjax.models.decoder import forward_hidden, target_logprobs
from polmjax.models.lora import has_adapters
from polmjax.rl import advantages as advantages_lib
from polmjax.rl import rewards as rewards_lib
from polmjax.rl.rollout import PolicySampler
from polmjax.train import run as run_lib
from polmjax.train.config import MeshConfig, ModelSource, TrainConfig
from polmjax.train.dpo import reference_params
from polmjax.train.loop import LoopResult
from polmjax.train.optim import OptimConfig
from polmjax.train.state import TrainState, combine_params
from polmjax.train.step import update

BATCH_KEYS = ("input_ids", "targets", "positions", "segment_ids", "loss_mask", "weights", "token_weights",
              "advantages", "sampler_logps")
_LOG_RATIO_CLAMP = 20.0


def grpo_step(state: TrainState, frozen: dict, batch: dict, *, model_cfg: ModelConfig,
              optimizer: optax.GradientTransformation, loss: str = "clipped", loss_kwargs: dict | None = None,
              beta: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0, temperature: float = 1.0,
              correction: dict | None = None, on_policy: bool = True, schedule: optax.Schedule | None = None,
              grad_accum: int = 1, mesh=None, rules=None) -> tuple[TrainState, dict]:
    """One optimizer update of a policy loss (`POLICY_LOSSES[loss]`) on a batch of [B, T] arrays.

    batch: `BATCH_KEYS` (+ `old_logps` when not `on_policy`, + `ref_logps` when beta > 0): token rows
    with the completion tokens' loss mask, `weights` (the aggregation weights, summing the per-token loss
    to the batch loss), `token_weights` (mask / its sum: token means for the metrics), `advantages`
    (one per row, broadcast over T) and the sampler's log-probs of the completion tokens, at the
    positions that predict them. Per token:

        L_t = w_t · ℓ_t(ρ_t, A) + β · KL_t − c_H · H_t      (ℓ: the policy loss; w: rollout correction)

    summed with `weights`. Metrics (token means): clip fractions, `kl`, `entropy`, `mismatch/k3_kl` and
    `mismatch/ratio_max` (trainer vs sampler: the behaviour policy mismatch), and the correction's
    `correction/weight_mean`.
    """
    fn = POLICY_LOSSES[loss]
    kwargs = dict(loss_kwargs or {})
    dropout = model_cfg.lora is not None and model_cfg.lora.dropout > 0

    def micro_loss(params, mb, rng):
        hidden_BTD, _ = forward_hidden(model_cfg, params, mb["input_ids"], mb["positions"], mb["segment_ids"],
                                       mesh=mesh, rules=rules, dropout_rng=rng if dropout else None)
        lp_BT, entropy_BT = target_logprobs(model_cfg, params, hidden_BTD, mb["targets"], mesh=mesh,
                                            temperature=temperature, return_entropy=True)
        mask_BT, tw_BT = mb["loss_mask"], mb["token_weights"]
        old_BT = jax.lax.stop_gradient(lp_BT) if on_policy else mb["old_logps"]
        loss_BT, stats = fn(lp_BT, old_BT, mb["advantages"][:, 0], mask_BT, **kwargs)
        metrics = {f"{k}_fraction": (v * tw_BT).sum() for k, v in stats.items()}
        log_r_BT = jnp.clip(jnp.where(mask_BT > 0, old_BT - mb["sampler_logps"], 0.0), -_LOG_RATIO_CLAMP,
                            _LOG_RATIO_CLAMP)
        metrics["mismatch/k3_kl"] = (tw_BT * (jnp.exp(log_r_BT) - 1.0 - log_r_BT)).sum()
        metrics["mismatch/ratio_max"] = jnp.where(mask_BT > 0, jnp.exp(log_r_BT), -jnp.inf).max()
        if correction is not None:
            w_BT, _ = rollout_correction(old_BT, mb["sampler_logps"], mask_BT, **correction)
            loss_BT = loss_BT * w_BT
            metrics["correction/weight_mean"] = (tw_BT * w_BT).sum()
        if beta:
            kl_BT = kl(lp_BT, mb["ref_logps"], kl_estimator) * mask_BT
            loss_BT = loss_BT + beta * kl_BT
            metrics["kl"] = (tw_BT * kl_BT).sum()
        if entropy_coef:
            loss_BT = loss_BT - entropy_coef * entropy_BT * mask_BT
        metrics["entropy"] = (tw_BT * jax.lax.stop_gradient(entropy_BT)).sum()
        return (loss_BT * mb["weights"]).sum(), metrics

    return update(state, frozen.get("base", {}), batch, micro_loss=micro_loss, optimizer=optimizer,
                  grad_accum=grad_accum, schedule=schedule)


def policy_logprobs(model_cfg: ModelConfig, params: dict, batch: dict, *, temperature: float = 1.0, mesh=None,
                    rules=None) -> jax.Array:
    """log π(target) [B, T] at `temperature` of a rollout batch: the old policy's (before the updates of a
    step) or the reference's."""
    hidden_BTD, _ = forward_hidden(model_cfg, params, batch["input_ids"], batch["positions"], batch["segment_ids"],
                                   mesh=mesh, rules=rules)
    return target_logprobs(model_cfg, params, hidden_BTD, batch["targets"], mesh=mesh, temperature=temperature)


# ----------------------------------------------------------------------------------------------
# The experiment


@dataclasses.dataclass(frozen=True)
class Reward:
    """One reward term by import path, so it round-trips through the run's config.json.

    fn: "module:function" with TRL's signature `fn(prompts, completions, **row_fields) -> list[float]`
      (e.g. "polmjax.rl.rewards:math_reward", or your own "mypkg.rewards:my_reward");
    kwargs: bound with functools.partial (e.g. {"max_len": 64, "buffer": 16} for overlong_reward);
    isolate: run it in the verifier pool, one call per completion with a timeout (False: in-process,
      for cheap deterministic functions); timeout_s: its per-call timeout (default the experiment's).
    The row fields are the dataset row's other columns plus `completion_lengths` (token counts).
    The first reward of an experiment defines `accuracy` and pass@k: a completion is correct when that
    reward is >= 1.
    """

    fn: str
    weight: float = 1.0
    kwargs: dict = dataclasses.field(default_factory=dict)
    name: str | None = None
    isolate: bool = True
    timeout_s: float | None = None

    def validate(self):
        _import(self.fn)

    def build(self) -> rewards_lib.RewardFn:
        fn = _import(self.fn)
        if self.kwargs:
            fn = functools.partial(fn, **self.kwargs)
        return rewards_lib.RewardFn(fn, self.weight, self.name or self.fn.split(":")[1], self.isolate, self.timeout_s)


@dataclasses.dataclass(frozen=True)
class RolloutCorrection:
    """`polmjax.losses.policy.rollout_correction`'s settings: truncated importance sampling ("tis", cap)
    or masking ("mask"/"reject", low/high) by the trainer/sampler ratio, per token or sequence."""

    level: str = "token"
    mode: str = "tis"
    cap: float | None = 2.0
    low: float | None = None
    high: float | None = None

    def validate(self):
        if self.level not in CORRECTION_LEVELS or self.mode not in CORRECTION_MODES:
            raise ValueError(f"rollout_correction: level={self.level!r} (one of {CORRECTION_LEVELS}), "
                             f"mode={self.mode!r} (one of {CORRECTION_MODES})")
        if self.mode == "tis" and self.cap is None:
            raise ValueError("rollout_correction: mode='tis' needs cap")
        if self.mode != "tis" and self.low is None and self.high is None:
            raise ValueError(f"rollout_correction: mode={self.mode!r} needs low and/or high")


@dataclasses.dataclass(frozen=True)
class GRPOExperiment:
    """`polmjax grpo experiments/grpo/<name>.py`: RL with verifiable rewards on a `prompt` dataset.

    train.global_batch: completions per step (= prompts per step x num_generations); train.seq_len:
      prompt + completion tokens of one row (prompts longer than seq_len - max_completion_len are
      skipped and counted). Sampling: temperature (> 0), top_k/top_p/min_p, stop_sequences (strings),
      max_completion_len. advantage: "grpo" (scale_rewards "group" | "batch" | "none" = Dr. GRPO), "rloo",
      "reinforce_pp". loss: "clipped" (PPO/GRPO, epsilon_low/high: DAPO's clip-higher; dual_clip),
      "gspo", "cispo". aggregation: `losses.policy.AGGREGATIONS`. beta: KL to the reference
      (kl_estimator k1/k2/k3; 0 = no reference at all). iterations (μ) x mini_batches updates per
      rollout. dynamic_sampling: DAPO's (drop zero-variance groups, draw more prompts).
      mask_truncated: no loss on completions that hit max_completion_len (DAPO's overlong filtering).
    eval (every train.eval_every steps, train.eval_batches x prompts-per-step held-out prompts): greedy
      `accuracy` and pass@`eval_samples` at the sampling temperature.
    """

    model: ModelSource
    data: DataConfig
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    lora: LoraConfig | None = None
    rewards: tuple[Reward, ...] = ()
    num_generations: int = 8
    max_completion_len: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: every completion runs to max_completion_len
    advantage: str = "grpo"
    scale_rewards: str = "group"
    loss: str = "clipped"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    dual_clip: float | None = None
    aggregation: str = "seq_mean_token_mean"
    beta: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    iterations: int = 1
    mini_batches: int = 1
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    mask_truncated: bool = False
    rollout_correction: RolloutCorrection | None = None
    reference: str = "auto"
    cache_dtype: str = ""
    eval_samples: int = 4
    verifier_workers: int = 2
    verifier_timeout_s: float = 10.0

    def validate(self):
        tc = self.train
        if not self.rewards:
            raise ValueError("rewards: give at least one Reward (the first defines accuracy)")
        if self.num_generations < 1 or tc.global_batch % self.num_generations:
            raise ValueError(f"train.global_batch={tc.global_batch} must be a multiple of num_generations="
                             f"{self.num_generations} (completions per step = prompts x generations)")
        if self.mini_batches < 1 or tc.global_batch % (self.mini_batches * tc.grad_accum):
            raise ValueError(f"train.global_batch={tc.global_batch} must be divisible by mini_batches="
                             f"{self.mini_batches} x train.grad_accum={tc.grad_accum}")
        if self.iterations < 1:
            raise ValueError(f"iterations={self.iterations}: must be >= 1")
        if not 1 <= self.max_completion_len < tc.seq_len:
            raise ValueError(f"max_completion_len={self.max_completion_len} must be in [1, train.seq_len="
                             f"{tc.seq_len}): a row holds the prompt and the completion")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: RL samples need temperature > 0")
        checks = {"advantage": (self.advantage, tuple(advantages_lib.ADVANTAGES)),
                  "scale_rewards": (self.scale_rewards, advantages_lib.SCALES),
                  "loss": (self.loss, tuple(POLICY_LOSSES)), "aggregation": (self.aggregation, AGGREGATIONS),
                  "kl_estimator": (self.kl_estimator, KL_ESTIMATORS), "reference": (self.reference, REFERENCES),
                  "cache_dtype": (self.cache_dtype, ("", "float32", "bfloat16"))}
        for name, (value, options) in checks.items():
            if value not in options:
                raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(repr, options))}")
        if self.advantage == "rloo" and self.num_generations < 2:
            raise ValueError("advantage='rloo' needs num_generations >= 2")
        if self.reference == "base" and self.lora is None:
            raise ValueError("reference='base' is the LoRA base with the adapters off; it needs lora")
        if tc.eval_every and not self.data.eval_fraction:
            raise ValueError("train.eval_every > 0 needs data.eval_fraction > 0 (held-out prompts)")
        if self.max_sampling_rounds < 1 or self.eval_samples < 1:
            raise ValueError("max_sampling_rounds and eval_samples must be >= 1")

    @property
    def prompts_per_step(self) -> int:
        return self.train.global_batch // self.num_generations

    @property
    def max_prompt_len(self) -> int:
        return self.train.seq_len - self.max_completion_len

    @property
    def on_policy(self) -> bool:
        """One update per rollout: the old log-probs are the current ones (no extra forward)."""
        return self.iterations == 1 and self.mini_batches == 1

    def loss_kwargs(self) -> dict:
        given = {"epsilon_low": self.epsilon_low, "epsilon_high": self.epsilon_high, "dual_clip": self.dual_clip}
        return {k: v for k, v in given.items() if k in inspect.signature(POLICY_LOSSES[self.loss]).parameters}


REFERENCES = ("auto", "copy", "base")


def run(exp: GRPOExperiment, *, allow_config_change: bool = False) -> LoopResult:
    """`polmjax grpo`: the shared run (`polmjax.train.run`) with the GRPO algorithm."""
    return run_lib.run(exp, ALGORITHM, allow_config_change=allow_config_change)


# ----------------------------------------------------------------------------------------------
# The rollout: prompts -> samples -> rewards -> advantages -> train batches -> updates


class Rollout:
    """The host side of a GRPO step: generation, scoring and batch building around the jitted `grpo_step`.

    `step(state, prompts)` is the shared loop's step function; `evaluate(params, source)` the held-out
    evaluation. Holds the verifier pool: `close()` it.
    """

    def __init__(self, exp: GRPOExperiment, model_cfg: ModelConfig, tokenizer, mesh, step_fn, frozen: dict,
                 prompts):
        if jax.process_count() > 1:
            raise NotImplementedError("polmjax grpo runs in one process for now (multi-host RL: every host "
                                      "would need its share of the prompts and of the scoring)")
        self.exp, self.cfg, self.tokenizer, self.mesh = exp, model_cfg, tokenizer, mesh
        self.step_fn, self.frozen, self.prompts = step_fn, frozen, prompts
        self.sampler = PolicySampler(model_cfg, tokenizer, mesh, [r.build() for r in exp.rewards],
                                     max_new_tokens=exp.max_completion_len, temperature=exp.temperature,
                                     top_k=exp.top_k, top_p=exp.top_p, min_p=exp.min_p,
                                     stop_sequences=exp.stop_sequences, ignore_eos=exp.ignore_eos,
                                     cache_dtype=exp.cache_dtype, verifier_workers=exp.verifier_workers,
                                     verifier_timeout_s=exp.verifier_timeout_s)
        logps = functools.partial(policy_logprobs, temperature=exp.temperature, mesh=mesh)
        self.old_logps = jax.jit(functools.partial(logps, model_cfg))
        ref = frozen.get("reference")
        ref_cfg = model_cfg.replace(lora=None) if ref is not None and not has_adapters(ref) else model_cfg
        self.ref_logps = jax.jit(functools.partial(logps, ref_cfg))
        self.sharding = batch_sharding(exp, mesh)  # a mini-batch
        self.rollout_sharding = mesh_lib.named_sharding(mesh, ("act_batch", "act_len"),
                                                        (exp.train.global_batch, exp.train.seq_len))

    def close(self) -> None:
        self.sampler.close()

    def step(self, state: TrainState, prompts: list[Prompt]) -> tuple[TrainState, dict]:
        exp = self.exp
        t0 = time.perf_counter()
        params = combine_params(state.params, self.frozen.get("base", {}))
        groups, info = self._collect(params, state.step_key(), prompts)
        batch, batch_metrics = self._batch(groups)
        t_train = time.perf_counter()
        if not exp.on_policy or exp.beta:  # one forward over the whole rollout before any update
            rollout = {k: jax.device_put(batch[k], self.rollout_sharding)
                       for k in ("input_ids", "targets", "positions", "segment_ids")}
            if not exp.on_policy:
                batch["old_logps"] = np.asarray(self.old_logps(params, rollout))
            if exp.beta:
                batch["ref_logps"] = np.asarray(self.ref_logps(self.frozen["reference"], rollout))
        metrics_sum: dict[str, float] = {}
        updates = 0
        for _ in range(exp.iterations):
            for mb in self._mini_batches(batch):
                state, m = self.step_fn(state, self.frozen, {k: jax.device_put(v, self.sharding) for k, v in mb.items()})
                for k, v in jax.device_get(m).items():
                    v = float(v)
                    metrics_sum[k] = max(metrics_sum.get(k, -np.inf), v) if k.endswith("_max") else \
                        metrics_sum.get(k, 0.0) + v
                updates += 1
        jax.block_until_ready(state)
        now = time.perf_counter()
        metrics = {k: v if k.endswith("_max") else v / updates for k, v in metrics_sum.items()}
        metrics.update(info)
        metrics.update(batch_metrics)
        metrics["time/train"] = now - t_train
        metrics["time/step"] = now - t0
        metrics["updates"] = float(updates)
        return state, metrics

    def evaluate(self, params: dict, source: PromptSource) -> dict:
        """Held-out (`PolicySampler.evaluate`): greedy accuracy and reward, pass@k with k = eval_samples at the
        sampling temperature and those samples' mean accuracy (`accuracy_sampled`), over train.eval_batches
        x prompts-per-step prompts of `source`."""
        exp = self.exp
        prompts = iter(source).take(exp.train.eval_batches * exp.prompts_per_step)
        key = jax.random.fold_in(jax.random.key(exp.train.seed), 1_000_003)
        return self.sampler.evaluate(combine_params(params, self.frozen.get("base", {})), prompts,
                                     k=exp.eval_samples, key=key, batch=exp.prompts_per_step)

    # -- generation and scoring ------------------------------------------------------------------

    def _collect(self, params, key, prompts: list[Prompt]):
        """Generate and score rounds of prompts until the batch is full: a list of (prompt, samples-of-it,
        rewards) groups, and the step's generation/scoring/sampling metrics."""
        exp = self.exp
        kept, dropped, rounds = [], [], 0
        t_gen = t_score = 0.0
        tokens = 0
        all_scores = []
        while True:
            t = time.perf_counter()
            samples = self.sampler.generate(params, prompts, jax.random.fold_in(key, rounds), n=exp.num_generations)
            t_gen += time.perf_counter() - t
            tokens += int(samples.lengths.sum())
            t = time.perf_counter()
            scores = self.sampler.score(prompts, samples, n=exp.num_generations)
            t_score += time.perf_counter() - t
            all_scores.append((scores, samples))
            rounds += 1
            for g, prompt in enumerate(prompts):
                rows = slice(g * exp.num_generations, (g + 1) * exp.num_generations)
                group = (prompt, jax.tree.map(lambda x, rows=rows: x[rows] if np.ndim(x) else x, samples), scores.total[rows])
                informative = np.ptp(scores.total[rows]) > 0
                (kept if informative or not exp.dynamic_sampling else dropped).append(group)
            if len(kept) >= exp.prompts_per_step or rounds >= exp.max_sampling_rounds or not exp.dynamic_sampling:
                break
            prompts = self.prompts.take(exp.prompts_per_step)
            if not prompts:
                break
        groups = (kept + dropped)[:exp.prompts_per_step]
        if len(groups) < exp.prompts_per_step:
            raise RuntimeError(f"grpo: only {len(groups)} prompt groups for a batch of {exp.prompts_per_step} "
                               f"(the prompt stream ended: data.num_epochs?)")
        info = _reward_metrics([s for s, _ in all_scores], self.sampler.reward_fns)
        info.update({"time/generate": t_gen, "time/score": t_score, "generated_tokens_per_s": tokens / max(t_gen, 1e-9),
                     "prompts/skipped": float(self.prompts.skipped)})
        if exp.dynamic_sampling:
            info.update({"dynamic/rounds": float(rounds), "dynamic/kept_groups": float(len(kept)),
                         "dynamic/zero_variance_groups_trained": float(max(0, exp.prompts_per_step - len(kept)))})
        return groups, info

    # -- batches -----------------------------------------------------------------------------------

    def _batch(self, groups) -> tuple[dict[str, np.ndarray], dict]:
        """The rollout as [B, T] host arrays (`BATCH_KEYS` but the weights, set per mini-batch), and its
        completion-length metrics."""
        exp = self.exp
        G, T = exp.num_generations, exp.train.seq_len
        B = len(groups) * G
        rewards = np.concatenate([r for _, _, r in groups])
        lengths_B = np.concatenate([np.asarray(s.lengths) for _, s, _ in groups])
        truncated_B = np.concatenate([np.asarray(s.truncated) for _, s, _ in groups])
        adv_fn = advantages_lib.ADVANTAGES[exp.advantage]
        kw = {"scale": exp.scale_rewards} if exp.advantage == "grpo" else {}
        if exp.advantage == "reinforce_pp":
            kw["lengths_B"] = lengths_B
        adv_B = np.asarray(adv_fn(jnp.asarray(rewards), G, **kw), np.float32)
        out = {k: np.zeros((B, T), np.int32) for k in ("input_ids", "targets", "positions", "segment_ids")}
        out.update({k: np.zeros((B, T), np.float32) for k in ("loss_mask", "sampler_logps")})
        r = 0
        for prompt, samples, _ in groups:
            p = prompt.ids
            for i in range(G):
                L = int(samples.lengths[i])
                completion = np.asarray(samples.tokens[i, :L])
                row = np.concatenate([p, completion])
                n = len(row)
                out["input_ids"][r, :n] = row
                out["targets"][r, :n - 1] = row[1:]
                out["positions"][r, :n] = np.arange(n)
                out["segment_ids"][r, :n] = 1
                if not (exp.mask_truncated and samples.truncated[i]):
                    out["loss_mask"][r, len(p) - 1:n - 1] = 1.0
                out["sampler_logps"][r, len(p) - 1:n - 1] = np.asarray(samples.logprobs[i, :L])
                r += 1
        out["advantages"] = np.broadcast_to(adv_B[:, None], (B, T)).astype(np.float32)
        metrics = {"completion_length/mean": float(lengths_B.mean()), "completion_length/max": float(lengths_B.max()),
                   "truncated_fraction": float(truncated_B.mean()), "advantage_abs_mean": float(np.abs(adv_B).mean())}
        return out, metrics

    def _mini_batches(self, batch: dict[str, np.ndarray]):
        """The rollout split into `mini_batches` row blocks, each with its own aggregation weights."""
        exp = self.exp
        rows = exp.train.global_batch // exp.mini_batches
        for i in range(exp.mini_batches):
            mb = {k: v[i * rows:(i + 1) * rows] for k, v in batch.items()}
            mask = jnp.asarray(mb["loss_mask"])
            mb["weights"] = np.asarray(aggregation_weights(mask, exp.aggregation, exp.max_completion_len))
            mb["token_weights"] = np.asarray(aggregation_weights(mask, "token_mean"))
            yield mb


def _reward_metrics(scores: list[rewards_lib.Scores], reward_fns) -> dict:
    """Reward means/stds per function and in total, accuracy, over every completion generated this step."""
    total = np.concatenate([s.total for s in scores])
    out = {"reward": float(total.mean()), "reward_std": float(total.std(ddof=1)) if total.size > 1 else 0.0}
    for rf in reward_fns:
        values = np.concatenate([s.per_fn[rf.label] for s in scores])
        finite = values[np.isfinite(values)]
        if finite.size:
            out[f"rewards/{rf.label}/mean"] = float(finite.mean())
            out[f"rewards/{rf.label}/std"] = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
        for kind in ("timeouts", "errors"):
            out[f"rewards/{rf.label}/{kind}"] = float(sum(s.metrics[f"rewards/{rf.label}/{kind}"] for s in scores))
    first = np.concatenate([s.per_fn[reward_fns[0].label] for s in scores])
    out["accuracy"] = float((np.nan_to_num(first, nan=0.0) >= 1.0).mean())
    return out


def _import(path: str):
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"reward fn={path!r}: expected 'module:function', e.g. 'polmjax.rl.rewards:math_reward'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward fn={path!r} cannot be imported: {e}") from None


# ----------------------------------------------------------------------------------------------
# The algorithm the shared run (polmjax.train.run) needs


def pipeline(exp: GRPOExperiment, data_cfg: DataConfig, tokenizer, split: str) -> PromptSource:
    return PromptSource(data_cfg, tokenizer, max_prompt_len=exp.max_prompt_len, batch_size=exp.prompts_per_step,
                        split=split)


def batch_keys(exp: GRPOExperiment) -> tuple[str, ...]:
    return BATCH_KEYS + (() if exp.on_policy else ("old_logps",)) + (("ref_logps",) if exp.beta else ())


def frozen_inputs(exp: GRPOExperiment, trainable: dict, base: dict) -> dict:
    """The LoRA base and, when beta > 0, the reference: the base with the adapters off for LoRA runs
    ("auto"/"base"), else a frozen copy of the initial policy."""
    if not exp.beta:
        return {"base": base, "reference": None}
    lora_base = exp.reference == "base" or (exp.reference == "auto" and exp.lora is not None)
    return {"base": base, "reference": reference_params(trainable, base, lora=lora_base)}


def batch_sharding(exp: GRPOExperiment, mesh):
    """The sharding of one mini-batch's [global_batch / mini_batches, seq_len] arrays."""
    rows = exp.train.global_batch // exp.mini_batches
    return mesh_lib.named_sharding(mesh, ("act_batch", "act_len"), (rows, exp.train.seq_len))


def jit_step(exp: GRPOExperiment, model_cfg, optimizer, schedule, mesh, state_shardings, frozen_shardings,
             batch_shardings):
    """`grpo_step` jitted once; the batch is one mini-batch (`batch_sharding`; the run's global-batch
    `batch_shardings` are replaced by it)."""
    batch_shardings = {k: batch_sharding(exp, mesh) for k in batch_keys(exp)}
    correction = dataclasses.asdict(exp.rollout_correction) if exp.rollout_correction else None
    step = functools.partial(grpo_step, model_cfg=model_cfg, optimizer=optimizer, loss=exp.loss,
                             loss_kwargs=exp.loss_kwargs(), beta=exp.beta, kl_estimator=exp.kl_estimator,
                             entropy_coef=exp.entropy_coef, temperature=exp.temperature, correction=correction,
                             on_policy=exp.on_policy, schedule=schedule, grad_accum=exp.train.grad_accum, mesh=mesh)
    return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))


def rollout(exp: GRPOExperiment, model_cfg, tokenizer, mesh, step_fn, frozen, prompts) -> Rollout:
    return Rollout(exp, model_cfg, tokenizer, mesh, step_fn, frozen, prompts)


def updates_per_step(exp: GRPOExperiment) -> int:
    return exp.iterations * exp.mini_batches


ALGORITHM = run_lib.Algorithm(
    name="grpo", batch_keys=batch_keys, pipeline=pipeline, jit_step=jit_step, eval_sums=None, eval_metrics=None,
    frozen=frozen_inputs, rollout=rollout, updates_per_step=updates_per_step,
    toy_data={"toy:rl": ("prompt", toy.write_toy_rl_dataset)},
)
