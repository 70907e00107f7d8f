"""KTO end to end: KL-baseline sequences in the unpaired pipeline, the step by hand, exact accumulation
(the KL reference point included), a short run through `polmjax.train.kto.run`, settings errors."""

import dataclasses
import functools
import json
import os

import jax
import numpy as np
import optax
import pytest
from kill_restart import TINY_INIT, check_sigkill_and_restart

from polmjax import config as config_lib
from polmjax import models
from polmjax.data import DataConfig, UnpairedPipeline, load_records, tokenize_unpaired
from polmjax.data.toy import build_tokenizer, write_toy_preference_dataset
from polmjax.models import ModelConfig, RopeConfig
from polmjax.train import kto
from polmjax.train.config import ModelSource
from polmjax.train.state import init_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "kto", "tiny.py")


# ---- the pipeline's KL-baseline sequences ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def unpaired(tmp_path_factory):
    path = write_toy_preference_dataset(tmp_path_factory.mktemp("u") / "u.jsonl", n=10, seed=7, format="unpaired")
    return path, load_records(path).rows


def _segment(b, r, s, key="input_ids"):
    return b[key][r][b["segment_ids"][r] == s]


def _tokenised(rows, tok):
    return [tokenize_unpaired(r, tok, 10**6) for r in rows]


def test_kl_sequences_rotate_completions_within_the_batch_as_trl(tok, unpaired):
    """packing='none', one process: batch = 4 consecutive examples of the stream, and each example's KL
    sequence is its own prompt + the completion of the previous example of the batch (cyclically), TRL's
    `_prepare_dataset` rule; masks on both completions, `desirable` on the example's own sequence only."""
    path, rows = unpaired
    ids = _tokenised(rows, tok)
    by_tokens = {tuple(np.r_[x["prompt_ids"], x["completion_ids"]].tolist()): i for i, x in enumerate(ids)}
    pipe = UnpairedPipeline(DataConfig(path=path, packing="none", num_epochs=1), tok, global_batch=4, seq_len=128,
                            kl_pairs=True)
    batches = list(pipe)
    assert [b["input_ids"].shape for b in batches] == [(4, 128)] * 3
    seen = []
    for b in batches:
        rows_here = [r for r in range(4) if b["segment_ids"][r].max() > 0]
        records = [by_tokens[tuple(_segment(b, r, 1).tolist())] for r in rows_here]
        seen += records
        for j, (r, rec) in enumerate(zip(rows_here, records)):
            partner = records[j - 1]  # the previous example of the batch, the first takes the last
            assert partner != rec
            prompt, completion, other = ids[rec]["prompt_ids"], ids[rec]["completion_ids"], ids[partner]["completion_ids"]
            np.testing.assert_array_equal(_segment(b, r, 2), np.r_[prompt, other])
            assert (b["segment_ids"][r] == 2).sum() == len(prompt) + len(other) and b["segment_ids"][r].max() == 2
            for s, response in ((1, completion), (2, other)):
                n, p = len(prompt) + len(response), len(prompt)
                np.testing.assert_array_equal(_segment(b, r, s, "loss_mask"), (np.arange(n) >= p - 1) & (np.arange(n) < n - 1))
                np.testing.assert_array_equal(_segment(b, r, s, "positions"), np.arange(n))
                assert (_segment(b, r, s, "desirable") == (s == 1 and rows[rec]["label"])).all()
                assert (_segment(b, r, s, "example_ids") == r * 32).all()  # slot 0 of row r; 128 // 4 slots a row
    assert sorted(seen) == list(range(10))  # one epoch: every example once; the last batch holds 2 (rotated in 2)


def test_kl_sequences_are_deterministic_across_resume_and_packing(tok, unpaired):
    """Packed, several epochs: resuming from a saved state gives the same batches (KL sequences included),
    a fresh pipeline the same stream, and no example ever takes its own completion."""
    path, rows = unpaired
    ids = _tokenised(rows, tok)
    completions = {tuple(x["completion_ids"].tolist()) for x in ids}

    def make():
        return UnpairedPipeline(DataConfig(path=path, packing="best_fit", pack_buffer=6, num_epochs=3), tok,
                                global_batch=2, seq_len=96, kl_pairs=True)

    it = iter(make())
    first = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    rest = list(it)
    resumed = iter(make())
    resumed.set_state(state)
    again = list(resumed)
    assert len(rest) == len(again) > 3
    for a, b in zip(rest, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    fresh = list(make())
    for a, b in zip(first + rest, fresh):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    n_examples = 0
    for b in first + rest:
        for r in range(2):
            for k in range(int(b["segment_ids"][r].max()) // 2):
                own, kl = _segment(b, r, 2 * k + 1), _segment(b, r, 2 * k + 2)
                n_prompt = int((_segment(b, r, 2 * k + 1, "loss_mask") == 0).sum())  # prompt targets + the last
                assert not np.array_equal(own, kl)
                assert tuple(kl[n_prompt:].tolist()) in completions
                n_examples += 1
    assert n_examples == 30


def test_one_segment_layout_without_kl_and_fingerprint(tok, unpaired):
    path, _ = unpaired
    plain = UnpairedPipeline(DataConfig(path=path, packing="none", num_epochs=1), tok, global_batch=2, seq_len=64)
    b = next(iter(plain))
    assert b["segment_ids"].max() == 1 and plain.examples_per_row == 32
    with_kl = UnpairedPipeline(DataConfig(path=path, packing="none", num_epochs=1), tok, global_batch=2, seq_len=64,
                               kl_pairs=True)
    assert with_kl.examples_per_row == 16
    it = iter(with_kl)
    next(it)
    with pytest.raises(Exception, match="kl_pairs: saved True, now False"):
        iter(plain).set_state(it.get_state())


# ---- the step ---------------------------------------------------------------------------------------------------

CFG = models.ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8)
T, S = 24, 6  # row length, example slots per row (pairs_per_row(24))
# rows of (prompt, completion, KL completion, label)
EXAMPLES = [[([1, 2, 3], [4, 5], [9, 10, 11], True), ([7, 8], [9, 10, 11], [4, 5], False)],
            [([14, 15], [16], [21, 22], True)],
            [([20], [21, 22], [16], False), ([24, 25, 26], [27], [32, 33, 34], True)],
            [([30, 31], [32, 33, 34], [27], False)]]


def _pack(rows, kl=True):
    """Rows of examples laid out as the unpaired pipeline does (kl: example + KL segments per slot)."""
    keys = ("input_ids", "targets", "loss_mask", "positions", "segment_ids", "desirable")
    batch = {k: np.zeros((len(rows), T), np.float32 if k == "loss_mask" else bool if k == "desirable" else np.int32)
             for k in keys}
    for b, row in enumerate(rows):
        t = s = 0
        for prompt, completion, other, label in row:
            for response, own in ((completion, True), (other, False))[: 2 if kl else 1]:
                seq = prompt + response
                n = len(seq)
                s += 1
                batch["input_ids"][b, t:t + n] = seq
                batch["targets"][b, t:t + n - 1] = seq[1:]
                batch["loss_mask"][b, t + len(prompt) - 1:t + n - 1] = 1.0
                batch["positions"][b, t:t + n] = np.arange(n)
                batch["segment_ids"][b, t:t + n] = s
                batch["desirable"][b, t:t + n] = own and label
                t += n
    return batch


def _sequence_logprobs(params, pairs):
    """Log-prob sums of each (prompt, response) by a plain forward: one right-padded batch (causal, so the
    padding after a sequence does not touch it), float64 log-softmax."""
    ids = np.zeros((len(pairs), T), np.int32)
    for i, (prompt, response) in enumerate(pairs):
        ids[i, :len(prompt) + len(response)] = prompt + response
    logits = np.asarray(models.Decoder(CFG, params)(ids), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return np.array([sum(logp[i, len(p) - 1 + j, t] for j, t in enumerate(r)) for i, (p, r) in enumerate(pairs)])


def _step(**kw):
    return jax.jit(functools.partial(kto.kto_step, model_cfg=CFG, **kw))


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.fixture(scope="module")
def two_models():
    # seeds chosen so that the policy's KL-sequence log-probs exceed the reference's (kl > 0, not clamped)
    return models.create(CFG, seed=1).params(), models.create(CFG, seed=0).params()


@pytest.mark.parametrize("loss", ["kto", pytest.param("apo_zero_unpaired", marks=pytest.mark.slow)])
def test_step_by_hand_and_accumulation_is_exact(two_models, loss):
    """The loss, kl and TRL's metrics by hand (plain forwards, float64), and grad_accum=2 (the reference point
    from a first pass over the whole batch) == grad_accum=1 (from the step's own forward): metrics and the
    updated parameters."""
    params, ref = two_models
    flat = [e for row in EXAMPLES for e in row]
    lp = lambda prm, which: _sequence_logprobs(prm, [(e[0], e[which]) for e in flat])  # noqa: E731
    label = np.array([e[3] for e in flat])
    beta, w_d, w_u = 0.5, 1.3, 0.7
    r = lp(params, 1) - lp(ref, 1)
    kl = loss == "kto"
    if kl:
        z = max(np.mean(lp(params, 2) - lp(ref, 2)), 0.0)
        assert z > 0.05  # the reference point is not clamped away: the KL sequences matter here
        want = np.where(label, w_d * (1 - _sig(beta * (r - z))), w_u * (1 - _sig(beta * (z - r))))
    else:
        want = np.where(label, w_d * (1 - _sig(beta * r)), w_u * _sig(beta * r))
    optimizer = optax.adamw(1e-3)
    kw = {"optimizer": optimizer, "loss": loss, "beta": beta, "desirable_weight": w_d, "undesirable_weight": w_u,
          "slots_per_row": S if kl else 12}
    batch = _pack(EXAMPLES, kl=kl)
    one_state, one = _step(**kw)(init_state(params, optimizer, 0), {"reference": ref}, batch)
    np.testing.assert_allclose(one["loss"], want.mean(), rtol=1e-5)
    if kl:
        np.testing.assert_allclose(one["kl"], z, rtol=1e-4)
    np.testing.assert_allclose(one["rewards/chosen"], beta * r[label].mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(one["rewards/rejected"], beta * r[~label].mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(one["logps/chosen"], lp(params, 1)[label].mean(), rtol=1e-5)
    np.testing.assert_allclose(one["logps/rejected"], lp(params, 1)[~label].mean(), rtol=1e-5)
    np.testing.assert_allclose(one["rewards/accuracies"], np.mean(np.where(label, r > 0, r < 0)), rtol=1e-6)
    assert (float(one["examples"]), float(one["desirable"]), float(one["undesirable"])) == (6.0, 3.0, 3.0)

    acc_state, acc = _step(grad_accum=2, **kw)(init_state(params, optimizer, 0), {"reference": ref}, batch)
    assert set(one) == set(acc) and ("kl" in one) == kl
    for k in one:
        np.testing.assert_allclose(acc[k], one[k], rtol=2e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), acc_state.params,
                 one_state.params)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), one_state.params, params))
    assert max(moved) > 5e-4


def test_lora_reference_is_the_base_and_policy_equal_to_reference_gives_one_half():
    """LoRA adapters start at B = 0, so the policy equals its base, the reference ("auto" = the base with the
    adapters off, the same arrays): r = 0, z = 0, and every example's loss is 1 - sigmoid(0) = 1/2."""
    from polmjax.data import DataConfig as _DataConfig
    from polmjax.models import lora as lora_lib
    from polmjax.models.config import LoraConfig

    lora = LoraConfig(rank=2, targets=("q", "v"))
    model = lora_lib.add_adapters(models.create(CFG, seed=0), lora, seed=0)
    trainable, base = lora_lib.split(model.params())
    exp = kto.KTOExperiment(model=ModelSource(init=CFG), data=_DataConfig(path="toy:unpaired"), lora=lora)
    frozen = kto.frozen_inputs(exp, trainable, base)
    assert all(a is b for a, b in zip(jax.tree.leaves(frozen["reference"]), jax.tree.leaves(base)))
    optimizer = optax.adamw(1e-3)
    step = jax.jit(functools.partial(kto.kto_step, model_cfg=model.config, optimizer=optimizer, slots_per_row=S))
    _, m = step(init_state(trainable, optimizer, 0), frozen, _pack(EXAMPLES))
    np.testing.assert_allclose(m["loss"], 0.5, rtol=1e-6)
    assert float(m["kl"]) == 0.0 and float(m["rewards/margins"]) == 0.0


@pytest.mark.slow
def test_sharded_accumulated_step_equals_single_device(two_models):
    """8 rows over a (2, 2, 2) mesh of fake devices with grad_accum 4 (the first pass and the micro-batches
    sharded) == one device, one batch: metrics (kl included) and parameters."""
    from polmjax import mesh as mesh_lib
    from polmjax.train.state import init_state_sharded, state_shardings

    params, ref = two_models
    optimizer = optax.adamw(1e-3)
    batch = _pack(EXAMPLES + EXAMPLES[::-1])
    want_state, want = _step(optimizer=optimizer, slots_per_row=S)(init_state(params, optimizer, 0),
                                                                   {"reference": ref}, batch)
    mesh = mesh_lib.make_mesh(2, 2, 2)
    shardings = models.param_shardings(CFG, mesh)
    state = init_state_sharded(jax.device_put(params, shardings), optimizer, 0, mesh)
    frozen = {"base": {}, "reference": jax.device_put(ref, shardings)}
    batch_sharding = mesh_lib.named_sharding(mesh, ("act_batch", "act_len"), (8, T))
    step = jax.jit(functools.partial(kto.kto_step, model_cfg=CFG, optimizer=optimizer, slots_per_row=S, grad_accum=4,
                                     mesh=mesh),
                   in_shardings=(state_shardings(state), jax.tree.map(lambda x: x.sharding, frozen),
                                 {k: batch_sharding for k in kto.BATCH_KEYS}), donate_argnums=(0,))
    got_state, got = step(state, frozen, {k: jax.device_put(batch[k], batch_sharding) for k in kto.BATCH_KEYS})
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got_state.params,
                 want_state.params)


# ---- the run ----------------------------------------------------------------------------------------------------

SMALL_MODEL = ModelSource(init=ModelConfig(family="qwen3", vocab_size=0, hidden_size=32, intermediate_size=64,
                                           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
                                           tie_embeddings=True, rope=RopeConfig(theta=10000.0)),
                          tokenizer="toy")
SMALL = ["data.max_rows=400", "train.global_batch=8", "train.seq_len=64", "train.log_every=1",
         "train.save_every=24", "train.eval_batches=1", "train.sample_prompts=[]", "train.export_hf=false",
         "train.async_save=false", "optim.warmup_steps=2"]


def _rows(run_dir, split=None):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if r.get("split") == split}


@pytest.mark.slow  # ~20 s on a free CPU core: 24 steps with grad_accum 2 (the first-pass path) and two evals
def test_kto_run_lowers_held_out_loss(tmp_path):
    exp = config_lib.load_experiment(TINY, SMALL + [f"train.run_dir={tmp_path}", "train.steps=24",
                                                    "train.eval_every=12", "optim.lr=1e-2", "train.grad_accum=2",
                                                    "beta=1.0"])
    kto.run(dataclasses.replace(exp, model=SMALL_MODEL))
    train, held_out = _rows(tmp_path), _rows(tmp_path, "eval")
    print({s: {k: round(held_out[s][k], 4) for k in ("loss", "kl", "rewards/accuracies", "rewards/margins")}
           for s in (12, 24)})
    assert abs(train[1]["loss"] - 0.5) < 1e-6 and train[1]["kl"] == 0.0  # policy == reference at step 1
    assert held_out[24]["loss"] < held_out[12]["loss"] < 0.5
    # desirable completions gain implicit reward over undesirable ones (the sign accuracy is logged, but on
    # one held-out batch of a 2-layer model it is too noisy to assert)
    assert held_out[12]["rewards/margins"] > 0.1 and held_out[24]["rewards/margins"] > 0.1
    assert 0.0 <= held_out[24]["rewards/accuracies"] <= 1.0
    assert held_out[24]["examples"] >= 8 and "kl" in held_out[24]


@pytest.mark.slow  # three CLI runs (~1 min)
def test_sigkill_and_restart_equals_uninterrupted(tmp_path):
    """`polmjax kto` killed with SIGKILL after a checkpoint and rerun: metrics and final parameters bit-exact
    (the KL-baseline partners come from the data position, which the checkpoint holds)."""
    check_sigkill_and_restart(tmp_path, "kto", TINY, SMALL + TINY_INIT + ["train.save_every=2", "train.eval_every=0",
                                                                          "mesh.data=2"], steps=10, kill_after=5)


@pytest.mark.parametrize("override, message", [
    ("loss=ktoo", "loss='ktoo': expected one of apo_zero_unpaired, kto"),
    ("reference=none", "reference='none': expected one of auto, copy, base"),
    ("reference=base", "reference='base' is the LoRA base"),
    ("train.global_batch=1", "train.global_batch must be >= 2"),
])
def test_bad_settings_are_named(override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load_experiment(TINY, [override])
