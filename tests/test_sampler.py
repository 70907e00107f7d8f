"""The RL sampler: greedy == transformers' greedy generate, sampling == the softmax (chi-square), truncation
keeps to its allowed sets, log-probs == the trainer's `target_logprobs`, one prefill for n samples, early exit,
stop sequences, one compile per prompt bucket, sharded == one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import VOCAB, build_hf_model
from scipy import stats

from polmjax import models
from polmjax.mesh import make_mesh
from polmjax.models.decoder import forward_hidden, logits_from_hidden, target_logprobs, unflatten
from polmjax.rl import sampler
from polmjax.rl.sampler import pad_prompts, sample

CFG = models.ModelConfig(family="qwen3", vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [3], [4, 4, 4, 4]]


@functools.cache
def _peaked_params(cfg, seed=0):
    """Random weights large enough that next-token distributions are far from uniform (so that truncation
    excludes tokens and the chi-square test has a shape to check)."""
    rng = np.random.RandomState(seed)
    init = {"normal": lambda shape: rng.normal(0, 0.3, shape), "zeros": np.zeros, "ones": np.ones}
    return unflatten({name: jnp.asarray(init[spec.init](spec.shape), jnp.float32)  # numpy: no compile
                      for name, spec in sorted(models.param_specs(cfg).items())})


def _reference(cfg, params, ids, mask, out, n):
    """Full forward of prompt ++ completion (no cache): logits [R, N, V] predicting each generated token, and
    target_logprobs [R, N] of the generated tokens at temperature 1."""
    ids, mask = np.repeat(ids, n, axis=0), np.repeat(mask, n, axis=0)
    P = ids.shape[1]
    seq = np.concatenate([ids, np.asarray(out.tokens)], axis=1)
    seg = np.concatenate([mask, np.ones_like(np.asarray(out.tokens))], axis=1).astype(np.int32)
    pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0)
    logits, target = _full_forward(cfg, params, seq, pos, seg, out.tokens, P)
    return np.asarray(logits), np.asarray(target)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _full_forward(cfg, params, seq, pos, seg, tokens, P):
    hidden, _ = forward_hidden(cfg, params, seq, pos, seg)
    hidden = hidden[:, P - 1:P - 1 + tokens.shape[1]]
    return logits_from_hidden(cfg, params, hidden), target_logprobs(cfg, params, hidden, tokens)


def _allowed(logits_V, temperature, top_k=None, top_p=None, min_p=None):
    """The tokens top-k, then top-p, then min-p keep (numpy, written from the definitions), and the
    renormalised log-probs over them."""
    x = logits_V.astype(np.float64) / temperature
    keep = np.ones(x.shape, bool)
    if top_k is not None:
        keep &= x >= np.sort(x)[-top_k]
    if top_p is not None:
        p = np.where(keep, np.exp(x - x[keep].max()), 0)
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        kept = np.zeros_like(keep)
        kept[order[before < top_p]] = True
        keep &= x >= x[kept].min()
    if min_p is not None:
        p = np.where(keep, np.exp(x - x[keep].max()), 0)
        keep &= p >= min_p * p.max()
    lp = np.where(keep, x, -np.inf)
    lp = lp - np.log(np.exp(lp - lp.max()).sum()) - lp.max()
    return keep, lp


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_greedy_equals_transformers_generate(name, tmp_path):
    """Left-padded batch, EOS 2; gemma2: sliding window 4, attention and final soft-caps."""
    hf = build_hf_model(name)
    hf.save_pretrained(tmp_path)
    model = models.from_pretrained(tmp_path)
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(3, VOCAB, size)) for size in (7, 3, 5, 1)]
    ids, mask = pad_prompts(prompts, pad_id=0, buckets=(8,))
    N = 12
    out = sample(model.config, model.params(), ids, mask, jax.random.key(0), max_new_tokens=N, eos_ids=2,
                 temperature=0.0)
    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                          max_new_tokens=N, do_sample=False, eos_token_id=2, pad_token_id=0)[:, ids.shape[1]:].numpy()
    ref = np.pad(ref, ((0, 0), (0, N - ref.shape[1])))  # HF stops early once every row has ended
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert np.asarray(out.mask).sum() > len(prompts)  # not all rows stopped at once: a real comparison


def test_temperature_one_matches_the_softmax():
    """20k first tokens of one prompt (one call, n=20000) against softmax(logits): chi-square."""
    cfg = CFG.replace(vocab_size=16)
    params = _peaked_params(cfg)
    ids, mask = pad_prompts([[3, 4, 5]], pad_id=0, buckets=(4,))
    out = sample(cfg, params, ids, mask, jax.random.key(1), n=20000, max_new_tokens=1, eos_ids=())
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    logits = np.asarray(_full_forward(cfg, params, ids, pos, mask, out.tokens[:1], ids.shape[1])[0])
    logits = logits[0, 0].astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert p.max() / p.min() > 5  # a distribution with a shape
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=16)
    chi2, pvalue = stats.chisquare(counts, 20000 * p)
    print(f"chi-square {chi2:.1f} over 15 dof, p = {pvalue:.3f}")
    assert pvalue > 1e-3


@pytest.mark.parametrize("truncation", [dict(top_k=5), pytest.param(dict(top_p=0.6), marks=pytest.mark.slow),
                                        pytest.param(dict(min_p=0.2), marks=pytest.mark.slow),
                                        dict(top_k=12, top_p=0.9, min_p=0.05)], ids=str)
def test_truncation_keeps_to_the_allowed_set(truncation):
    """Every sampled token is in the allowed set computed from the full-forward logits, its `logprobs`
    is the log-prob renormalised over that set, and `model_logprobs` equals `target_logprobs` (T=1)."""
    params = _peaked_params(CFG)
    ids, mask = pad_prompts(PROMPTS, pad_id=0, buckets=(8,))
    temperature = 1.5
    out = sample(CFG, params, ids, mask, jax.random.key(2), n=16, max_new_tokens=5, eos_ids=(),
                 temperature=temperature, **truncation)
    logits, target = _reference(CFG, params, ids, mask, out, 16)
    tokens, lps = np.asarray(out.tokens), np.asarray(out.logprobs)
    sizes = []
    for r, t in np.ndindex(tokens.shape):
        keep, lp = _allowed(logits[r, t], temperature, **truncation)
        sizes.append(keep.sum())
        assert keep[tokens[r, t]], (r, t, tokens[r, t], np.flatnonzero(keep))
        assert abs(lps[r, t] - lp[tokens[r, t]]) < 1e-4
    assert np.mean(sizes) < 0.5 * CFG.vocab_size  # the truncation excluded tokens
    np.testing.assert_allclose(np.asarray(out.model_logprobs), target, atol=1e-4, rtol=0)


def test_logprobs_equal_target_logprobs_and_bf16_cache_mismatch():
    """Temperature 1, no truncation: the sampling distribution is the model's, so `logprobs`,
    `model_logprobs` and the trainer's `target_logprobs` agree (fp32, <= 1e-4). A bf16 KV cache shifts them."""
    params = _peaked_params(CFG)
    ids, mask = pad_prompts(PROMPTS, pad_id=0, buckets=(8,))
    out = sample(CFG, params, ids, mask, jax.random.key(3), n=16, max_new_tokens=5, eos_ids=())
    _, target = _reference(CFG, params, ids, mask, out, 16)
    np.testing.assert_allclose(np.asarray(out.logprobs), target, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out.model_logprobs), target, atol=1e-4, rtol=0)
    bf = sample(CFG, params, ids, mask, jax.random.key(3), n=16, max_new_tokens=5, eos_ids=(),
                cache_dtype=jnp.bfloat16)
    _, target_bf = _reference(CFG, params, ids, mask, bf, 16)
    diff = np.abs(np.asarray(bf.model_logprobs) - target_bf)
    ratio = np.exp(np.asarray(bf.model_logprobs) - target_bf)
    print(f"bf16 KV cache vs fp32 target_logprobs: max |dlogp| {diff.max():.2e}, mean {diff.mean():.2e}, "
          f"ratio in [{ratio.min():.4f}, {ratio.max():.4f}]")
    assert 0 < diff.max() < 0.05


def test_n_samples_share_one_prefill():
    """The traced program of `sample(n=4)` calls the jitted prefill once, on the B prompts (not B * n rows),
    and the n rows of a prompt decode identically under greedy."""
    params = _peaked_params(CFG)
    ids, mask = pad_prompts(PROMPTS, pad_id=0, buckets=(8,))
    run = lambda p, i, m: sample(CFG, p, i, m, jax.random.key(0), n=4, max_new_tokens=3, eos_ids=(),
                                 temperature=0.0)
    calls = [eqn for eqn in jax.make_jaxpr(run)(params, ids, mask).eqns if eqn.primitive.name in ("jit", "pjit")]
    names = [eqn.params["name"] for eqn in calls]
    assert names.count("prefill_prompts") == 1 and names.count("decode") == 1, names
    prefill_ids = calls[names.index("prefill_prompts")].invars[len(jax.tree.leaves(params))]
    assert prefill_ids.aval.shape == ids.shape
    decode_out = calls[names.index("decode")].outvars[0]
    assert decode_out.aval.shape == (4 * len(PROMPTS), 3)
    tokens = np.asarray(run(params, ids, mask).tokens).reshape(len(PROMPTS), 4, 3)
    assert (tokens == tokens[:, :1]).all()


def test_loop_exits_when_every_row_has_stopped():
    params = _peaked_params(CFG)
    ids, mask = pad_prompts([PROMPTS[0]] * 4, pad_id=0, buckets=(8,))
    free = sample(CFG, params, ids, mask, None, max_new_tokens=8, eos_ids=(), temperature=0.0)
    assert int(free.steps) == 8 and np.asarray(free.truncated).all()
    first = np.asarray(free.tokens[0]).tolist()
    k = next(i for i in range(1, 8) if first[i] not in first[:i])  # token k + 1 is the first new one
    eos = first[k]
    out = sample(CFG, params, ids, mask, None, max_new_tokens=8, eos_ids=(eos,), temperature=0.0)
    assert int(out.steps) == k + 1 < 8  # every row stopped at token k + 1: the loop stopped there
    assert np.asarray(out.lengths).tolist() == [k + 1] * 4 and not np.asarray(out.truncated).any()
    np.testing.assert_array_equal(np.asarray(out.tokens[:, :k + 1]), np.asarray(free.tokens[:, :k + 1]))
    assert (np.asarray(out.tokens[:, k + 1:]) == 0).all() and (np.asarray(out.logprobs[:, k + 1:]) == 0).all()


def test_stop_sequences():
    """A row stops after the last token of a stop sequence (matched over generated tokens only), keeping it;
    a sequence that never appears stops nothing."""
    params = _peaked_params(CFG)
    ids, mask = pad_prompts(PROMPTS, pad_id=0, buckets=(8,))
    free = np.asarray(sample(CFG, params, ids, mask, None, max_new_tokens=8, eos_ids=(), temperature=0.0).tokens)
    stop = tuple(int(t) for t in free[1, 3:5])  # row 1's tokens 4 and 5
    never = (CFG.vocab_size - 1,) * 9  # longer than the completion
    out = sample(CFG, params, ids, mask, None, max_new_tokens=8, eos_ids=(), stop_sequences=(never, stop),
                 temperature=0.0)
    for r in range(len(PROMPTS)):
        row = list(free[r])
        ends = [i + 2 for i in range(7) if tuple(row[i:i + 2]) == stop]
        length = ends[0] if ends else 8
        assert int(out.lengths[r]) == length and bool(out.truncated[r]) == (not ends)
        np.testing.assert_array_equal(np.asarray(out.tokens[r, :length]), free[r, :length])
    assert int(out.lengths[1]) <= 5


def test_prompt_buckets_compile_once():
    """Two batches of different prompt lengths in one bucket reuse the compiled prefill and decode."""
    params = _peaked_params(CFG)
    assert sampler.bucket(5, (4, 16)) == 16 and sampler.bucket(16, (4, 16)) == 16 and sampler.bucket(40, (4, 16)) == 48
    sizes = []
    for prompts in ([[5, 6, 7]], [[5, 6, 7, 8, 9, 10, 11]]):
        ids, mask = pad_prompts(prompts * 2, pad_id=0, buckets=(16,))
        assert ids.shape == (2, 16)
        sample(CFG, params, ids, mask, jax.random.key(0), n=2, max_new_tokens=4, eos_ids=(1,), top_k=7)
        sizes.append((sampler.prefill_prompts._cache_size(), sampler.decode._cache_size()))
    assert sizes[1] == sizes[0], sizes


def test_sharded_greedy_equals_one_device():
    """Mesh (2, 2, 2): rows over data x fsdp, heads over tensor; the same greedy tokens and log-probs, and the
    same samples at temperature 1 from the same key."""
    params = _peaked_params(CFG)
    ids, mask = pad_prompts(PROMPTS, pad_id=0, buckets=(8,))
    kw = dict(max_new_tokens=8, eos_ids=(), temperature=0.0)
    ref = sample(CFG, params, ids, mask, None, **kw)  # greedy: n = 2 repeats each row
    mesh = make_mesh(2, 2, 2)
    sharded_params = jax.device_put(params, models.param_shardings(CFG, mesh))
    got = sample(CFG, sharded_params, ids, mask, None, n=2, mesh=mesh, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.repeat(np.asarray(ref.tokens), 2, axis=0))
    np.testing.assert_allclose(np.asarray(got.model_logprobs), np.repeat(np.asarray(ref.model_logprobs), 2, axis=0),
                               atol=1e-5, rtol=0)
    assert len(got.tokens.sharding.device_set) == 8
    kw = dict(n=16, max_new_tokens=5, eos_ids=())  # temperature 1 (the shapes of the log-prob test: one compile)
    ref = sample(CFG, params, ids, mask, jax.random.key(3), **kw)
    got = sample(CFG, sharded_params, ids, mask, jax.random.key(3), mesh=mesh, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))  # partitionable random bits
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(ref.logprobs), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["unrolled", "scan"])
def test_decode_loop_writes_the_cache_in_place(schedule):
    """As `generate`'s loop (tests/test_decode_cache.py): in the compiled while_loop every instruction of a
    cache buffer's shape is an in-place dynamic-update-slice of it; the n-fold repeat happens once, before."""
    from test_decode_cache import CFG as DECODE_CFG
    from test_decode_cache import NEW, SCHEDULES, _buffer_shapes, _Hlo

    cfg = DECODE_CFG.replace(**SCHEDULES[schedule])
    params = _peaked_params(cfg)
    ids = np.ones((4, 8), np.int32)
    prefilled = jax.eval_shape(functools.partial(sampler.prefill_prompts, cfg), params, ids, ids)
    compiled = sampler.decode.lower(cfg, params, *prefilled, jax.random.key(0), n=2, max_new_tokens=NEW, eos=(1,),
                                    stops=((3, 4),), temperature=1.0, top_k=None, top_p=0.9, min_p=None,
                                    pad_id=0).compile()
    hlo = _Hlo(compiled.as_text())
    loop = hlo.while_body(carries=(8, NEW))
    in_place, others = hlo.cache_writes(hlo.reachable(loop), _buffer_shapes(cfg, 8 + NEW))
    assert others == [], f"instructions writing a whole cache buffer in the decode loop: {others}"
    assert in_place == 2 * cfg.num_layers


def test_top_k_and_top_p_without_a_sort_equal_the_sorted_definitions():
    """`truncate_logits`' bisections find the same top-k and nucleus as sorting, with ties (logits rounded
    to 0.5: the tokens tied with the last kept one stay) and negative logits."""
    from polmjax.generate import truncate_logits

    logits = (np.round(np.random.RandomState(0).normal(0, 2, (64, 50)) * 2) / 2).astype(np.float32)
    truncate = jax.jit(truncate_logits, static_argnames=("top_k", "top_p"))
    for knob in [dict(top_k=1), dict(top_k=5), dict(top_k=49), dict(top_p=0.05), dict(top_p=0.5), dict(top_p=0.9),
                 dict(top_p=0.999)]:
        got = np.isfinite(np.asarray(truncate(logits, **knob)))
        want = np.stack([_allowed(row, 1.0, **knob)[0] for row in logits])
        np.testing.assert_array_equal(got, want, err_msg=str(knob))
        assert 0 < got.sum() < got.size
