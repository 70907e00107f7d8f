"""Preference and reward-model losses: hand-derived values, limits, gradients, and TRL 1.16's own code.

TRL's DPO, KTO and reward losses live inside their trainers' `_compute_loss`/`compute_loss`; the tests
call those methods on `object.__new__(Trainer)` stand-ins holding only the attributes the methods read
(precomputed reference log-probs, one process), with a fake language model whose per-token log-probs
come from a fixed table of token log-probs (0 where the label is -100, as TRL's fused LM head). TRL's
ORPO and CPO (SimPO) losses are methods of their own and are called directly.
"""

import inspect
from collections import defaultdict
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polmjax.losses import KTO_LOSSES, PREFERENCE_LOSSES, combine, implicit_rewards, sft_loss, token_weights
from polmjax.losses import preference as P
from polmjax.losses.reward import bradley_terry, center_rewards

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

# fixed inputs: log-ratios chosen [1, -2, 0, -2], rejected [-0.5, 1, 0.5, -1]; Δ = [1.5, -3, -0.5, -1]
CHOSEN = np.array([-5.0, -12.0, -3.0, -20.0], np.float32)
REJECTED = np.array([-7.0, -9.0, -3.5, -20.0], np.float32)
REF_CHOSEN = np.array([-6.0, -10.0, -3.0, -18.0], np.float32)
REF_REJECTED = np.array([-6.5, -10.0, -4.0, -19.0], np.float32)
LEN_CHOSEN = np.array([4.0, 10.0, 2.0, 8.0], np.float32)
LEN_REJECTED = np.array([5.0, 6.0, 3.0, 16.0], np.float32)
FIXED = {"chosen": CHOSEN, "rejected": REJECTED, "ref_chosen": REF_CHOSEN, "ref_rejected": REF_REJECTED,
         "chosen_avg": CHOSEN / LEN_CHOSEN, "rejected_avg": REJECTED / LEN_REJECTED,
         "ref_chosen_avg": REF_CHOSEN / LEN_CHOSEN, "ref_rejected_avg": REF_REJECTED / LEN_REJECTED}


def _logsig(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def _sig(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _np_inputs(avg=False):
    keys = ("chosen_avg", "rejected_avg", "ref_chosen_avg", "ref_rejected_avg") if avg else (
        "chosen", "rejected", "ref_chosen", "ref_rejected")
    c, r, rc, rr = (FIXED[k].astype(np.float64) for k in keys)
    return c - rc, r - rr


def _hand_values():
    """name -> (kwargs, expected [B]) from each paper's equation, in float64 numpy."""
    lc, lr = _np_inputs()
    d = lc - lr
    lc_avg, lr_avg = _np_inputs(avg=True)
    d_avg = lc_avg - lr_avg
    b, eps = 0.5, 0.2
    c_avg, r_avg = FIXED["chosen_avg"].astype(np.float64), FIXED["rejected_avg"].astype(np.float64)
    odds = lambda l: l - np.log(1.0 - np.exp(l))  # noqa: E731
    aot_d = np.sort(CHOSEN - REJECTED).astype(np.float64) - np.sort(REF_CHOSEN - REF_REJECTED)
    aotu_d = np.sort(lc) - np.sort(lr)
    tau = 0.05
    return {
        "sigmoid": ({"beta": b, "label_smoothing": eps}, -(1 - eps) * _logsig(b * d) - eps * _logsig(-b * d)),
        "robust": ({"beta": b, "label_smoothing": eps},
                   (-(1 - eps) * _logsig(b * d) + eps * _logsig(-b * d)) / (1 - 2 * eps)),
        "ipo": ({"beta": b}, (d_avg - 1.0) ** 2),
        "hinge": ({"beta": b}, np.array([0.25, 2.5, 1.25, 1.5])),  # 1 - βΔ, all positive here
        "exo_pair": ({"beta": b, "label_smoothing": eps},
                     _sig(b * d) * (_logsig(b * d) - np.log(1 - eps)) + _sig(-b * d) * (_logsig(-b * d) - np.log(eps))),
        "nca_pair": ({"beta": b}, -_logsig(b * lc) - 0.5 * _logsig(-b * lc) - 0.5 * _logsig(-b * lr)),
        "bco_pair": ({"beta": b, "delta": 0.3}, -_logsig(b * lc - 0.3) - _logsig(0.3 - b * lr)),
        "sppo_hard": ({"beta": b}, np.array([0.25, 13.0, 3.25, 9.0])),  # (lc - 1)² + (lr + 1)²
        "aot": ({"beta": b, "label_smoothing": eps}, -(1 - eps) * _logsig(b * aot_d) - eps * _logsig(-b * aot_d)),
        "aot_unpaired": ({"beta": b, "label_smoothing": eps},
                         -(1 - eps) * _logsig(b * aotu_d) - eps * _logsig(-b * aotu_d)),
        "apo_zero": ({"beta": b}, 1 - _sig(b * lc) + _sig(b * lr)),
        "apo_down": ({"beta": b}, _sig(b * lc) + 1 - _sig(b * d)),
        "discopop": ({"beta": b, "tau": tau},
                     -_logsig(b * d) * (1 - _sig(b * d / tau)) + np.exp(-b * d) * _sig(b * d / tau)),
        "sigmoid_norm": ({"beta": b}, -_logsig(b * d_avg)),
        "dpo_offset": ({"beta": b, "gamma": 0.3}, -_logsig(b * d - 0.3)),  # the README's "fork it" example
        "simpo": ({"beta": 2.0, "gamma": 0.5}, -_logsig(2.0 * (c_avg - r_avg) - 0.5)),
        "orpo": ({}, -_logsig(odds(c_avg) - odds(r_avg))),
    }


def _call(fn, inputs, **kwargs):
    """Call a table entry with the log-probs its argument names ask for (the table's contract)."""
    names = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    return fn(**{n: inputs[n] for n in names}, **kwargs)


def test_table_matches_trl_loss_type_names():
    trl_dpo = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
               "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"}  # TRL 1.16 minus "sft"
    assert set(PREFERENCE_LOSSES) == trl_dpo | {"simpo", "orpo", "dpo_offset"}
    assert set(KTO_LOSSES) == {"kto", "apo_zero_unpaired"}
    assert set(_hand_values()) == set(PREFERENCE_LOSSES)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_hand_derived_values(name):
    kwargs, expected = _hand_values()[name]
    got = _call(PREFERENCE_LOSSES[name], FIXED, **kwargs)
    assert got.shape == (4,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_float32_out_of_bfloat16_in(name):
    kwargs, _ = _hand_values()[name]
    got = _call(PREFERENCE_LOSSES[name], {k: jnp.asarray(v, jnp.bfloat16) for k, v in FIXED.items()}, **kwargs)
    assert got.shape == (4,) and got.dtype == jnp.float32


def test_kto_hand_derived():
    policy = np.array([-3.0, -8.0, -5.0, -2.0], np.float32)
    ref = np.array([-4.0, -7.0, -5.0, -2.5], np.float32)
    desirable = np.array([True, True, False, False])
    r = (policy - ref).astype(np.float64)  # [1, -1, 0, 0.5]
    for kl, z in ((0.25, 0.25), (-0.4, 0.0)):
        want = np.where(desirable, 2.0 * (1 - _sig(0.5 * (r - z))), 0.5 * (1 - _sig(0.5 * (z - r))))
        got = P.kto(policy, ref, desirable, jnp.float32(kl), beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-6)
    want = np.where(desirable, 2.0 * (1 - _sig(0.5 * r)), 0.5 * _sig(0.5 * r))
    np.testing.assert_allclose(P.apo_zero_unpaired(policy, ref, desirable, beta=0.5, desirable_weight=2.0,
                                                   undesirable_weight=0.5), want, rtol=1e-6)


def test_reward_hand_derived():
    rc, rr, m = np.array([1.0, -0.5, 2.0], np.float32), np.array([0.0, 0.5, 2.5], np.float32), np.array([0.5, 0, 1])
    np.testing.assert_allclose(bradley_terry(rc, rr), [math.log1p(math.exp(-1.0)), math.log1p(math.e),
                                                       math.log1p(math.exp(0.5))], rtol=1e-6)
    np.testing.assert_allclose(bradley_terry(rc, rr, m), -_logsig(rc - rr - m), rtol=1e-6)
    np.testing.assert_allclose(center_rewards(rc, rr, 0.01), [0.01, 0.0, 0.2025], rtol=1e-6)


# ---- limits and gradients ------------------------------------------------------------------------------


def test_policy_equal_to_reference_gives_ln2():
    lp = jnp.asarray(np.random.RandomState(0).uniform(-30, -1, (2, 5)), jnp.float32)
    for loss in (P.dpo(lp[0], lp[1], lp[0], lp[1], beta=0.1),
                 P.dpo(lp[0], lp[1], lp[0], lp[1], beta=0.1, label_smoothing=0.3),
                 P.robust_dpo(lp[0], lp[1], lp[0], lp[1], beta=0.1, label_smoothing=0.3)):
        np.testing.assert_allclose(loss, np.full(5, math.log(2.0)), rtol=1e-6)


def test_zero_label_smoothing_is_dpo():
    args = (CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED)
    want = -_logsig(0.5 * (_np_inputs()[0] - _np_inputs()[1]))
    np.testing.assert_allclose(P.dpo(*args, beta=0.5), want, rtol=1e-6)
    np.testing.assert_allclose(P.dpo(*args, beta=0.5, label_smoothing=0.0), want, rtol=1e-6)
    np.testing.assert_allclose(P.robust_dpo(*args, beta=0.5, label_smoothing=0.0), want, rtol=1e-6)


def test_ipo_minimum_at_its_target():
    beta = 0.25  # target Δ̄ = 1/(2β) = 2
    loss = lambda c: P.ipo(c, jnp.float32(-3.0), jnp.float32(-2.0), jnp.float32(-3.0), beta=beta)  # noqa: E731
    assert float(loss(jnp.float32(0.0))) == 0.0  # Δ̄ = (0 - -2) - 0 = 2
    assert float(jax.grad(loss)(jnp.float32(0.0))) == 0.0
    np.testing.assert_allclose([loss(jnp.float32(-0.1)), loss(jnp.float32(0.1))], [0.01, 0.01], rtol=1e-5)


def test_dpo_gradient_signs():
    grads = jax.grad(lambda *a: P.dpo(*a, beta=0.1).sum(), argnums=(0, 1, 2, 3))(
        *(jnp.asarray(x) for x in (CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED)))
    g_c, g_r, g_rc, g_rr = (np.asarray(g) for g in grads)
    assert (g_c < 0).all() and (g_r > 0).all()  # raising chosen lowers the loss, raising rejected raises it
    np.testing.assert_array_equal(g_rc, -g_c)
    np.testing.assert_array_equal(g_rr, -g_r)


def test_orpo_is_finite_near_zero_and_very_negative():
    values = np.array([0.0, -1e-9, -1e-6, -1e-3, -0.69, -0.7, -50.0, -1e4], np.float32)
    c, r = (jnp.asarray(x) for x in np.meshgrid(values, values))
    c, r = c.reshape(-1), r.reshape(-1)
    loss = P.orpo(c, r)
    g_c, g_r = jax.grad(lambda a, b: P.orpo(a, b).sum(), argnums=(0, 1))(c, r)
    assert np.isfinite(loss).all() and np.isfinite(g_c).all() and np.isfinite(g_r).all()
    moving = np.asarray(c) < -np.finfo(np.float32).eps  # below the cap, raising chosen lowers the loss
    assert (np.asarray(g_c)[moving] <= 0).all() and (np.asarray(g_r)[np.asarray(r) < -1e-6] >= 0).all()


def test_kto_holds_kl_constant():
    policy, ref = jnp.asarray(CHOSEN), jnp.asarray(REF_CHOSEN)
    desirable = jnp.asarray([True, False, True, False])
    for kl in (0.7, -0.3):
        g = jax.grad(lambda k: P.kto(policy, ref, desirable, k, beta=0.5).sum())(jnp.float32(kl))
        assert float(g) == 0.0
    np.testing.assert_array_equal(P.kto(policy, ref, desirable, jnp.float32(-0.3), beta=0.5),
                                  P.kto(policy, ref, desirable, jnp.float32(0.0), beta=0.5))


def test_discopop_finite_for_very_negative_margins():
    chosen = jnp.asarray([-1000.0, -10.0], jnp.float32)
    rejected = jnp.zeros(2, jnp.float32)
    loss = P.discopop(chosen, rejected, rejected, rejected, beta=1.0)
    grad = jax.grad(lambda c: P.discopop(c, rejected, rejected, rejected, beta=1.0).sum())(chosen)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    np.testing.assert_allclose(loss, [1000.0, 10.0 + math.log1p(math.exp(-10.0))], rtol=1e-6)


def test_exo_requires_label_smoothing():
    with pytest.raises(ValueError, match="exo_pair: label_smoothing must be > 0"):
        P.exo_pair(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1, label_smoothing=0.0)


def test_combine():
    a, b = jnp.asarray([1.0, 2.0]), jnp.asarray([10.0, 20.0])
    np.testing.assert_allclose(combine({"sigmoid": a, "bco_pair": b}), [11.0, 22.0])
    np.testing.assert_allclose(combine({"sigmoid": a, "bco_pair": b}, {"sigmoid": 0.8, "bco_pair": 0.2}), [2.8, 5.6])
    with pytest.raises(ValueError, match=r"loss weights \['sigmoid'\] do not match the losses \['bco_pair', 'sigm"):
        combine({"sigmoid": a, "bco_pair": b}, {"sigmoid": 1.0})


def test_implicit_rewards_carry_no_gradient():
    g = jax.grad(lambda c: sum(x.sum() for x in implicit_rewards(c, REJECTED, REF_CHOSEN, REF_REJECTED, 0.1)))(
        jnp.asarray(CHOSEN))
    np.testing.assert_array_equal(g, np.zeros(4))


# ---- TRL's own code --------------------------------------------------------------------------------------


class _OneProcess:
    """The accelerator calls TRL's loss code makes, on one process."""

    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather


class _TableLM:
    """TRL's model with its fused LM head: log p(token) from a fixed table, 0 where the label is -100."""

    training = True

    def __init__(self, table):
        self.table = torch.as_tensor(table)

    def __call__(self, input_ids, labels, **kwargs):
        targets = labels[:, 1:]
        log_probs = torch.where(targets == -100, 0.0, self.table[targets.clamp(min=0)])
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros_like(log_probs, dtype=torch.bool))


def _sequences(n, seed, T=10, V=32):
    """n prompt+completion rows: ids, masks, the table LM's completion log-probs (sum, mean) and lengths."""
    rng = np.random.RandomState(seed)
    table = -rng.uniform(0.05, 4.0, V).astype(np.float32)
    ids = rng.randint(0, V, (n, T))
    prompt, length = rng.randint(1, 4, n), rng.randint(1, 7, n)
    pos = np.arange(T)[None]
    completion = ((pos >= prompt[:, None]) & (pos < (prompt + length)[:, None])).astype(np.int64)
    attention = (pos < (prompt + length)[:, None]).astype(np.int64)
    token_lp = np.where(completion[:, 1:] == 1, table[ids[:, 1:]], 0.0).astype(np.float32)
    return SimpleNamespace(table=table, ids=ids, completion=completion, attention=attention, token_lp=token_lp,
                           logps=token_lp.sum(1), length=length.astype(np.float32))


def _trl_dpo(loss_types, loss_weights, seqs, ref, **hparams):
    """DPOTrainer._compute_loss on a stand-in holding only what it reads (precomputed reference log-probs)."""
    from trl import DPOTrainer

    t = object.__new__(DPOTrainer)
    t.model = _TableLM(seqs.table)
    t.accelerator = _OneProcess()
    t.aux_loss_enabled, t.ld_alpha, t.precompute_ref_logps, t.use_weighting = False, None, True, False
    t.f_divergence_type = "reverse_kl"
    t.loss_types, t.loss_weights = loss_types, loss_weights
    t.beta, t.label_smoothing = hparams.get("beta", 0.1), hparams.get("label_smoothing", 0.0)
    t.args = SimpleNamespace(discopop_tau=hparams.get("tau", 0.05))
    t._metrics, t._total_train_tokens, t._tp_size = {"train": defaultdict(list), "eval": defaultdict(list)}, 0, 1
    B = len(ref) // 2
    inputs = {"input_ids": torch.as_tensor(seqs.ids), "attention_mask": torch.as_tensor(seqs.attention),
              "completion_mask": torch.as_tensor(seqs.completion),
              "ref_chosen_logps": torch.as_tensor(ref[:B]), "ref_rejected_logps": torch.as_tensor(ref[B:])}
    loss = t._compute_loss(t.model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in t._metrics["train"].items()}


def _pair_inputs(seqs, ref):
    B = len(ref) // 2
    lp, n = seqs.logps, seqs.length
    return {"chosen": lp[:B], "rejected": lp[B:], "ref_chosen": ref[:B], "ref_rejected": ref[B:],
            "chosen_avg": lp[:B] / n[:B], "rejected_avg": lp[B:] / n[B:],
            "ref_chosen_avg": ref[:B] / n[:B], "ref_rejected_avg": ref[B:] / n[B:]}


TRL_DPO_CASES = [("sigmoid", {"beta": 0.5}), ("robust", {"beta": 0.5, "label_smoothing": 0.1}),
                 ("ipo", {"beta": 0.5}), ("hinge", {"beta": 0.5}),
                 ("exo_pair", {"beta": 0.5, "label_smoothing": 1e-3}), ("nca_pair", {"beta": 0.5}),
                 ("bco_pair", {"beta": 0.5}), ("sppo_hard", {"beta": 0.5}),
                 ("aot", {"beta": 0.5, "label_smoothing": 0.1}),
                 ("aot_unpaired", {"beta": 0.5, "label_smoothing": 0.1}),
                 ("apo_zero", {"beta": 0.5}), ("apo_down", {"beta": 0.5}), ("discopop", {"beta": 0.5, "tau": 0.05}),
                 ("sigmoid_norm", {"beta": 0.5})]


@pytest.mark.parametrize("name,hparams", TRL_DPO_CASES, ids=[c[0] for c in TRL_DPO_CASES])
def test_matches_trl_dpo_trainer(name, hparams):
    seqs = _sequences(12, seed=1)
    ref = (seqs.logps + np.random.RandomState(2).randn(12) * 2.0).astype(np.float32)
    want, metrics = _trl_dpo([name], [1.0], seqs, ref, **hparams)
    got = _call(PREFERENCE_LOSSES[name], _pair_inputs(seqs, ref), **hparams)
    np.testing.assert_allclose(float(got.mean()), want, rtol=2e-5, atol=2e-6)

    r_c, r_r = implicit_rewards(*(_pair_inputs(seqs, ref)[k] for k in ("chosen", "rejected", "ref_chosen",
                                                                        "ref_rejected")), hparams["beta"])
    np.testing.assert_allclose([r_c.mean(), r_r.mean(), (r_c > r_r).mean(), (r_c - r_r).mean()],
                               [metrics["rewards/chosen"], metrics["rewards/rejected"],
                                metrics["rewards/accuracies"], metrics["rewards/margins"]], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("loss_types,loss_weights", [(["sigmoid", "sft"], [1.0, 0.5]),  # RPO, rpo_alpha = 0.5
                                                     (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])])  # MPO
def test_combinations_match_trl(loss_types, loss_weights):
    seqs = _sequences(12, seed=3)
    ref = (seqs.logps + np.random.RandomState(4).randn(12) * 2.0).astype(np.float32)
    want, _ = _trl_dpo(loss_types, loss_weights, seqs, ref, beta=0.5)
    inputs = _pair_inputs(seqs, ref)
    weights = dict(zip(loss_types, loss_weights))
    pair = {name: _call(PREFERENCE_LOSSES[name], inputs, beta=0.5) for name in loss_types if name != "sft"}
    chosen_mask = seqs.completion[:6, 1:]
    nll = sft_loss(seqs.token_lp[:6], token_weights(chosen_mask, np.ones_like(chosen_mask))).sum()
    got = combine(pair, {k: weights[k] for k in pair}).mean() + weights["sft"] * nll
    np.testing.assert_allclose(float(got), want, rtol=2e-5)


@pytest.mark.parametrize("kl_shift", [1.0, -1.0])  # the estimated KL positive, or negative and clamped to 0
@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
def test_matches_trl_kto_trainer(name, kl_shift):
    from trl import KTOTrainer

    seqs, mismatched = _sequences(8, seed=5), _sequences(8, seed=6)
    mismatched.table = seqs.table  # the same model scores both
    kl_policy = np.where(mismatched.completion[:, 1:] == 1, seqs.table[mismatched.ids[:, 1:]], 0.0).sum(1)
    rng = np.random.RandomState(7)
    ref = (seqs.logps + rng.randn(8)).astype(np.float32)
    ref_kl = (kl_policy - kl_shift - 0.1 * rng.randn(8)).astype(np.float32)
    desirable = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)

    # KTOTrainer._compute_loss on a stand-in holding only what it reads (precomputed reference log-probs)
    t = object.__new__(KTOTrainer)
    t.model, t.accelerator = _TableLM(seqs.table), _OneProcess()
    t.calculate_KL, t.precompute_ref_logps, t.aux_loss_enabled = True, True, False
    t.loss_type, t.beta, t.desirable_weight, t.undesirable_weight = name, 0.5, 1.5, 0.7
    t._metrics, t._total_train_tokens, t._tp_size = {"train": defaultdict(list), "eval": defaultdict(list)}, 0, 1
    batch = {"input_ids": torch.as_tensor(seqs.ids), "attention_mask": torch.as_tensor(seqs.attention),
             "completion_mask": torch.as_tensor(seqs.completion), "KL_input_ids": torch.as_tensor(mismatched.ids),
             "KL_attention_mask": torch.as_tensor(mismatched.attention),
             "KL_completion_mask": torch.as_tensor(mismatched.completion), "label": torch.as_tensor(desirable),
             "ref_logps": torch.as_tensor(ref), "ref_KL_logps": torch.as_tensor(ref_kl)}
    want = float(t._compute_loss(t.model, batch, return_outputs=False))

    kwargs = {"beta": 0.5, "desirable_weight": 1.5, "undesirable_weight": 0.7}
    if name == "kto":
        kwargs["kl"] = jnp.float32((kl_policy - ref_kl).mean())
        np.testing.assert_allclose(t._metrics["train"]["kl"][-1], max(float(kwargs["kl"]), 0.0), rtol=1e-5, atol=1e-6)
    got = KTO_LOSSES[name](seqs.logps, ref, desirable, **kwargs)
    np.testing.assert_allclose(float(got.mean()), want, rtol=2e-5, atol=2e-6)


def test_orpo_matches_trl():
    from trl.experimental.orpo import ORPOTrainer

    rng = np.random.RandomState(8)
    c = np.concatenate([-rng.uniform(0.01, 3.0, 6), [-1e-4, -30.0]]).astype(np.float32)
    r = np.concatenate([-rng.uniform(0.01, 3.0, 6), [-25.0, -1e-5]]).astype(np.float32)
    t = object.__new__(ORPOTrainer)  # odds_ratio_loss reads beta and accelerator.device
    t.beta, t.accelerator = 0.7, _OneProcess()
    losses, *_ = t.odds_ratio_loss(torch.as_tensor(c), torch.as_tensor(r))
    np.testing.assert_allclose(0.7 * P.orpo(c, r), -losses.numpy(), rtol=2e-5, atol=1e-6)  # TRL returns −λ·L


def test_simpo_matches_trl_cpo():
    from trl.experimental.cpo import CPOTrainer

    rng = np.random.RandomState(9)
    c, r = (-rng.uniform(0.1, 3.0, 8).astype(np.float32) for _ in range(2))
    t = object.__new__(CPOTrainer)  # cpo_loss reads these attributes only
    t.alpha, t.loss_type, t.beta, t.simpo_gamma, t.label_smoothing = 0.0, "simpo", 2.0, 0.5, 0.0
    t.accelerator = _OneProcess()
    losses, *_ = t.cpo_loss(torch.as_tensor(c), torch.as_tensor(r))
    np.testing.assert_allclose(P.simpo(c, r, beta=2.0, gamma=0.5), losses.numpy(), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("margin,coefficient", [(False, None), (True, None), (True, 0.01)])
def test_reward_losses_match_trl(margin, coefficient):
    from trl import RewardTrainer

    rng = np.random.RandomState(10)
    rewards = rng.randn(12, 1).astype(np.float32) * 2.0
    m = rng.uniform(0, 1, 6).astype(np.float32)
    t = object.__new__(RewardTrainer)  # compute_loss reads these attributes only
    t.model, t.accelerator = SimpleNamespace(training=True), _OneProcess()
    t.args = SimpleNamespace(center_rewards_coefficient=coefficient)
    t._metrics, t._total_train_tokens, t._tp_size = {"train": defaultdict(list), "eval": defaultdict(list)}, 0, 1
    inputs = {"attention_mask": torch.ones(12, 4, dtype=torch.long)}
    if margin:
        inputs["margin"] = torch.as_tensor(m)
    want = float(t.compute_loss(lambda **_: SimpleNamespace(logits=torch.as_tensor(rewards)), inputs))

    rc, rr = rewards[:6, 0], rewards[6:, 0]
    got = bradley_terry(rc, rr, m if margin else None).mean()
    if coefficient is not None:
        got = got + center_rewards(rc, rr, coefficient).mean()
    np.testing.assert_allclose(float(got), want, rtol=2e-5)
