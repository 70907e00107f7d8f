"""The SFT step: golden numbers, accumulation == one batch, packed == unpacked, sharded == one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from polmjax import mesh as mesh_lib
from polmjax import models
from polmjax.losses import sft_loss, token_weights
from polmjax.train.optim import OptimConfig, decay_mask, make_optimizer
from polmjax.train.sft import BATCH_KEYS, jit_sft_step, sft_step
from polmjax.train.state import init_state, init_state_sharded, state_shardings

CFG = models.ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8)


def _docs(seed=0, n=8):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, 64, rs.randint(4, 12)) for _ in range(n)]


def _unpacked_batch(docs, T=16, prompt=2):
    """One document per row; loss on tokens after the first `prompt` tokens."""
    B = len(docs)
    out = {k: np.zeros((B, T), np.int32) for k in BATCH_KEYS}
    out["loss_mask"] = np.zeros((B, T), np.float32)
    for i, d in enumerate(docs):
        n = len(d)
        out["input_ids"][i, :n] = d
        out["targets"][i, :n - 1] = d[1:]
        out["loss_mask"][i, prompt - 1:n - 1] = 1
        out["positions"][i, :n] = np.arange(n)
        out["segment_ids"][i, :n] = 1
    return out


def _packed_batch(docs, rows=4, T=32, prompt=2):
    out = {k: np.zeros((rows, T), np.int32) for k in BATCH_KEYS}
    out["loss_mask"] = np.zeros((rows, T), np.float32)
    fill = [0] * rows
    for j, d in enumerate(docs):
        r = j % rows
        s, n = fill[r], len(d)
        out["input_ids"][r, s:s + n] = d
        out["targets"][r, s:s + n - 1] = d[1:]
        out["loss_mask"][r, s + prompt - 1:s + n - 1] = 1
        out["positions"][r, s:s + n] = np.arange(n)
        out["segment_ids"][r, s:s + n] = j // rows + 1
        fill[r] += n
    return out


def _setup(optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant")):
    params = models.init_params(CFG, jax.random.key(0))
    opt, schedule = make_optimizer(optim, 10)
    return init_state(params, opt, seed=0), opt, schedule


def _naive_loss(params, batch, reduction):
    logits = models.Decoder(CFG, params)(batch["input_ids"], positions=batch["positions"],
                                         segment_ids=batch["segment_ids"])
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch["targets"][..., None], -1)[..., 0]
    return sft_loss(lp, token_weights(batch["loss_mask"], batch["segment_ids"], reduction)).sum()


def test_golden_step():
    state, opt, schedule = _setup()
    batch = _unpacked_batch(_docs())
    new, metrics = sft_step(state, {}, batch, model_cfg=CFG, optimizer=opt, schedule=schedule)
    # loss of a random init is close to log(64) = 4.1589; the exact values pin the whole step down
    np.testing.assert_allclose(float(metrics["loss"]), 4.1594739, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), 1.1823850, rtol=1e-5)
    assert int(new.step) == 1 and float(metrics["tokens"]) == batch["loss_mask"].sum()
    ref_loss, ref_grads = jax.value_and_grad(_naive_loss)(state.params, batch, "token")
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(jnp.sqrt(sum(
        jnp.sum(g ** 2) for g in jax.tree.leaves(ref_grads)))), rtol=1e-5)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_accumulation_equals_one_batch(reduction):
    opt = optax.sgd(1.0)  # the update is the gradient itself, so this compares gradients exactly
    state = init_state(models.init_params(CFG, jax.random.key(0)), opt, seed=0)
    batch = _unpacked_batch(_docs(1))
    one, m1 = sft_step(state, {}, batch, model_cfg=CFG, optimizer=opt, reduction=reduction)
    four, m4 = sft_step(state, {}, batch, model_cfg=CFG, optimizer=opt, reduction=reduction, grad_accum=4)
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-7, rtol=0)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_packed_equals_unpacked(reduction):
    state, opt, _ = _setup()
    docs = _docs(2)
    _, unpacked = sft_step(state, {}, _unpacked_batch(docs), model_cfg=CFG, optimizer=opt, reduction=reduction)
    _, packed = sft_step(state, {}, _packed_batch(docs), model_cfg=CFG, optimizer=opt, reduction=reduction)
    np.testing.assert_allclose(float(packed["loss"]), float(unpacked["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(packed["grad_norm"]), float(unpacked["grad_norm"]), rtol=1e-4)


def test_sequence_weights_by_hand():
    mask = np.array([[0, 1, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0]], np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 2], [1, 1, 0, 0, 0, 0]])
    w = np.asarray(token_weights(mask, seg, "sequence"))
    # three documents: row0/seg1 has 2 tokens, row0/seg2 has 2, row1/seg1 has 2 -> each token 1/2 * 1/3
    np.testing.assert_allclose(w, mask / 6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(token_weights(mask, seg, "token")), mask / 6, rtol=1e-6)


# CI time: 1x8x1 is slow, as in test_dpo_step and test_reward_model: 2x2x2 shards over fsdp (and data and tensor)
MESHES = [(2, 2, 2), pytest.param((1, 8, 1), marks=pytest.mark.slow), (8, 1, 1)]
SHARDED_BATCHES = [_unpacked_batch(_docs(10 + i)) for i in range(3)]


@pytest.fixture(scope="module")
def single_device_losses():
    """Losses of three un-jitted steps on one device: what every mesh below must reproduce."""
    state, opt, schedule = _setup()
    losses = []
    for b in SHARDED_BATCHES:
        state, m = sft_step(state, {}, b, model_cfg=CFG, optimizer=opt, schedule=schedule)
        losses.append(float(m["loss"]))
    return losses


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_steps_equal_single_device(shape, single_device_losses):
    batches, ref = SHARDED_BATCHES, single_device_losses
    _, opt, schedule = _setup()
    mesh = mesh_lib.make_mesh(*shape)
    shardings = models.param_shardings(CFG, mesh)
    params = jax.device_put(models.init_params(CFG, jax.random.key(0)), shardings)
    state = init_state_sharded(params, opt, 0, mesh)
    batch_sharding = mesh_lib.named_sharding(mesh, ("act_batch", "act_len"), (8, 16))
    step = jit_sft_step(state_shardings(state), {}, batch_sharding, model_cfg=CFG, optimizer=opt,
                        schedule=schedule, mesh=mesh)
    got = []
    for b in batches:
        state, m = step(state, {}, {k: jax.device_put(v, batch_sharding) for k, v in b.items()})
        got.append(float(m["loss"]))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    expected = models.param_shardings(CFG, mesh)["layers"]["q"]
    assert state.params["layers"]["q"].sharding.is_equivalent_to(expected, 4)
    assert state.opt_state[1][0].mu["layers"]["q"].sharding.is_equivalent_to(expected, 4)


def test_decay_mask():
    mask = decay_mask(models.init_params(CFG.replace(qkv_bias=True), jax.random.key(0)))
    assert mask["layers"]["q"] and mask["lm_head"] and not mask["embed"]
    assert not mask["layers"]["attn_norm"] and not mask["final_norm"] and not mask["layers"]["q_bias"]


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_each_optimizer_lowers_the_loss(name):
    opt, schedule = make_optimizer(OptimConfig(name=name, lr=3e-3 if name == "lion" else 1e-2, warmup_steps=0,
                                               schedule="constant", weight_decay=0.01), 10)
    state = init_state(models.init_params(CFG, jax.random.key(0)), opt, seed=0)
    batch = _unpacked_batch(_docs(4))
    step = jax.jit(lambda s, b: sft_step(s, {}, b, model_cfg=CFG, optimizer=opt))
    losses = []
    for _ in range(8):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses


def test_schedule_warmup_then_cosine():
    _, schedule = make_optimizer(OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1), 110)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 5, 10, 60, 110)], [0, 0.5, 1.0, 0.55, 0.1],
                               atol=1e-6)


def test_bf16_compute_keeps_fp32_master_weights():
    state, opt, _ = _setup()
    batch = _unpacked_batch(_docs(5))
    _, ref = sft_step(state, {}, batch, model_cfg=CFG, optimizer=opt)
    new, got = sft_step(state, {}, batch, model_cfg=CFG.replace(compute_dtype="bfloat16"), optimizer=opt)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new.params))
    np.testing.assert_allclose(float(got["loss"]), float(ref["loss"]), rtol=1e-2)
