"""Sampling with a preallocated KV cache: left-padded prompts, greedy or temperature / top-k sampling.

Static shapes throughout (prompt length P, `max_new_tokens`), so one compile serves every call of the
same size. Pad tokens get segment id 0 and prompt tokens 1, so nothing attends to padding; positions
count real tokens only, as if each prompt had been run alone. The cache is carried through the decode
loop and each step writes only its new token's keys and values into it, in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from polmjax.models.config import ModelConfig
from polmjax.models.decoder import KVCache, forward_hidden, logits_from_hidden


def left_pad(prompts: list[list[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, P], mask [B, P]) with each prompt right-aligned."""
    P = length or max(len(p) for p in prompts)
    ids = np.full((len(prompts), P), pad_id, np.int32)
    mask = np.zeros((len(prompts), P), np.int32)
    for i, p in enumerate(prompts):
        if len(p) > P:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than the prompt length {P}")
        if len(p):
            ids[i, P - len(p):] = p
            mask[i, P - len(p):] = 1
    return ids, mask


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "eos_id", "pad_id",
                                             "mesh", "rules"))
def generate(cfg: ModelConfig, params: dict, prompt_ids_BP, prompt_mask_BP, rng=None, *, max_new_tokens: int,
             eos_id: int | tuple[int, ...], pad_id: int = 0, temperature: float = 0.0, top_k: int | None = None, mesh=None,
             rules=None):
    """Returns (tokens [B, max_new_tokens] int32, valid [B, max_new_tokens] bool).

    A row stops after its first end token (`eos_id`: one id or a tuple of ids, e.g. the tokenizer's EOS
    and the chat template's end-of-turn token; included in the output, marked valid); later slots hold pad_id.
    temperature 0 is greedy; otherwise sample from softmax(logits / temperature), optionally top-k.
    """
    B, P = prompt_ids_BP.shape
    eos_ids = jnp.asarray(eos_id if isinstance(eos_id, tuple) else (eos_id,), jnp.int32)
    rng = jax.random.key(0) if rng is None else rng
    logits, cache, next_pos = prefill(cfg, params, prompt_ids_BP, prompt_mask_BP, P + max_new_tokens, mesh=mesh,
                                      rules=rules)
    loop_params = loop_weights(cfg, params, mesh)

    def body(t, carry):
        logits, cache, pos, done, tokens, valid, rng = carry
        params = loop_params()
        rng, key = jax.random.split(rng)
        tok = _sample(logits, key, temperature, top_k)
        tok = jnp.where(done, pad_id, tok)
        tokens = tokens.at[:, t].set(tok)
        valid = valid.at[:, t].set(~done)
        done = done | jnp.isin(tok, eos_ids)
        logits, cache = decode_step(cfg, params, tok, pos, cache, mesh=mesh, rules=rules)
        return logits, cache, pos + 1, done, tokens, valid, rng

    init = (logits, cache, next_pos, jnp.zeros((B,), bool), jnp.full((B, max_new_tokens), pad_id, jnp.int32),
            jnp.zeros((B, max_new_tokens), bool), rng)
    _, _, _, _, tokens, valid, _ = jax.lax.fori_loop(0, max_new_tokens, body, init)
    return tokens, valid


def prefill(cfg: ModelConfig, params: dict, prompt_ids_BP, prompt_mask_BP, cache_len: int, *, mesh=None, rules=None,
            cache_dtype=None):
    """Runs the left-padded prompts into a new cache of `cache_len` slots.

    Returns (float32 logits [B, V] of each prompt's next token, the cache, next positions [B]). Positions
    count real tokens only and pads get segment id 0, so each row decodes as if its prompt ran alone.
    """
    B = prompt_ids_BP.shape[0]
    mask = prompt_mask_BP.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    cache = KVCache.create(cfg, B, cache_len, cache_dtype)
    hidden, cache = forward_hidden(cfg, params, prompt_ids_BP, positions, mask, cache, mesh=mesh, rules=rules)
    logits = logits_from_hidden(cfg, params, hidden[:, -1:], mesh, rules)[:, 0]
    return logits, cache, mask.sum(axis=1)


def decode_step(cfg: ModelConfig, params: dict, tok_B, pos_B, cache: KVCache, *, mesh=None, rules=None):
    """One token per row at positions `pos_B` through the cache: (float32 next-token logits [B, V], cache)."""
    B = tok_B.shape[0]
    hidden, cache = forward_hidden(cfg, params, tok_B[:, None], pos_B[:, None], jnp.ones((B, 1), jnp.int32), cache,
                                   mesh=mesh, rules=rules)
    return logits_from_hidden(cfg, params, hidden, mesh, rules)[:, 0], cache


def loop_weights(cfg: ModelConfig, params: dict, mesh):
    """A function giving the decode loop its parameters.

    XLA:CPU copies a layer's weights out of the stacked [L, ...] arrays before each matmul, in every step
    (a third of a small model's decode time). On CPU with unrolled layers the layers are sliced once here,
    before the loop, and restacked inside it, where XLA folds slice(stack(...)) back to these per-layer
    arrays. Elsewhere the slices fuse into the matmuls, and a second copy of the weights would only cost memory.
    """
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    if platform != "cpu" or cfg.scan_layers:
        return lambda: params
    per_layer = [jax.tree.map(lambda a: a[i], params["layers"]) for i in range(cfg.num_layers)]
    return lambda: dict(params, layers=jax.tree.map(lambda *a: jnp.stack(a), *per_layer))


def _sample(logits_BV, key, temperature: float, top_k: int | None):
    if temperature == 0.0:
        return argmax(logits_BV)
    logits = truncate_logits(logits_BV / temperature, top_k=top_k)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def truncate_logits(logits_BV, *, top_k: int | None = None, top_p: float | None = None, min_p: float | None = None):
    """Logits with the excluded tokens at -inf, in the order top-k, top-p, min-p (as `transformers`' warpers).

    top-k keeps the k largest logits; top-p (nucleus) the most probable tokens whose cumulative probability
    before each one is < top_p (the most probable token always stays); min-p the tokens with probability
    >= min_p * the largest. Each step reads the distribution the previous one left (renormalised). Tokens
    tied with the last kept one stay too.
    """
    if top_k is not None and top_k < logits_BV.shape[-1]:
        keys_BV = _ordered_keys(logits_BV)
        kth = _smallest_passing(keys_BV, lambda t: (keys_BV > t).sum(axis=-1, keepdims=True) < top_k)
        logits_BV = jnp.where(keys_BV < kth, -jnp.inf, logits_BV)
    if top_p is not None and top_p < 1.0:
        logits_BV = jnp.where(_below_nucleus(logits_BV, top_p), -jnp.inf, logits_BV)
    if min_p is not None and min_p > 0.0:
        top = logits_BV.max(axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < top + jnp.log(jnp.float32(min_p)), -jnp.inf, logits_BV)
    return logits_BV


def _below_nucleus(logits_BV, top_p: float):
    """The tokens top-p excludes: the kept ones have p >= p_m, p_m the smallest probability whose strictly
    larger ones sum to < top_p."""
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    keys_BV = _ordered_keys(probs_BV)
    p_m = _smallest_passing(keys_BV, lambda t: jnp.where(keys_BV > t, probs_BV, 0.0).sum(axis=-1, keepdims=True) < top_p)
    return keys_BV < p_m


def _smallest_passing(keys_BV, passes):
    """Per row, the smallest uint32 t with passes(t) (a [B, 1] bool, false at 0 and true at the row's largest
    key, monotone in t), by bisection: 32 masked reductions over the vocabulary and exact, in place of a
    sort or `lax.top_k` (XLA:CPU: 2/3 of a decode step for a [8, 2048] sort, 4 ms for top_k=50)."""

    def halve(_, bounds):  # passes(hi), not passes(lo)
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = passes(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    hi = keys_BV.max(axis=-1, keepdims=True)
    return jax.lax.fori_loop(0, 32, halve, (jnp.zeros_like(hi), hi))[1]


def _ordered_keys(x):
    """float32 -> uint32 with the same order (the sign bit flipped for positives, every bit for negatives)."""
    b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def argmax(logits_BV):
    """jnp.argmax over the vocabulary (the first maximum) as two plain reductions: XLA:CPU runs argmax's
    (value, index) reduction 7x slower (90 vs 12 us for [8, 2048], 5% of a small model's decode step)."""
    V = logits_BV.shape[-1]
    top = logits_BV.max(axis=-1, keepdims=True)
    return jnp.minimum(jnp.where(logits_BV == top, jnp.arange(V, dtype=jnp.int32), V).min(axis=-1), V - 1)
