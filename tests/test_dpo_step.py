"""The DPO-family step on packed preference batches: hand-checked sums, limits, exact accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from polmjax import models
from polmjax.train.dpo import dpo_step, reference_params
from polmjax.train.state import init_state

CFG = models.ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8)
T, P = 24, 3  # row length, pair slots per row


def _pack(pairs):
    """Rows of [(prompt, chosen, rejected), ...] (token lists) as the preference pipeline lays them out."""
    keys = ("input_ids", "targets", "loss_mask", "positions", "segment_ids", "is_chosen")
    batch = {k: np.zeros((len(pairs), T), np.float32 if k == "loss_mask" else bool if k == "is_chosen" else np.int32)
             for k in keys}
    for b, row in enumerate(pairs):
        t = 0
        for k, (prompt, chosen, rejected) in enumerate(row):
            for s, response in ((2 * k + 1, chosen), (2 * k + 2, rejected)):
                seq = prompt + response
                n = len(seq)
                batch["input_ids"][b, t:t + n] = seq
                batch["targets"][b, t:t + n - 1] = seq[1:]
                batch["loss_mask"][b, t + len(prompt) - 1:t + n - 1] = 1.0
                batch["positions"][b, t:t + n] = np.arange(n)
                batch["segment_ids"][b, t:t + n] = s
                batch["is_chosen"][b, t:t + n] = s % 2 == 1
                t += n
    return batch


PAIRS = [[([1, 2, 3], [4, 5], [6]), ([7, 8], [9, 10, 11], [12, 13])],
         [([14, 15], [16], [17, 18, 19])],
         [([20], [21, 22], [23]), ([24, 25, 26], [27], [28, 29])],
         [([30, 31], [32, 33, 34], [35])]]


def _setup(seed=0):
    model = models.create(CFG, seed=seed)
    optimizer = optax.adamw(1e-3)
    return model.params(), optimizer


def _sequence_logprob(params, prompt, response):
    seq = np.asarray([prompt + response])
    logits = np.asarray(models.Decoder(CFG, params)(seq))[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    return sum(logp[len(prompt) - 1 + i, tok] for i, tok in enumerate(response))


def test_policy_equal_to_reference_gives_ln2_and_the_logps_are_the_unpacked_sums():
    params, optimizer = _setup()
    state = init_state(params, optimizer, 0)
    _, m = dpo_step(state, {"reference": params}, _pack(PAIRS), model_cfg=CFG, optimizer=optimizer, beta=0.1,
                    pairs_per_row=P)
    np.testing.assert_allclose(m["loss"], np.log(2.0), rtol=1e-6)
    assert float(m["rewards/margins"]) == 0.0 and float(m["pairs"]) == 6.0
    flat = [p for row in PAIRS for p in row]
    chosen = np.mean([_sequence_logprob(params, pr, c) for pr, c, _ in flat])
    rejected = np.mean([_sequence_logprob(params, pr, r) for pr, _, r in flat])
    np.testing.assert_allclose(m["logps/chosen"], chosen, rtol=1e-5)
    np.testing.assert_allclose(m["logps/rejected"], rejected, rtol=1e-5)


def test_loss_and_rewards_by_hand_against_another_reference():
    params, optimizer = _setup()
    ref, _ = _setup(seed=1)
    flat = [p for row in PAIRS for p in row]
    lp = lambda prm, which: np.array([_sequence_logprob(prm, p[0], p[which]) for p in flat])  # noqa: E731
    beta = 0.5
    r_c, r_r = beta * (lp(params, 1) - lp(ref, 1)), beta * (lp(params, 2) - lp(ref, 2))
    _, m = dpo_step(init_state(params, optimizer, 0), {"reference": ref}, _pack(PAIRS), model_cfg=CFG,
                    optimizer=optimizer, beta=beta, pairs_per_row=P)
    np.testing.assert_allclose(m["loss"], np.mean(np.log1p(np.exp(-(r_c - r_r)))), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/chosen"], r_c.mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["rewards/accuracies"], np.mean(r_c > r_r), rtol=1e-6)


@pytest.mark.parametrize("loss, extra", [("sigmoid", {}), pytest.param("ipo", {}, marks=pytest.mark.slow),
                                         ("simpo", {"gamma": 0.5}), pytest.param("hinge", {}, marks=pytest.mark.slow)])
def test_accumulation_equals_one_big_batch(loss, extra):
    params, optimizer = _setup()
    ref, _ = _setup(seed=1)
    frozen = {"reference": None if loss == "simpo" else ref}
    batch = _pack(PAIRS)
    kw = dict(model_cfg=CFG, optimizer=optimizer, loss=loss, beta=0.2, loss_kwargs=extra, pairs_per_row=P,
              nll_weight=0.3)
    one_state, one = dpo_step(init_state(params, optimizer, 0), frozen, batch, **kw)
    acc_state, acc = dpo_step(init_state(params, optimizer, 0), frozen, batch, grad_accum=2, **kw)
    for k in one:
        np.testing.assert_allclose(acc[k], one[k], rtol=2e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), acc_state.params,
                 one_state.params)


@pytest.mark.parametrize("as_base", [True, False], ids=["base", "copy"])
def test_lora_reference_is_the_base_without_a_copy_or_a_whole_copy(as_base):
    """reference='base' is the base's own arrays; reference='copy' of a LoRA policy copies base and
    adapters (the adapters alone were once copied, a reference without its base weights)."""
    from polmjax.models import lora as lora_lib
    from polmjax.models.config import LoraConfig

    cfg = CFG.replace(lora=LoraConfig(rank=2, targets=("q", "v")))

    model = lora_lib.add_adapters(models.create(CFG, seed=0), cfg.lora, seed=0)
    trainable, base = lora_lib.split(model.params())
    reference = reference_params(trainable, base, lora=as_base)
    if as_base:
        assert all(a is b for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(base)))
    else:
        assert set(reference["layers"]) == set(model.params()["layers"])
    optimizer = optax.adamw(1e-3)
    _, m = dpo_step(init_state(trainable, optimizer, 0), {"base": base, "reference": reference}, _pack(PAIRS),
                    model_cfg=model.config, optimizer=optimizer, pairs_per_row=P)
    np.testing.assert_allclose(m["loss"], np.log(2.0), rtol=1e-6)  # adapters start at B = 0: policy == base


def test_missing_reference_is_named():
    params, optimizer = _setup()
    with pytest.raises(ValueError, match="loss 'sigmoid' needs a reference model"):
        dpo_step(init_state(params, optimizer, 0), {"reference": None}, _pack(PAIRS), model_cfg=CFG,
                 optimizer=optimizer, pairs_per_row=P)


@pytest.mark.parametrize("shape", [(2, 2, 2), pytest.param((1, 8, 1), marks=pytest.mark.slow)],
                         ids=lambda s: "x".join(map(str, s)))
def test_sharded_accumulated_step_equals_single_device(shape):
    """8 rows over 8 fake devices with grad_accum 4 (micro-batches of 2 rows) == one device, one batch."""
    from polmjax import mesh as mesh_lib
    from polmjax.train.dpo import BATCH_KEYS
    from polmjax.train.state import init_state_sharded, state_shardings

    params, optimizer = _setup()
    ref, _ = _setup(seed=1)
    batch = _pack(PAIRS + PAIRS[::-1])
    kw = dict(model_cfg=CFG, optimizer=optimizer, loss="sigmoid", beta=0.2, pairs_per_row=P)
    want_state, want = dpo_step(init_state(params, optimizer, 0), {"reference": ref}, batch, **kw)

    mesh = mesh_lib.make_mesh(*shape)
    shardings = models.param_shardings(CFG, mesh)
    state = init_state_sharded(jax.device_put(params, shardings), optimizer, 0, mesh)
    frozen = {"base": {}, "reference": jax.device_put(ref, shardings)}
    batch_sharding = mesh_lib.named_sharding(mesh, ("act_batch", "act_len"), (8, T))
    step = jax.jit(lambda s, f, b: dpo_step(s, f, b, grad_accum=4, mesh=mesh, **kw),
                   in_shardings=(state_shardings(state), jax.tree.map(lambda x: x.sharding, frozen),
                                 {k: batch_sharding for k in BATCH_KEYS}), donate_argnums=(0,))
    got_state, got = step(state, frozen, {k: jax.device_put(batch[k], batch_sharding) for k in BATCH_KEYS})
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got_state.params,
                 want_state.params)


@pytest.mark.parametrize("loss", ["aot", "aot_unpaired"])
def test_quantile_losses_sort_only_the_valid_pairs(loss):
    """AOT sorts over the batch: on packed [B, P] slots the empty ones must not enter the quantiles."""
    from polmjax.losses import PREFERENCE_LOSSES
    from polmjax.train.dpo import _sorted_over_valid_pairs

    rng = np.random.RandomState(0)
    valid = (rng.rand(3, 4) > 0.4).astype(np.float32)
    args = {k: jnp.asarray((rng.randn(3, 4) * 5 - 30) * valid, jnp.float32)
            for k in ("chosen", "rejected", "ref_chosen", "ref_rejected")}
    fn = PREFERENCE_LOSSES[loss]
    got = _sorted_over_valid_pairs(fn, args, jnp.asarray(valid), {"beta": 0.1})
    keep = valid.reshape(-1) > 0
    want = fn(**{k: v.reshape(-1)[keep] for k, v in args.items()}, beta=0.1)
    np.testing.assert_allclose(np.asarray(got).reshape(-1)[:keep.sum()], want, rtol=1e-6)
    assert not np.asarray(got).reshape(-1)[keep.sum():].any()
