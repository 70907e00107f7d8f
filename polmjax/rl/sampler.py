"""The RL sampler: `n` completions per prompt from the live parameters, with the log-probs it sampled them with.

One jitted prefill runs each left-padded prompt once into a prompt-sized KV cache; the decode (a second
jitted function) repeats each prompt's cache rows `n` times, extends them by `max_new_tokens` slots and
runs a `lax.while_loop` that stops as soon as every row has produced a stop (an EOS id or the last token of
a stop sequence) — so a batch whose answers are short costs short. Shapes are static: the prompt length is
the caller's (pad to `bucket(length)` with `pad_prompts` so batches share one compile), and
`max_new_tokens` is the completion bucket. Sharded like `polmjax.generate.generate`: rows over data/fsdp,
heads over tensor (`mesh=`); the parameters passed in are read where they are, never copied or donated.

Per-token log-probs come back twice (both float32, 0 at masked slots):
  logprobs        log-prob of the sampled token under the distribution it was drawn from: softmax of
                  logits / temperature after top-k, top-p and min-p, renormalised over the kept tokens
                  (0 for greedy, a point mass). This is the behaviour policy of importance sampling.
  model_logprobs  log softmax(logits) at temperature 1 over the whole vocabulary: the policy's own
                  log-prob, the number the trainer's `target_logprobs` recomputes. The two are equal at
                  temperature 1 without truncation; their difference otherwise is the sampling shift,
                  and `model_logprobs` vs the trainer's is the engine mismatch (bf16 cache, kernels).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from polmjax import mesh as mesh_lib
from polmjax.generate import argmax, decode_step, left_pad, loop_weights, prefill, truncate_logits
from polmjax.models.config import ModelConfig
from polmjax.models.decoder import CACHE_AXES, KVCache

BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Samples(NamedTuple):
    """R = B * n rows, row b * n + i the i-th sample of prompt b; N = max_new_tokens."""

    tokens: jax.Array          # [R, N] int32; pad_id after a row's stop token
    logprobs: jax.Array        # [R, N] float32: under the sampling distribution (see the module docstring)
    model_logprobs: jax.Array  # [R, N] float32: log softmax(logits), temperature 1, untruncated
    mask: jax.Array            # [R, N] bool: generated tokens, the stop token included
    lengths: jax.Array         # [R] int32: mask.sum(-1)
    truncated: jax.Array       # [R] bool: no stop within max_new_tokens
    steps: jax.Array           # int32 scalar: tokens decoded per row (the loop ran steps - 1 model forwards)


def sample(cfg: ModelConfig, params: dict, prompt_ids_BP, prompt_mask_BP, rng, *, n: int = 1, max_new_tokens: int,
           eos_ids: int | tuple[int, ...], stop_sequences: tuple[tuple[int, ...], ...] = (), temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, min_p: float | None = None, pad_id: int = 0,
           mesh=None, rules=None, cache_dtype=None) -> Samples:
    """`n` completions of each left-padded prompt (ids and 0/1 mask [B, P]); see `Samples`.

    temperature 0 is greedy (top-k/p and min-p then change nothing). Otherwise logits / temperature, then
    top-k, top-p (nucleus) and min-p in that order (`polmjax.generate.truncate_logits`), composable.
    A row stops after an id of `eos_ids` or after the last token of one of `stop_sequences` (token-id
    sequences, matched against the generated tokens only); the stop token is kept and marked valid.
    rng: a key (None: key 0; greedy draws no randomness).
    cache_dtype: the KV cache's dtype (default the compute dtype), e.g. jnp.bfloat16 to halve its memory.
    """
    eos = (int(eos_ids),) if isinstance(eos_ids, (int, np.integer)) else tuple(int(e) for e in eos_ids)
    stops = tuple(tuple(int(t) for t in s) for s in stop_sequences)
    B, P = prompt_ids_BP.shape
    if prompt_mask_BP.shape != (B, P):
        raise ValueError(f"sample: prompt_mask {prompt_mask_BP.shape} does not match prompt_ids {(B, P)}")
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"sample: n={n} and max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"sample: temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"sample: top_k={top_k} must be >= 1 (None = no top-k)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample: top_p={top_p} must be in (0, 1] (None = no nucleus truncation)")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"sample: min_p={min_p} must be in [0, 1]")
    if any(len(s) == 0 for s in stops):
        raise ValueError(f"sample: empty stop sequence in {stop_sequences}")
    rng = jax.random.key(0) if rng is None else rng
    logits_BV, cache, pos_B = prefill_prompts(cfg, params, prompt_ids_BP, prompt_mask_BP, mesh=mesh, rules=rules,
                                              cache_dtype=cache_dtype)
    return decode(cfg, params, logits_BV, cache, pos_B, rng, n=n, max_new_tokens=max_new_tokens, eos=eos,
                  stops=stops, temperature=float(temperature), top_k=top_k, top_p=top_p, min_p=min_p,
                  pad_id=pad_id, mesh=mesh, rules=rules)


def bucket(length: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket >= length (beyond the largest: the next multiple of it), so that prompt batches
    of nearby lengths share one shape and one compile."""
    for b in sorted(buckets):
        if length <= b:
            return b
    top = max(buckets)
    return -(-length // top) * top


def pad_prompts(prompts: list[list[int]], pad_id: int, buckets: tuple[int, ...] = BUCKETS):
    """(ids [B, P], mask [B, P]) left-padded to P = bucket(longest prompt)."""
    return left_pad(prompts, pad_id, bucket(max(len(p) for p in prompts), buckets))


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "rules", "cache_dtype"))
def prefill_prompts(cfg: ModelConfig, params: dict, prompt_ids_BP, prompt_mask_BP, *, mesh=None, rules=None,
                    cache_dtype=None):
    """The prompts, once, into a cache of exactly P slots: (logits [B, V], cache, next positions [B])."""
    return prefill(cfg, params, prompt_ids_BP, prompt_mask_BP, prompt_ids_BP.shape[1], mesh=mesh, rules=rules,
                   cache_dtype=cache_dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "n", "max_new_tokens", "eos", "stops", "temperature", "top_k",
                                             "top_p", "min_p", "pad_id", "mesh", "rules"))
def decode(cfg: ModelConfig, params: dict, logits_BV, cache: KVCache, pos_B, rng, *, n: int, max_new_tokens: int,
           eos: tuple[int, ...], stops: tuple[tuple[int, ...], ...], temperature: float, top_k, top_p, min_p,
           pad_id: int, mesh=None, rules=None) -> Samples:
    """From `prefill_prompts`' output: each prompt's cache rows repeated `n` times and extended by
    `max_new_tokens` slots, then decoded until every row has stopped (or the slots are full)."""
    N = max_new_tokens
    R = logits_BV.shape[0] * n
    cache = _expand_cache(cache, n, N, mesh, rules)
    rows = lambda x: mesh_lib.constrain(x, ("act_batch",) + (None,) * (x.ndim - 1), mesh, rules)  # noqa: E731
    logits = mesh_lib.constrain(jnp.repeat(logits_BV, n, axis=0), ("act_batch", "act_vocab"), mesh, rules)
    pos = rows(jnp.repeat(pos_B, n, axis=0))
    eos_ids = jnp.asarray(eos, jnp.int32)
    stop_ids, stop_on = _stop_table(stops)
    loop_params = loop_weights(cfg, params, mesh)

    def choose(t, logits, done, recent, out):
        """Draw token t of every row from `logits`, record it, and update which rows have stopped."""
        tokens, lps, model_lps, valid = out
        tok, lp, model_lp = _draw(logits, jax.random.fold_in(rng, t), temperature, top_k, top_p, min_p)
        tok = jnp.where(done, pad_id, tok)
        out = (tokens.at[:, t].set(tok), lps.at[:, t].set(jnp.where(done, 0.0, lp)),
               model_lps.at[:, t].set(jnp.where(done, 0.0, model_lp)), valid.at[:, t].set(~done))
        stopped = jnp.isin(tok, eos_ids)
        if stops:
            recent = jnp.concatenate([recent[:, 1:], tok[:, None]], axis=1)
            hits = (recent[:, None, :] == stop_ids[None]) | ~stop_on[None]
            stopped = stopped | hits.all(axis=-1).any(axis=-1)
        return tok, done | stopped, recent, out

    out = (jnp.full((R, N), pad_id, jnp.int32), jnp.zeros((R, N), jnp.float32), jnp.zeros((R, N), jnp.float32),
           jnp.zeros((R, N), bool))
    out = tuple(rows(x) for x in out)
    recent = jnp.full((R, stop_ids.shape[1]), -1, jnp.int32)  # the last generated tokens, for stop sequences
    tok, done, recent, out = choose(0, logits, rows(jnp.zeros((R,), bool)), recent, out)

    def cond(carry):
        t, _, _, _, done, _, _ = carry
        return (t < N) & ~done.all()

    def body(carry):
        t, tok, pos, cache, done, recent, out = carry
        logits, cache = decode_step(cfg, loop_params(), tok, pos, cache, mesh=mesh, rules=rules)
        tok, done, recent, out = choose(t, logits, done, recent, out)
        return t + 1, tok, pos + 1, cache, done, recent, out

    init = (jnp.ones((), jnp.int32), tok, pos, cache, done, recent, out)
    steps, _, _, _, done, _, (tokens, lps, model_lps, valid) = jax.lax.while_loop(cond, body, init)
    return Samples(tokens, lps, model_lps, valid, valid.sum(axis=1, dtype=jnp.int32), ~done, steps)


def _draw(logits_BV, key, temperature: float, top_k, top_p, min_p):
    """(token [B], its log-prob under the sampling distribution [B], under log softmax(logits) [B])."""
    model_lp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    if temperature == 0.0:
        tok = argmax(logits_BV)
        lp = jnp.zeros(tok.shape, jnp.float32)
    else:
        kept_BV = truncate_logits(logits_BV / temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        tok = jax.random.categorical(key, kept_BV, axis=-1).astype(jnp.int32)
        lp = _pick(jax.nn.log_softmax(kept_BV, axis=-1), tok)
    return tok, lp, _pick(model_lp_BV, tok)


def _pick(x_BV, tok_B):
    return jnp.take_along_axis(x_BV, tok_B[:, None], axis=-1)[:, 0]


def _expand_cache(cache: KVCache, n: int, new: int, mesh, rules) -> KVCache:
    """Each row repeated n times (adjacent), and `new` empty slots appended."""

    def grow(c):  # [B, G, P, K] per layer, or [L, B, G, P, K]
        c = jnp.repeat(c, n, axis=c.ndim - 4)
        c = jnp.pad(c, [(0, 0)] * (c.ndim - 2) + [(0, new), (0, 0)])
        return mesh_lib.constrain(c, CACHE_AXES[-c.ndim:], mesh, rules)

    segments = jnp.pad(jnp.repeat(cache.segment_ids, n, axis=0), [(0, 0), (0, new)], constant_values=-1)
    return KVCache(jax.tree.map(grow, cache.k), jax.tree.map(grow, cache.v),
                   mesh_lib.constrain(segments, ("act_batch", None), mesh, rules), cache.index)


def _stop_table(stops: tuple[tuple[int, ...], ...]):
    """Stop sequences right-aligned in a [S, W] table of ids and a [S, W] mask of their real entries."""
    W = max((len(s) for s in stops), default=0)
    ids, on = np.zeros((max(len(stops), 1), W), np.int32), np.zeros((max(len(stops), 1), W), bool)
    for i, s in enumerate(stops):
        ids[i, W - len(s):], on[i, W - len(s):] = s, True
    return jnp.asarray(ids), jnp.asarray(on)
