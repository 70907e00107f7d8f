"""GRPO: the pure step against hand-derived values, the rollout's batches, dynamic sampling, a learning run, resume."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from kill_restart import TINY_INIT, check_sigkill_and_restart

from polmjax import config as config_lib
from polmjax.losses.policy import aggregation_weights
from polmjax.models import ModelConfig, RopeConfig, create
from polmjax.train import grpo
from polmjax.train.config import ModelSource
from polmjax.train.state import init_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "grpo", "tiny.py")
SMALL_MODEL = ModelSource(init=ModelConfig(family="qwen3", vocab_size=0, hidden_size=32, intermediate_size=64,
                                           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
                                           tie_embeddings=True, rope=RopeConfig(theta=10000.0)),
                          tokenizer="toy")
SMALL = ["data.max_rows=400", "train.global_batch=32", "num_generations=8", "train.seq_len=40", "max_completion_len=8",
         "train.log_every=1", "train.save_every=4", "train.eval_batches=1", "train.sample_prompts=[]",
         "train.export_hf=false", "train.async_save=false", "optim.lr=1e-2",
         'rewards=[{"fn": "test_grpo:letter_a_fraction", "isolate": false}]']
CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, rope=RopeConfig(theta=10000.0))


def letter_a_fraction(prompts, completions, **_):
    """A reward a random tiny model can climb: the fraction of its characters that are 'a'."""
    return [c.count("a") / max(len(c), 1) for c in completions]


def a_fraction_on_add(prompts, completions, **_):
    """Informative only on the "add" prompts (a third of them): 0 for every completion of the others."""
    return [c.count("a") / max(len(c), 1) if "add" in p[-1]["content"] else 0.0 for p, c in zip(prompts, completions)]


def _cfg(run_dir, *extra):
    exp = config_lib.load_experiment(TINY, SMALL + [f"train.run_dir={run_dir}", *extra])
    return dataclasses.replace(exp, model=SMALL_MODEL)


def _rows(run_dir, split=None):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if r.get("split") == split}


def _batch(B=4, T=10, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
    mask = np.zeros((B, T), np.float32)
    for b in range(B):  # completions of different lengths after a 3-token prompt
        mask[b, 2:2 + 2 + b] = 1.0
    targets = np.concatenate([ids[:, 1:], np.zeros((B, 1), np.int32)], axis=1)
    adv = np.array([1.0, -0.5, 0.25, -0.75], np.float32)[:B]
    return {"input_ids": ids, "targets": targets, "positions": np.broadcast_to(np.arange(T), (B, T)).astype(np.int32),
            "segment_ids": np.ones((B, T), np.int32), "loss_mask": mask,
            "weights": np.asarray(aggregation_weights(jnp.asarray(mask), "seq_mean_token_mean")),
            "token_weights": np.asarray(aggregation_weights(jnp.asarray(mask), "token_mean")),
            "advantages": np.broadcast_to(adv[:, None], (B, T)).astype(np.float32)}


def _logps(params, batch, temperature=1.0):
    return grpo.policy_logprobs(CFG, params, batch, temperature=temperature)


def test_on_policy_step_is_reinforce_with_ratio_one():
    """On-policy the clipped loss is -Σ w·A (ratio 1, nothing clipped), its gradient -Σ w·A·∇log π; the
    sampler's log-probs equal to the trainer's give zero mismatch; grad_accum=2 gives the same update."""
    params = create(CFG, seed=0).params()
    opt = optax.sgd(0.1)
    batch = _batch()
    batch["sampler_logps"] = np.asarray(_logps(params, batch))
    kw = dict(model_cfg=CFG, optimizer=opt, temperature=1.0, loss_kwargs={"epsilon_low": 0.2, "epsilon_high": 0.2})
    state, m = grpo.grpo_step(init_state(params, opt, 0), {}, batch, **kw)
    expected = -(batch["weights"] * batch["advantages"]).sum()
    np.testing.assert_allclose(float(m["loss"]), expected, atol=1e-6)
    assert float(m["clip_low_fraction"]) == 0.0 and float(m["clip_high_fraction"]) == 0.0
    assert abs(float(m["mismatch/k3_kl"])) < 1e-7 and abs(float(m["mismatch/ratio_max"]) - 1.0) < 1e-6

    def reinforce(p):
        return -(batch["weights"] * batch["advantages"] * _logps(p, batch)).sum()

    grads = jax.grad(reinforce)(params)
    want = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6), state.params, want)
    acc, m2 = grpo.grpo_step(init_state(params, opt, 0), {}, batch, grad_accum=2, **kw)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6), acc.params,
                 state.params)
    assert abs(float(m2["mismatch/ratio_max"]) - 1.0) < 1e-6  # a maximum over micro-batches, not a sum


def test_off_policy_ratio_clips_kl_and_correction():
    """Given old log-probs the ratio is π/π_old: tokens moved beyond 1 + ε with A > 0 are clipped (no
    gradient); KL to a reference equal to the policy is 0; TIS weights are min(π_old/π_sampler, cap)."""
    params = create(CFG, seed=0).params()
    opt = optax.sgd(0.1)
    batch = _batch()
    lp = np.asarray(_logps(params, batch))
    old = lp - np.where(batch["advantages"] > 0, 0.5, 0.0) * batch["loss_mask"]  # ratio e^0.5 where A > 0
    batch.update(old_logps=old, sampler_logps=old - 1.0 * batch["loss_mask"], ref_logps=lp)
    kw = dict(model_cfg=CFG, optimizer=opt, on_policy=False, beta=0.1,
              loss_kwargs={"epsilon_low": 0.2, "epsilon_high": 0.2})
    _, m = grpo.grpo_step(init_state(params, opt, 0), {}, batch, **kw)
    positive = (batch["advantages"] > 0) * batch["loss_mask"]
    np.testing.assert_allclose(float(m["clip_high_fraction"]), positive.sum() / batch["loss_mask"].sum(), atol=1e-6)
    assert abs(float(m["kl"])) < 1e-7
    np.testing.assert_allclose(float(m["mismatch/ratio_max"]), np.e, rtol=1e-5)
    _, mc = grpo.grpo_step(init_state(params, opt, 0), {}, batch, correction={"level": "token", "mode": "tis",
                                                                              "cap": 2.0}, **kw)
    np.testing.assert_allclose(float(mc["correction/weight_mean"]), 2.0, rtol=1e-6)  # e > cap on every token
    # the clipped tokens carry no loss gradient: the loss is (ratio-clipped) constant there
    clipped_value = -(batch["weights"] * batch["advantages"] * np.where(batch["advantages"] > 0, 1.2, np.exp(0.0))).sum()
    np.testing.assert_allclose(float(m["loss"]), clipped_value, atol=1e-5)


def test_rollout_rows_and_dynamic_sampling(tmp_path):
    """The trainer's log-probs of the sampled tokens in the rollout's row layout equal the sampler's (fp32);
    dynamic sampling draws more prompts until every trained group has non-zero reward variance."""
    exp = _cfg(tmp_path, "train.steps=2", "dynamic_sampling=true", "max_sampling_rounds=6", "train.eval_every=2",
               'rewards=[{"fn": "test_grpo:a_fraction_on_add", "isolate": false}]')
    grpo.run(exp)
    held_out = _rows(tmp_path, "eval")[2]
    assert held_out["prompts"] == 4 and {"accuracy", "pass@4", "accuracy_sampled", "reward"} <= set(held_out)
    rows = _rows(tmp_path)
    for row in rows.values():
        assert row["mismatch/k3_kl"] < 1e-6 and abs(row["mismatch/ratio_max"] - 1.0) < 1e-3
        assert row["updates"] == 1.0 and 1.0 <= row["completion_length/mean"] <= 8.0
        assert row["generated_tokens_per_s"] > 0 and row["time/generate"] > 0
        assert row["dynamic/kept_groups"] >= 4 and row["dynamic/zero_variance_groups_trained"] == 0
    assert max(row["dynamic/rounds"] for row in rows.values()) > 1  # the other prompts' groups were dropped


def test_grpo_raises_the_reward_and_resumes_exactly(tmp_path):
    """20 steps from a random tiny model climb a reward it can reach; deleting the newest checkpoints and
    rerunning reproduces the lost steps bit for bit (prompt stream and sampling keys included)."""
    cfg = _cfg(tmp_path, "train.steps=20", "train.keep=10")
    grpo.run(cfg)
    rows = _rows(tmp_path)
    start = np.mean([rows[s]["reward"] for s in (1, 2, 3)])
    end = np.mean([rows[s]["reward"] for s in (18, 19, 20)])
    assert end > start + 0.1, (start, end)
    for step in (16, 20):
        shutil.rmtree(tmp_path / "checkpoints" / str(step))
    grpo.run(cfg)
    again = _rows(tmp_path)
    for step in range(13, 21):
        for k in ("reward", "loss", "grad_norm", "completion_length/mean"):
            assert again[step][k] == rows[step][k], (step, k)


def test_sharded_accumulated_step_equals_single_device():
    """8 rollout rows over a (2, 2, 2) mesh of fake devices with grad_accum 2 == one device, one batch
    (off-policy with a reference: every batch key is used)."""
    from polmjax import mesh as mesh_lib
    from polmjax import models
    from polmjax.train.state import init_state_sharded, state_shardings

    params = create(CFG, seed=0).params()
    opt = optax.sgd(0.1)  # Adam's m / sqrt(v) would turn float-order noise in ~0 gradients into lr-sized steps
    batch = {k: np.concatenate([v, v[::-1]]) for k, v in _batch().items()}
    batch["weights"] = np.asarray(aggregation_weights(jnp.asarray(batch["loss_mask"]), "token_mean"))
    batch["token_weights"] = batch["weights"]
    lp = np.asarray(_logps(params, batch))
    batch.update(old_logps=lp - 0.1 * batch["loss_mask"], sampler_logps=lp - 0.2 * batch["loss_mask"],
                 ref_logps=lp + 0.3 * batch["loss_mask"])
    kw = dict(model_cfg=CFG, optimizer=opt, on_policy=False, beta=0.05, entropy_coef=0.01, loss="cispo",
              loss_kwargs={"epsilon_high": 0.05}, correction={"level": "sequence", "mode": "tis", "cap": 2.0})
    want_state, want = grpo.grpo_step(init_state(params, opt, 0), {}, batch, **kw)

    mesh = mesh_lib.make_mesh(2, 2, 2)
    state = init_state_sharded(jax.device_put(params, models.param_shardings(CFG, mesh)), opt, 0, mesh)
    sharding = mesh_lib.named_sharding(mesh, ("act_batch", "act_len"), batch["input_ids"].shape)
    step = jax.jit(lambda s, b: grpo.grpo_step(s, {}, b, grad_accum=2, mesh=mesh, **kw),
                   in_shardings=(state_shardings(state), {k: sharding for k in batch}), donate_argnums=(0,))
    got_state, got = step(state, {k: jax.device_put(v, sharding) for k, v in batch.items()})
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got_state.params,
                 want_state.params)


@pytest.mark.slow  # three CLI runs, ~1-2 min; test_grpo_raises_the_reward_and_resumes_exactly covers resume in CI
def test_sigkill_and_restart_equals_uninterrupted(tmp_path, monkeypatch):
    """A GRPO run killed with SIGKILL after a checkpoint and rerun equals an uninterrupted one: every logged
    reward, loss and length, and the final parameters, bit for bit (prompt stream and sampling keys resume)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    check_sigkill_and_restart(tmp_path, "grpo", TINY, SMALL + TINY_INIT + ["train.save_every=2", "mesh.data=2"],
                              steps=8, kill_after=4)
